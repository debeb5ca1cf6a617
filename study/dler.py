"""The DLER study's extra evaluations: every checkpoint, the SFT start, and the DLER checkpoint merged into the
SFT base by update-selective merging (the largest quarter of each tensor's update, scaled by 0.7, which the DLER
paper uses to win back accuracy lost to over-shortening), evaluated at the correctness-only control's response
budget, per difficulty tier (`split_eval`): DLER trains with a 64-token budget, and a length comparison must not
be capped by it. Called by `runner.run_study`.
"""
from __future__ import annotations

import os

from study.common import EVAL_COMMON_FILE, load_json, make_config, run_key, write_json
from study.runs import GRPO, TIERS, RunSpec, Settings


def combine_tiers(parts: dict) -> dict:
    """{tier: (num_problems, metrics)} -> {tier: metrics, "all": problem-weighted mean of every shared key}.

    Every tier is evaluated with the same samples per problem, so a problem-weighted mean of per-tier means is
    the mean over the union (pass@1, lengths, re-check rate, pass@k, maj@k); per-level keys are copied.
    """
    tiers = [t for t, (n, _) in parts.items() if n > 0]
    if not tiers:
        raise ValueError("combine_tiers needs at least one tier with problems.")
    shared = set.intersection(*(set(parts[t][1]) for t in tiers))
    total = sum(parts[t][0] for t in tiers)
    out = {t: dict(parts[t][1]) for t in tiers}
    out["all"] = {k: float(sum(parts[t][0] * parts[t][1][k] for t in tiers) / total)
                  for k in sorted(shared) if not k.startswith("pass@1/level")}
    for t in tiers:
        out["all"].update({k: v for k, v in parts[t][1].items() if k.startswith("pass@1/level")})
    return out


_SAMPLERS: dict = {}


def _sampler(graphdef, params, **common):
    """make_generate_fn memoized on (graphdef, sampling params, lengths, ids): checkpoints of one architecture
    share one jitted sampler, so evaluating several of them compiles once."""
    from jaxrl_reason.sampling.autoregressive import make_generate_fn

    key = (graphdef, params, tuple(sorted(common.items())))
    if key not in _SAMPLERS:
        _SAMPLERS[key] = make_generate_fn(graphdef, params=params, **common)
    return _SAMPLERS[key]


def split_eval(config, checkpoint: str, seed: int) -> dict:
    """Evaluates the HF `checkpoint` on `config`'s held-out set and budget, one `evaluate` per tier (TIERS),
    sharing one compiled sampler (fixed batch rows); returns combine_tiers' {tier: metrics, "all": ...}."""
    import jax
    from flax import nnx

    from jaxrl_reason.sampling.processors import SamplingParams
    from jaxrl_reason.train import build
    from jaxrl_reason.train.evaluation import evaluate

    config = config.copy_and_resolve_references()
    config.model.init, config.task.tokenizer_dir = f"hf:{checkpoint}", checkpoint
    task = build.build_task(config)
    policy, _ = build.load_policy(config, task.tokenizer)
    graphdef, params = nnx.split(policy, nnx.Param)
    tok, ro, ev = task.tokenizer, config.rollout, config.eval
    common = dict(max_prompt_len=ro.max_prompt_len, max_new_tokens=ro.max_new_tokens, eos_ids=(tok.eos_token_id,),
                  pad_id=tok.pad_token_id)
    sample_fn = _sampler(graphdef, SamplingParams(temperature=ev.temperature), **common)
    greedy_fn = _sampler(graphdef, SamplingParams(greedy=True), **common) if ev.greedy else None
    groups = {t: [ex for ex in task.heldout if ex.extra.get("level") in lv] for t, lv in TIERS.items()}
    rows = max(1, min(ev.batch_size, max(len(g) for g in groups.values()) * ev.samples))
    key, parts = jax.random.PRNGKey(seed), {}
    for t, examples in groups.items():
        key, sub = jax.random.split(key)
        parts[t] = (len(examples), evaluate(params, examples, tokenizer=tok, scorer=task.scorer, sample_fn=sample_fn,
                                            greedy_fn=greedy_fn, samples=ev.samples, batch_rows=rows,
                                            max_prompt_len=ro.max_prompt_len, key=sub, count_fn=task.count_fn)
                    if examples else {})
    return combine_tiers(parts)


def _cached(path: str, fn):
    if os.path.exists(path):
        return load_json(path)
    value = fn()
    write_json(path, value)
    return value


def _base_checkpoint(config, workroot: str) -> str:
    """The policy RL starts from as an HF directory: the SFT checkpoint, or (random init) an export of it."""
    if config.model.init == "sft":
        return config.model.sft_dir
    from jaxrl_reason.models.hf import save_hf
    from jaxrl_reason.train import build

    out = os.path.join(workroot, f"init_{config.model.init}_seed{config.seed}")
    if not os.path.exists(os.path.join(out, "config.json")):
        task = build.build_task(config)
        policy, mcfg = build.load_policy(config, task.tokenizer)
        save_hf(policy, mcfg, out)
        task.tokenizer.save_pretrained(out)
    return out


def run_dler_extras(results: dict, seeds, s: Settings, workroot: str) -> dict:
    """Adds `eval_common` (split_eval at the control's budget) to every DLER-study run, and two entries: "sft"
    (the start policy) and "dler_merged" (DLER merged into the start policy, top 25%, scale 0.7)."""
    from experiments import merge as merge_cli

    common = make_config(GRPO, 0, s)  # the correctness-only control's budget and held-out set
    extra = {"sft": [], "dler_merged": []}
    for seed in seeds:
        base = _base_checkpoint(make_config(RunSpec("dler", "dler"), seed, s), workroot)
        sft_dir = os.path.join(workroot, "runs", f"sft_eval_{run_key(GRPO, seed, s).replace('/', '_')}")
        extra["sft"].append({"seed": seed, "checkpoint": base, "eval_common": _cached(
            os.path.join(sft_dir, EVAL_COMMON_FILE), lambda: split_eval(common, base, seed))})
        for r in results.values():
            res = next(x for x in r if x["seed"] == seed)
            res["eval_common"] = _cached(os.path.join(res["workdir"], EVAL_COMMON_FILE),
                                         lambda res=res: split_eval(common, os.path.join(res["workdir"], "hf_export"),
                                                                    seed))
        dler = next(x for x in results["dler"] if x["seed"] == seed)
        merged = os.path.join(dler["workdir"], "merged")
        stats_path = os.path.join(merged, "merge_stats.json")
        stats = _cached(stats_path, lambda: merge_cli.merge_checkpoints(
            base, os.path.join(dler["workdir"], "hf_export"), merged, top_frac=0.25, scale=0.7))
        extra["dler_merged"].append({"seed": seed, "merge": stats, "eval_common": _cached(
            os.path.join(merged, EVAL_COMMON_FILE), lambda: split_eval(common, merged, seed))})
    return extra
