"""Plots of the reproduction study: per-study curves against RL step and the accuracy-length trade-off.

Computed from results/<study>.json only, like the tables of study/report.py.
"""
from __future__ import annotations

import numpy as np

from study.runs import TRACERL_STUDIES
from study.stats import common, ev, mean_std

CURVE_PANELS = {"reward/accuracy": "training accuracy (T=1)", "response/length_mean": "response length (tokens)",
                "policy/entropy": "policy entropy (nats/token)", "train/loss": "training loss"}
_STUDY_PANELS = {"hapo": ("reward/accuracy", "response/length_mean", "policy/entropy"),
                 **{name: ("reward/accuracy", "response/length_mean", "train/loss") for name in TRACERL_STUDIES}}


def curve_series(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, sample std (ddof 1; 0 for one seed) over seeds) of a curve metric at the steps every seed
    logged with a finite value."""
    per_seed = [{c["step"]: c[key] for c in r.get("curve", []) if c.get(key) is not None and np.isfinite(c[key])}
                for r in runs]
    steps = sorted(set.intersection(*(set(d) for d in per_seed))) if per_seed else []
    vals = np.asarray([[d[t] for t in steps] for d in per_seed], np.float64).reshape(len(per_seed), len(steps))
    std = vals.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(len(steps))
    return np.asarray(steps, np.float64), vals.mean(axis=0), std


def plot_curves(study: str, results: dict, path: str) -> str | None:
    """`path`: one panel per metric (accuracy, length[, entropy | loss]) vs RL iteration, mean ± std band per run."""
    from matplotlib.figure import Figure

    keys = _STUDY_PANELS.get(study, ("reward/accuracy", "response/length_mean"))
    fig = Figure(figsize=(5.0 * len(keys), 4.0), dpi=100)
    drawn = 0
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for name, runs in results.items():
            steps, mean, std = curve_series(runs, key)
            if steps.size == 0:
                continue
            ax.plot(steps, mean, marker="o" if steps.size < 8 else None, label=name)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
            drawn += 1
        ax.set_xlabel("RL iteration")
        ax.set_title(CURVE_PANELS.get(key, key))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if not drawn:
        return None
    fig.suptitle(f"{study}: curves (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def tradeoff_points(studies: dict) -> tuple[dict, tuple | None]:
    """{run: (length mean, length std, pass@1 mean, pass@1 std)} after RL for every AR run (DLER-study runs at
    the control's budget), and the SFT start point (or None)."""
    points, src, start = {}, {}, None
    for name, st in studies.items():
        if name in TRACERL_STUDIES or st.get("status") != "run":
            continue
        for run, seeds in st["results"].items():
            if seeds and "eval_common" in seeds[0]:
                L, A = common(seeds, "length_mean"), common(seeds, "pass@1")
            else:
                L, A = ev(seeds, "length_mean"), ev(seeds, "pass@1")
            # A run shared by studies (same work dir) is one point; a same-named different run gets "(study)".
            key = run if run not in src or src[run] == seeds[0].get("workdir") else f"{run} ({name})"
            if run == "sft":
                start = (*mean_std(L)[:2], *mean_std(A)[:2])
            elif key not in points:
                points[key], src[key] = (*mean_std(L)[:2], *mean_std(A)[:2]), seeds[0].get("workdir")
            if start is None and seeds and seeds[0].get("eval_before"):
                start = (*mean_std(ev(seeds, "length_mean", "eval_before"))[:2],
                         *mean_std(ev(seeds, "pass@1", "eval_before"))[:2])
    return points, start


def plot_tradeoff(studies: dict, path: str) -> str | None:
    """`path`: held-out pass@1 vs mean response length after RL, one point per run, with the SFT start."""
    from matplotlib.figure import Figure

    points, start = tradeoff_points(studies)
    if not points:
        return None
    fig = Figure(figsize=(7.0, 5.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for run, (lm, ls, am, as_) in points.items():
        ax.errorbar(lm, 100 * am, xerr=ls, yerr=100 * as_, fmt="o", capsize=3)
        ax.annotate(run, (lm, 100 * am), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if start is not None:
        ax.errorbar(start[0], 100 * start[2], xerr=start[1], yerr=100 * start[3], fmt="*", ms=14, color="k")
        ax.annotate("SFT start", (start[0], 100 * start[2]), fontsize=8, xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("mean response length (tokens, T=1)")
    ax.set_ylabel("held-out pass@1 (%)")
    ax.set_title("accuracy-length trade-off after RL")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path
