"""The papers' own numbers that the study's tables print beside each claim: the only typed-in numbers of the report.

Each string names the paper it was transcribed from (its arXiv id); the summaries and the results table print these
strings as they are.
"""
_DLER, _LSPO, _HAPO, _REPRO = "DLER, arXiv 2510.15110", "LSPO, arXiv 2510.01459", "HAPO, arXiv 2509.16591", \
    "RePro, arXiv 2512.01925"
_TRACERL = "TraceRL, arXiv 2509.06949"
PAPER = {
    "dler_half": f"avg length −77% (R1-1.5B 10499 → 2466 tokens), −69% (7B 7747 → 2405) ({_DLER})",
    "dler_control": f"no correctness-only control in the paper; vs Laser-DE-L4096-1.5B 4882 → 2466 tokens "
                    f"({_DLER})",
    "dler_acc": f"MATH 84.31 → 86.95, AIME-24 29.79 → 34.38 (R1-1.5B → DLER; {_DLER})",
    "da_easy": f"DA-DLER a further −15% (1.5B: 2466 → 2106 avg tokens), −11–12% (7B) ({_DLER})",
    "da_hard": f"AIME-24 34.38 (DLER) vs 34.37 (DA-DLER) 1.5B; 55.62 vs 53.90 7B ({_DLER})",
    "merge": f"AIME-24 66.40 → DLER 63.54 → merged 66.66; length 5996 → 2735 → 3237 ({_DLER}, Table 2)",
    "lspo_grpo": f"GRPO 37.5 → 38.7 (AIME-25/Olympiad/Minerva avg, Qwen2.5-Math-7B; {_LSPO})",
    "lspo_dapo": f"DAPO 37.9 → 38.6 ({_LSPO})",
    "lspo_gspo": f"GSPO 38.5 → 39.2 ({_LSPO})",
    "hapo_acc": f"DAPO 46.97 → HAPO 50.04 (Qwen2.5-Math-7B, 6-benchmark avg; {_HAPO})",
    "hapo_entropy": f"no number in the paper ({_HAPO}); the claim under test",
    "hapo_ablation": f"add-one ablation over DAPO 46.97: +A 48.85, +B 48.56, +C 48.28, +D 48.02; all 50.04 "
                     f"({_HAPO})",
    "repro_ppo": f"PPO → +REPRO: AIME24 34.8 → 36.3, MATH500 86.9 → 87.7 (R1-Distill-1.5B; {_REPRO})",
    "repro_grpo": f"GRPO → +REPRO: AIME24 32.9 → 36.0, MATH500 86.0 → 87.1 (R1-Distill-1.5B; {_REPRO})",
    "repro_tokens": f"reasoning tokens −36.8% at most (abstract-level; {_REPRO})",
}
ABLATIONS = {"hapo_no_A_temperature": "A (adaptive temperature)",
             "hapo_no_B_token_group_adv": "B (token-level group average)",
             "hapo_no_C_redistribution": "C (advantage redistribution)",
             "hapo_no_D_adaptive_clip": "D (asymmetric adaptive clip)"}
# The TraceRL paper's numbers, printed once under the first diffusion study (its claims' "see below").
PAPER_TRACERL = {
    "TraDo-8B-Instruct vs AR models (math)": (
        "+6.1% relative vs Qwen2.5-7B-Instruct and +51.3% relative vs Llama3.1-8B-Instruct on math reasoning "
        f"[abs] ({_TRACERL})"),
    "TraDo-4B-Instruct vs 7B AR models": f"beats 7B AR models on complex math [abs] ({_TRACERL})",
    "TraDo trained only with TraceRL": (
        "TraDo-4B/8B-Instruct = TraceRL from SDAR-4B/8B-Chat; paper scale 64 tasks x 16 responses per step, 80 steps, "
        f"lr 1e-6, block 4 (rl_trado.yaml) [code-repo text] ({_TRACERL})"),
    "long-CoT TraDo-8B-Thinking": (
        "beats Qwen2.5-7B-Instruct on MATH500 by 18.1% relative [abs]; MATH500 = 87.4% [unverified] "
        f"({_TRACERL})"),
    "block-size enlargement with TraceRL": f"block 4 -> 8: MATH500 60.2% -> 67.7% [unverified] ({_TRACERL})",
    "dynamic (threshold) sampling speed-up": f"15.4% faster on MATH500 [unverified] ({_TRACERL})",
    "diffusion value model": (
        "reduces variance / allows a larger lr or fewer accumulation steps; no number given [README text] "
        f"({_TRACERL})"),
    "TraceRL vs one-step (diffu-GRPO) estimator": (
        f"no paper number recorded: the paper's ablation tables were not available ({_TRACERL}); the "
        "estimators are the trajectory one (TraceRL) and d1's one-step one (diffu-GRPO)"),
}
