"""Tables and verdicts of the reproduction study, computed from results/<study>.json only (plots: study/plots.py).

Statistics: mean ± sample standard deviation (ddof 1) over seeds; one seed is shown as "(n=1)". A claim gets
"yes"/"no" only when the study is powered (>= MIN_SEEDS seeds and >= MIN_PROBLEMS held-out problems: fewer cannot
resolve the few-point differences the papers report); otherwise "inconclusive", with whether the criterion held on
the means. A claim "A > B" is `verdict_greater`: yes if mean(A) - mean(B) > 2 SE with SE = sqrt(s_A^2/n_A + s_B^2/n_B), no if
mean(A) <= mean(B), inconclusive in between. Threshold claims (DLER length, accuracy tolerances) are
`verdict_if` on the means. The papers' numbers are the only typed-in numbers (study/papers.py).
"""
from __future__ import annotations

import os

import numpy as np

from study.papers import ABLATIONS, PAPER, PAPER_TRACERL
from study.plots import plot_curves, plot_tradeoff
from study.runs import FILL_ROUNDS, TRACERL_LR, TRACERL_LR_RUN, TRACERL_STUDIES
from study.stats import common, ev, mean_std

MIN_SEEDS, MIN_PROBLEMS = 3, 500


# ----------------------------------------------------------------------------------------------- statistics
def fmt(values, scale: float = 1.0, digits: int = 1) -> str:
    """"m ± s" (values × scale), "m (n=1)" for one value, "–" for none."""
    m, s, n = mean_std(values)
    if n == 0:
        return "–"
    if n == 1:
        return f"{m * scale:.{digits}f} (n=1)"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def _note(met: bool, ctx: dict) -> str:
    return f"inconclusive ({'met' if met else 'not met'} at n={ctx['seeds']}, {ctx['problems']} problems)"


def verdict_if(met: bool | None, ctx: dict) -> str:
    """yes / no for a criterion on the means when `ctx["powered"]`, else inconclusive (with the outcome)."""
    if met is None:
        return "inconclusive (missing results)"
    return ("yes" if met else "no") if ctx["powered"] else _note(met, ctx)


def verdict_greater(a, b, ctx: dict) -> str:
    """Claim mean(a) > mean(b): yes if the difference exceeds 2 SE (Welch, over seeds), no if it is <= 0."""
    (ma, sa, na), (mb, sb, nb) = mean_std(a), mean_std(b)
    if na == 0 or nb == 0:
        return "inconclusive (missing results)"
    diff, se = ma - mb, float(np.sqrt(sa**2 / na + sb**2 / nb))
    if not ctx["powered"]:
        return _note(diff > 0, ctx)
    if diff > 2.0 * se and diff > 0:
        return "yes"
    return "no" if diff <= 0 else "inconclusive (difference < 2 SE)"


def context(settings: dict, seeds) -> dict:
    n = len(seeds)
    return {"seeds": n, "problems": settings["eval_problems"],
            "powered": n >= MIN_SEEDS and settings["eval_problems"] >= MIN_PROBLEMS}


# ----------------------------------------------------------------------------------------------- accessors
def curve_stat(runs: list[dict], key: str, how: str = "mean") -> list[float]:
    """Per seed: the mean over steps ("mean"), the value at the last step ("last") or the std over steps ("std")
    of a curve metric (finite values only; nan when a seed logged none)."""
    out = []
    for r in runs:
        v = np.asarray([c[key] for c in r.get("curve", []) if c.get(key) is not None and np.isfinite(c[key])])
        if v.size == 0:
            out.append(float("nan"))
        else:
            out.append(float({"mean": v.mean, "last": lambda: v[-1], "std": v.std}[how]()))
    return out


def nonfinite_skips(runs: list[dict]) -> list[float]:
    return [float(sum(1 for c in r.get("curve", []) if c.get("train/skipped") or c.get("train/loss") is None))
            for r in runs]


def lspo_filtered(runs: list[dict]) -> tuple[list[float], list[float]]:
    """Per seed, over all generation rounds of the run: (share of the accuracy-kept prompts the LSPO length rule
    dropped, share of all sampled prompts dropped by accuracy + length). Curve values are per-step means over that
    step's rounds, so sums are mean x rounds."""
    by_length, total = [], []
    for r in runs:
        kept = cand = sampled = 0.0
        for c in r.get("curve", []):
            if all(c.get(k) is not None for k in ("lspo_kept_fraction", "lspo_num_candidates", "num_groups")):
                rounds = c.get("rollout/rounds", 1)
                kept += c["lspo_kept_fraction"] * c["num_groups"] * rounds
                cand += c["lspo_num_candidates"] * rounds
                sampled += c["num_groups"] * rounds
        by_length.append(1.0 - kept / cand if cand > 0 else float("nan"))
        total.append(1.0 - kept / sampled if sampled > 0 else float("nan"))
    return by_length, total


def groups_per_update(runs: list[dict]) -> list[float]:
    """Per seed, the mean over steps of the groups an update trained on: kept_frac x rounds x groups per round
    (rollout.collect_batch; fewer than the batch's groups when the filters hit `filter.max_rounds`)."""
    out = []
    for r in runs:
        v = [c["rollout/kept_frac"] * c["rollout/rounds"] * c["num_groups"] for c in r.get("curve", [])
             if all(c.get(k) is not None for k in ("rollout/kept_frac", "rollout/rounds", "num_groups"))]
        out.append(float(np.mean(v)) if v else float("nan"))
    return out


def _m(values) -> float:
    return mean_std(values)[0]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def claim(text: str, criterion: str, ours: str, paper: str, verdict: str) -> list[str]:
    return [text, criterion, ours, paper, verdict]


CLAIM_HEADER = ["claim", "criterion (reproduced? rule)", "ours", "paper (reference)", "reproduced?"]


# ----------------------------------------------------------------------------------------------- DLER
DLER_ROWS = ("sft", "grpo", "dapo", "dler", "da_dler", "dler_merged")


def dler_runs(res: dict) -> str:
    """Run table at the control's budget (T=1 samples, per tier)."""
    rows = []
    for name in [n for n in DLER_ROWS if n in res]:
        r = res[name]
        rows.append([name, fmt(common(r, "pass@1"), 100), fmt(common(r, "length_mean")),
                     fmt(common(r, "recheck_per_response"), 1, 2), fmt(common(r, "truncated_frac"), 100),
                     fmt(common(r, "pass@1", "easy"), 100), fmt(common(r, "length_mean", "easy")),
                     fmt(common(r, "pass@1", "hard"), 100), fmt(common(r, "length_mean", "hard")),
                     fmt(curve_stat(r, "response/length_mean", "last"))])
    return table(["run", "pass@1 %", "length", "re-checks / resp.", "truncated %", "pass@1 easy %",
                  "length easy", "pass@1 hard %", "length hard", "train length, last step"], rows)


def dler_claims(res: dict, ctx: dict) -> list[list[str]]:
    """DLER vs SFT and the controls, DA-DLER vs DLER, merging."""
    L = {n: common(res[n], "length_mean") for n in res}
    A = {n: common(res[n], "pass@1") for n in res}
    claims = []
    if {"sft", "dler"} <= set(res):
        claims.append(claim("DLER halves the length of the SFT policy", "len(DLER) ≤ 0.5 × len(SFT)",
                            f"{fmt(L['sft'])} → {fmt(L['dler'])}", PAPER["dler_half"],
                            verdict_if(_m(L["dler"]) <= 0.5 * _m(L["sft"]), ctx)))
    for ctrl in [c for c in ("grpo", "dapo") if {c, "dler"} <= set(res)]:
        claims.append(claim(f"DLER clearly shorter than the correctness-only {ctrl.upper()} at the same step",
                            f"len(DLER) ≤ 0.8 × len({ctrl})", f"{ctrl.upper()} {fmt(L[ctrl])} vs DLER {fmt(L['dler'])}",
                            PAPER["dler_control"], verdict_if(_m(L["dler"]) <= 0.8 * _m(L[ctrl]), ctx)))
        claims.append(claim(f"DLER accuracy within 2 points of {ctrl.upper()}",
                            f"pass@1(DLER) ≥ pass@1({ctrl}) − 2 pts",
                            f"{ctrl.upper()} {fmt(A[ctrl], 100)} vs DLER {fmt(A['dler'], 100)}",
                            PAPER["dler_acc"], verdict_if(_m(A["dler"]) >= _m(A[ctrl]) - 0.02, ctx)))
    if {"dler", "da_dler"} <= set(res):
        claims += da_dler_claims(res, ctx)
    if {"sft", "dler", "dler_merged"} <= set(res):
        claims.append(merge_claim(A, L, ctx))
    return claims


def da_dler_claims(res: dict, ctx: dict) -> list[list[str]]:
    """DA-DLER vs DLER: shorter on the easy tier, accuracy kept (within 2 points) on the hard tier."""
    le = {n: common(res[n], "length_mean", "easy") for n in ("dler", "da_dler")}
    ah = {n: common(res[n], "pass@1", "hard") for n in ("dler", "da_dler")}
    return [claim("DA-DLER shorter than DLER on easy problems", "len_easy(DA-DLER) < len_easy(DLER)",
                  f"DLER {fmt(le['dler'])} vs DA-DLER {fmt(le['da_dler'])}", PAPER["da_easy"],
                  verdict_if(_m(le["da_dler"]) < _m(le["dler"]), ctx)),
            claim("DA-DLER keeps accuracy on hard problems", "pass@1_hard(DA-DLER) ≥ pass@1_hard(DLER) − 2 pts",
                  f"DLER {fmt(ah['dler'], 100)} vs DA-DLER {fmt(ah['da_dler'], 100)}", PAPER["da_hard"],
                  verdict_if(_m(ah["da_dler"]) >= _m(ah["dler"]) - 0.02, ctx))]


def merge_claim(A: dict, L: dict, ctx: dict) -> list[str]:
    """Merging recovers >= half of the accuracy DLER lost vs SFT, staying shorter than SFT; inconclusive if DLER
    lost none."""
    lost = _m(A["sft"]) - _m(A["dler"])
    ours = (f"SFT {fmt(A['sft'], 100)} → DLER {fmt(A['dler'], 100)} → merged {fmt(A['dler_merged'], 100)}; "
            f"length {fmt(L['dler_merged'])}")
    crit = "SFT − DLER = loss > 0; pass@1(merged) ≥ pass@1(DLER) + loss/2 and len(merged) < len(SFT)"
    if not np.isfinite(lost) or lost <= 0:
        verdict = "inconclusive (DLER lost no accuracy to recover)" if np.isfinite(lost) else verdict_if(None, ctx)
    else:
        verdict = verdict_if(_m(A["dler_merged"]) >= _m(A["dler"]) + lost / 2 and
                             _m(L["dler_merged"]) < _m(L["sft"]), ctx)
    return claim("update-selective merge recovers accuracy lost to over-shortening", crit, ours, PAPER["merge"],
                 verdict)


# ----------------------------------------------------------------------------------------------- LSPO
def lspo_runs(res: dict) -> str:
    rows = []
    for name, r in res.items():
        filt, total = lspo_filtered(r)
        rows.append([name, fmt(ev(r, "pass@1", "eval_before"), 100), fmt(ev(r, "pass@1"), 100),
                     fmt(ev(r, "length_mean")), fmt(filt, 100), fmt(total, 100),
                     fmt(groups_per_update(r)), fmt([x["iterations"] for x in r], 1, 0)])
    return table(["run", "pass@1 before %", "pass@1 after %", "length after", "filtered by length rule % "
                  "(of accuracy-kept)", "filtered in all % (accuracy + length)", "groups per update",
                  "RL iterations"], rows)


def lspo_claims(res: dict, ctx: dict) -> list[list[str]]:
    claims = []
    for base in [b for b in ("grpo", "dapo", "gspo") if {b, f"lspo_{b}"} <= set(res)]:
        a, b = ev(res[f"lspo_{base}"], "pass@1"), ev(res[base], "pass@1")
        share = lspo_filtered(res[f"lspo_{base}"])[0]
        claims.append(claim(f"LSPO on {base.upper()} raises accuracy at equal updates",
                            f"pass@1(LSPO-{base}) > pass@1({base}) by > 2 SE",
                            f"{fmt(b, 100)} → {fmt(a, 100)}; filtered {fmt(share, 100)} %", PAPER[f"lspo_{base}"],
                            verdict_greater(a, b, ctx)))
    return claims


# ----------------------------------------------------------------------------------------------- HAPO
def hapo_runs(res: dict) -> str:
    rows = [[n, fmt(ev(r, "pass@1"), 100), fmt(ev(r, "length_mean")), fmt(curve_stat(r, "policy/entropy"), 1, 3),
             fmt(curve_stat(r, "policy/entropy", "last"), 1, 3)] for n, r in res.items()]
    return table(["run", "pass@1 after %", "length after", "entropy, mean over steps", "entropy, last step"], rows)


def hapo_claims(res: dict, ctx: dict) -> list[list[str]]:
    A = {n: ev(r, "pass@1") for n, r in res.items()}
    H = {n: curve_stat(r, "policy/entropy") for n, r in res.items()}
    if "hapo" not in res:
        return []
    claims = [] if "dapo" not in res else [
        claim("HAPO beats DAPO in accuracy", "pass@1(HAPO) > pass@1(DAPO) by > 2 SE",
              f"{fmt(A['dapo'], 100)} → {fmt(A['hapo'], 100)}", PAPER["hapo_acc"],
              verdict_greater(A["hapo"], A["dapo"], ctx)),
        claim("HAPO keeps policy entropy higher than DAPO", "mean entropy over steps, HAPO > DAPO by > 2 SE",
              f"DAPO {fmt(H['dapo'], 1, 3)} vs HAPO {fmt(H['hapo'], 1, 3)}", PAPER["hapo_entropy"],
              verdict_greater(H["hapo"], H["dapo"], ctx))]
    for name, what in ABLATIONS.items():
        if name in res:
            claims.append(claim(f"switching off {what} costs accuracy", f"pass@1(HAPO) > pass@1({name}) by > 2 SE",
                                f"{fmt(A[name], 100)} vs HAPO {fmt(A['hapo'], 100)}", PAPER["hapo_ablation"],
                                verdict_greater(A["hapo"], A[name], ctx)))
    return claims


# ----------------------------------------------------------------------------------------------- REPRO
def repro_runs(res: dict) -> str:
    rows = [[n, fmt(ev(r, "pass@1", "eval_before"), 100), fmt(ev(r, "pass@1"), 100),
             fmt(ev(r, "length_mean", "eval_before")), fmt(ev(r, "length_mean"))] for n, r in res.items()]
    return table(["run", "pass@1 before %", "pass@1 after %", "tokens before", "tokens after"], rows)


def repro_claims(res: dict, ctx: dict) -> list[list[str]]:
    claims = []
    for base in [b for b in ("ppo", "grpo") if {b, f"repro_{b}"} <= set(res)]:
        a, b = ev(res[f"repro_{base}"], "pass@1"), ev(res[base], "pass@1")
        la, lb = ev(res[f"repro_{base}"], "length_mean"), ev(res[base], "length_mean")
        claims.append(claim(f"REPRO on {base.upper()} raises accuracy", f"pass@1(REPRO-{base}) > pass@1({base}) "
                            "by > 2 SE", f"{fmt(b, 100)} → {fmt(a, 100)}", PAPER[f"repro_{base}"],
                            verdict_greater(a, b, ctx)))
        claims.append(claim(f"REPRO on {base.upper()} uses fewer response tokens",
                            f"tokens({base}) > tokens(REPRO-{base}) by > 2 SE", f"{fmt(lb)} → {fmt(la)}",
                            PAPER["repro_tokens"], verdict_greater(lb, la, ctx)))
    return claims


# ----------------------------------------------------------------------------------------------- TraceRL
def tracerl_runs(res: dict) -> str:
    rows = [[n, fmt(ev(r, "pass@1", "eval_before"), 100), fmt(ev(r, "pass@1"), 100), fmt(ev(r, "length_mean")),
             fmt(curve_stat(r, "train/loss", "std"), 1, 4), fmt(curve_stat(r, "reward/accuracy", "std"), 100),
             fmt(nonfinite_skips(r), 1, 1)] for n, r in res.items()]
    return table(["run", "pass@1 before %", "pass@1 after %", "length after", "std of step loss",
                  "std of step reward %", "skipped updates"], rows)


def tracerl_claims(res: dict, ctx: dict) -> list[list[str]]:
    """Accuracy before -> after, TraceRL vs the one-step estimator, stability with vs without the value model
    (std of the per-step training loss and the count of skipped / non-finite updates)."""
    claims = []
    for name in ("block_tracerl", "full_tracerl", TRACERL_LR_RUN):
        if name in res:
            b, a = ev(res[name], "pass@1", "eval_before"), ev(res[name], "pass@1")
            claims.append(claim(f"{name}: RL raises accuracy", "pass@1 after > before by > 2 SE",
                                f"{fmt(b, 100)} → {fmt(a, 100)}", "see the paper's numbers below",
                                verdict_greater(a, b, ctx)))
    if "block_tracerl" in res and "block_onestep" in res:
        a, b = ev(res["block_tracerl"], "pass@1"), ev(res["block_onestep"], "pass@1")
        claims.append(claim("TraceRL beats the one-step estimator", "pass@1(block_tracerl) > pass@1(block_onestep) "
                            "by > 2 SE", f"TraceRL {fmt(a, 100)} vs one-step {fmt(b, 100)}", "see below",
                            verdict_greater(a, b, ctx)))
    if "block_tracerl" in res and "block_tracerl_value" in res:
        s0, s1 = curve_stat(res["block_tracerl"], "train/loss", "std"), curve_stat(res["block_tracerl_value"],
                                                                                    "train/loss", "std")
        claims.append(claim("the value model stabilises training", "std of step loss: without > with value by > 2 SE",
                            f"without {fmt(s0, 1, 4)} vs with {fmt(s1, 1, 4)}; skips "
                            f"{fmt(nonfinite_skips(res['block_tracerl']), 1, 1)} vs "
                            f"{fmt(nonfinite_skips(res['block_tracerl_value']), 1, 1)}", "see below",
                            verdict_greater(s0, s1, ctx)))
    return claims


SECTIONS = {  # study: (title, run table, claim rows)
    "dler": ("DLER vs correctness-only GRPO / DAPO (length at the control's budget, T=1 samples)", dler_runs,
             dler_claims),
    "lspo": ("LSPO on GRPO, DAPO, GSPO vs without (equal number of updates)", lspo_runs, lspo_claims),
    "lspo_fill": (f"LSPO as above, the filtered runs (DAPO, LSPO) allowed {FILL_ROUNDS} generation rounds to fill a "
                  "batch",
                  lspo_runs, lspo_claims),
    "hapo": ("HAPO vs DAPO, and each HAPO component switched off alone", hapo_runs, hapo_claims),
    "repro": ("REPRO on PPO and GRPO vs without", repro_runs, repro_claims),
    "tracerl": ("TraceRL on tiny diffusion models", tracerl_runs, tracerl_claims),
    "tracerl_lr": (f"Block TraceRL at lr {TRACERL_LR} (the tracerl study's tiny lr is 1e-4)", tracerl_runs,
                   tracerl_claims)}


def study_claims(name: str, st: dict) -> list[list[str]]:
    """The claim rows (CLAIM_HEADER) of study `name`'s results/<name>.json; [] when it was not run."""
    if st.get("status") != "run" or not st.get("results"):
        return []
    return SECTIONS[name][2](st["results"], context(st["settings"], st["seeds"]))


def summary_markdown(studies: dict, tracerl_paper: dict = PAPER_TRACERL) -> str:
    """results/summary.md from {study: study_json}: settings, the verdict rule, a run table and a claim table each."""
    out = ["# Small-scale reproduction study", "",
           "Generated by `experiments/reproduce.py` from `results/<study>.json`; only the papers' numbers are "
           "typed in (with their spec section). Mean ± sample std over seeds ((n=1): one seed). Accuracy = held-out "
           "pass@1 at T=1 averaged over the samples per problem; length = mean response tokens of those samples.",
           "", f"Verdicts: 'yes'/'no' only with ≥ {MIN_SEEDS} seeds and ≥ {MIN_PROBLEMS} held-out problems, else "
           "'inconclusive' (with whether the criterion held on the means). 'X > Y by > 2 SE': yes if "
           "mean(X) − mean(Y) > 2·sqrt(s_X²/n_X + s_Y²/n_Y), no if mean(X) ≤ mean(Y), inconclusive in between. "
           "Threshold criteria are "
           "checked on the means."]
    paper_shown = False  # the TraceRL paper's numbers once, under the first diffusion study
    for name, (title, runs_fn, _) in SECTIONS.items():
        if name not in studies:
            continue
        st = studies[name]
        out += ["", f"## {title}", ""]
        if st["status"] != "run" or not st["results"]:
            out.append("not run")
            continue
        s = st["settings"]
        out.append(f"Seeds {st['seeds']}, {s['rl_steps']} RL iterations per run, {s['eval_problems']} held-out "
                   f"problems × {s['eval_samples']} samples.")
        out += ["", runs_fn(st["results"]), "", table(CLAIM_HEADER, study_claims(name, st))]
        if name in TRACERL_STUDIES and not paper_shown:
            paper_shown = True
            ref = "\n".join(f"- {k}: {v}" for k, v in tracerl_paper.items())
            out += ["", "The paper's numbers (TraceRL, arXiv 2509.06949):", "", ref]
    return "\n".join(out) + "\n"


def write_report(studies: dict, out_dir: str, tracerl_paper: dict = PAPER_TRACERL) -> list[str]:
    """Writes summary.md, <study>_curves.png and tradeoff.png under `out_dir`; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "summary.md")]
    with open(paths[0], "w") as f:
        f.write(summary_markdown(studies, tracerl_paper))
    for name, st in studies.items():
        if st.get("status") == "run" and st["results"]:
            p = plot_curves(name, st["results"], os.path.join(out_dir, f"{name}_curves.png"))
            paths += [p] if p else []
    p = plot_tradeoff(studies, os.path.join(out_dir, "tradeoff.png"))
    return paths + ([p] if p else [])
