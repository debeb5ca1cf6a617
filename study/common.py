"""What every part of the study shares: a run's config and key, training one run, and the files it keeps.

Runs are keyed on their resolved settings (`run_key`), so an identical run shared by several studies (the DAPO
control of DLER, LSPO and HAPO) trains once, and a finished run (its `result.json`) is never trained again: the
study is restartable.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os

from configs.base import shrink_for_smoke
from study.runs import ALL_STUDIES, RunSpec, Settings

# The repository root: configs name their warm starts relative to it, and results/*.json name paths from it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-iteration metrics.jsonl keys kept in results/<study>.json (those a run logged).
CURVE_KEYS = ("reward/accuracy", "response/length_mean", "response/truncated_frac", "policy/entropy", "train/loss",
              "train/skipped", "kept_fraction", "num_groups", "lspo_kept_fraction", "lspo_kept_of_candidates",
              "lspo_num_candidates", "rollout/kept_frac",
              "rollout/rounds", "da_dler_virtual_trunc", "overlong_penalty", "repro/adv_abs_mean", "time/rollout_s",
              "time/update_s")
RESULT_FILE = "result.json"
EVAL_COMMON_FILE = "eval_common.json"
_NOT_IN_RUN_KEYS = ("tracerl_prompts", "ar_start")


def _set(config, dotted: str, value) -> None:
    section, key = dotted.split(".")
    getattr(config, section)[key] = value


def make_config(spec: RunSpec, seed: int, s: Settings):
    """The run's ConfigDict: the method config, its overrides, then the study-wide budget and evaluation."""
    c = importlib.import_module(f"configs.{spec.module}").get_config(spec.arg)
    for dotted, value in spec.overrides:
        _set(c, dotted, value)
    if s.smoke:
        shrink_for_smoke(c)
    if s.ar_start:
        c.model.sft_dir = s.ar_start
    c.model.sft_dir = os.path.join(ROOT, c.model.sft_dir) if not os.path.isabs(c.model.sft_dir) else c.model.sft_dir
    c.seed = seed
    c.train.num_steps, c.train.time_budget_s = s.rl_steps, 0.0  # same number of updates, no wall-clock cut
    c.train.checkpoint_every = max(1, min(c.train.checkpoint_every, s.rl_steps))  # an interrupted run resumes
    c.train.export_hf = True  # the DLER study evaluates and merges the exported policies
    c.eval.num_problems, c.eval.samples, c.eval.greedy = s.eval_problems, s.eval_samples, s.greedy
    return c


def warm_start_digest(config) -> str:
    """sha256 of the SFT weights a config starts from ("" for other inits): a rebuilt warm start is a new run."""
    if config.model.init != "sft":
        return ""
    with open(os.path.join(config.model.sft_dir, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_key(spec: RunSpec, seed: int, s: Settings) -> str:
    """Directory name of a run: module, arg and a hash of everything that changes its result (not its name),
    including the bytes of the SFT checkpoint it starts from."""
    blob = json.dumps({"module": spec.module, "arg": spec.arg, "overrides": [list(o) for o in spec.overrides],
                       "seed": seed, "warm_start": warm_start_digest(make_config(spec, seed, s)),
                       **{k: v for k, v in s._asdict().items() if k not in _NOT_IN_RUN_KEYS}},
                      sort_keys=True)
    tag = f"{spec.module}_{spec.arg}".replace(",", "_")
    return f"{tag}_{hashlib.sha1(blob.encode()).hexdigest()[:10]}/seed{seed}"


def train(config, workdir: str) -> dict:
    """`loop.run(config, workdir)`; a preempted run exits with one sentence (the same command resumes it)."""
    from jaxrl_reason.train import loop

    out = loop.run(config, workdir)
    if out.get("preempted"):
        raise SystemExit(f"run {workdir} was preempted; the same command resumes it from its last checkpoint.")
    return out


def read_curve(workdir: str, keys=CURVE_KEYS) -> list[dict]:
    """Per-iteration records of `workdir/metrics.jsonl` (those with a train/loss), restricted to `keys` (None:
    every key)."""
    from jaxrl_reason.train.metrics import read_metrics

    out = []
    for r in read_metrics(workdir):
        if "train/loss" in r:
            out.append(r if keys is None else {"step": int(r["step"]), **{k: r[k] for k in keys if k in r}})
    return out


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Writes `obj` through a temporary file: a killed study never leaves a half-written result behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def read_study_jsons(out_dir: str) -> dict:
    """{study: results/<study>.json} of the studies (ALL_STUDIES order) that have a JSON file in `out_dir`."""
    paths = {name: os.path.join(out_dir, f"{name}.json") for name in ALL_STUDIES}
    return {name: load_json(path) for name, path in paths.items() if os.path.exists(path)}
