"""Training curves of one or more RL runs: one PNG per metric, one line per run.

  python experiments/plot.py --workdirs=runs/grpo_tiny,runs/dler_tiny --out=plots/ \
      [--metrics=reward/accuracy,response/length_mean,policy/entropy,eval/pass@1] [--smooth=0.0]

Reads each run's `metrics.jsonl` (`train/metrics.read_metrics`); x is the logged `step` (the RL iteration; the
held-out evaluations sit at step 0 and after the last iteration). Records without the metric, or with a null
(non-finite) value, are skipped. Matplotlib through `Figure` + the Agg canvas: no pyplot state, no display.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from absl import flags

DEFAULT_METRICS = ("reward/accuracy", "response/length_mean", "policy/entropy", "eval/pass@1")
_LABELS = {"reward/accuracy": "training reward (accuracy)", "response/length_mean": "response length (tokens)",
           "policy/entropy": "policy entropy (nats / token)", "eval/pass@1": "held-out pass@1"}


def load_runs(workdirs: list[str]) -> dict[str, list[dict]]:
    """{run name: records}; the name is the workdir's base name, made unique with its parent when needed."""
    from jaxrl_reason.train.metrics import read_metrics

    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    runs = {}
    for w, name in zip(workdirs, names):
        if names.count(name) > 1:
            name = os.path.join(os.path.basename(os.path.dirname(os.path.normpath(w))), name)
        if name in runs:
            raise ValueError(f"workdir {w!r} is given twice.")
        runs[name] = read_metrics(w)
    return runs


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the records that hold a finite value of it, sorted by step."""
    pts = sorted((r["step"], float(r[key])) for r in records if r.get(key) is not None and np.isfinite(r[key]))
    steps = np.asarray([p[0] for p in pts], np.float64)
    return steps, np.asarray([p[1] for p in pts], np.float64)


def ema(values_T: np.ndarray, smooth: float) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard-style) with weight `smooth` in [0, 1)."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}.")
    out, acc, norm = np.empty_like(values_T), 0.0, 0.0
    for i, v in enumerate(values_T):
        acc, norm = smooth * acc + (1 - smooth) * v, smooth * norm + (1 - smooth)
        out[i] = acc / norm
    return out


def plot_metric(runs: dict[str, list[dict]], key: str, smooth: float = 0.0):
    """A matplotlib Figure of `key` vs step with one line per run that logged it (None if no run did)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for name, records in runs.items():
        steps, values = series(records, key)
        if steps.size == 0:
            continue
        ax.plot(steps, ema(values, smooth) if smooth else values, marker="o" if steps.size < 4 else None,
                label=name)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("RL iteration")
    ax.set_ylabel(_LABELS.get(key, key))
    ax.set_title(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def require_matplotlib() -> None:
    """One sentence naming what to install when matplotlib is missing (the base install has no plotting)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plotting needs matplotlib, which the base install does not include: pip install "
                          "matplotlib (or the extra: pip install -e '.[nb]').") from None


def write_plots(runs: dict[str, list[dict]], out_dir: str, metrics=DEFAULT_METRICS, smooth: float = 0.0) -> list:
    """Writes `out_dir/<metric with / -> _>.png` for every metric some run logged; returns the paths."""
    require_matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for key in metrics:
        fig = plot_metric(runs, key, smooth)
        if fig is None:
            print(f"no run logged {key!r}; skipped", flush=True)
            continue
        path = os.path.join(out_dir, key.replace("/", "_").replace("@", "_at_") + ".png")
        fig.savefig(path)
        paths.append(path)
    return paths


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """A fresh FlagValues parsed from `argv` (argv[0] is the program name)."""
    fv = flags.FlagValues()
    flags.DEFINE_list("workdirs", None, "Comma-separated run directories holding metrics.jsonl.", flag_values=fv)
    flags.DEFINE_string("out", "plots", "Output directory for the PNG files.", flag_values=fv)
    flags.DEFINE_list("metrics", list(DEFAULT_METRICS), "Metric keys to plot.", flag_values=fv)
    flags.DEFINE_float("smooth", 0.0, "EMA smoothing weight in [0, 1).", flag_values=fv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(fv.get_help())
        raise SystemExit(0)
    fv(list(argv))
    if not fv.workdirs:
        raise ValueError("--workdirs is required.")
    return fv


def main(argv: list[str]) -> list:
    fv = parse_flags(argv)
    paths = write_plots(load_runs(fv.workdirs), fv.out, fv.metrics, fv.smooth)
    print("\n".join(paths), flush=True)
    return paths


if __name__ == "__main__":
    from experiments._cli import run_plain

    run_plain(main, sys.argv)
