"""The studies of the small-scale reproduction (issue 6) as data, and the machinery that runs them.

A run is `RunSpec(name, module, arg, overrides)`: `configs/<module>.py:get_config(arg)` plus dotted overrides. A
study is a tuple of RunSpecs trained with the same budget (the same number of RL iterations, hence optimizer
updates, `train.time_budget_s = 0`) and evaluated on the same held-out set (`task.eval_seed` is fixed, so every
seed sees the same problems). Runs are keyed on their resolved settings (`run_key`), so an identical run shared by
several studies (the DAPO control of DLER, LSPO and HAPO) trains once, and a finished run (its `result.json`)
is never trained again: the study is restartable.

The DLER study also evaluates every checkpoint, the SFT start and the merged DLER checkpoint at the control's budget
(experiments/_repro_dler.py).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs.base import shrink_for_smoke  # noqa: E402

# Difficulty tiers of the arithmetic task (level = (n_terms - 3) * 3 + (digits - 1)): 1-digit terms are easy,
# 3-digit terms hard.
TIERS = {"easy": (0, 3, 6), "medium": (1, 4, 7), "hard": (2, 5, 8)}
# Per-iteration metrics.jsonl keys kept in results/<study>.json (those a run logged).
CURVE_KEYS = ("reward/accuracy", "response/length_mean", "response/truncated_frac", "policy/entropy", "train/loss",
              "train/skipped", "kept_fraction", "num_groups", "lspo_kept_fraction", "lspo_kept_of_candidates",
              "lspo_num_candidates", "rollout/kept_frac",
              "rollout/rounds", "da_dler_virtual_trunc", "overlong_penalty", "repro/adv_abs_mean", "time/rollout_s",
              "time/update_s")
RESULT_FILE = "result.json"
EVAL_COMMON_FILE = "eval_common.json"
EVAL_BEFORE_DIR = "eval_before"  # <workroot>/eval_before/<eval_before_key>.json: start-policy evaluations


class RunSpec(NamedTuple):
    """One method of a study: configs/<module>.py:<arg> with `overrides` ((dotted key, value), ...)."""

    name: str
    module: str
    arg: str = "tiny"
    overrides: tuple = ()


_GRPO, _DAPO = RunSpec("grpo", "grpo"), RunSpec("dapo", "dapo")
_HAPO_MINI_BATCHES = 4
STUDIES = {
    # DLER study: correctness-only controls, DLER, DA-DLER (merging is added by run_dler_extras).
    "dler": (_GRPO, _DAPO, RunSpec("dler", "dler"), RunSpec("da_dler", "da_dler")),
    # LSPO study: each base with and without LSPO. configs/grpo.py:tiny drops GRPO's KL; so does its LSPO twin here.
    "lspo": (_GRPO, _DAPO, RunSpec("gspo", "gspo"),
             RunSpec("lspo_grpo", "lspo", "grpo,tiny", (("loss.kl_coef", 0.0),)),
             RunSpec("lspo_dapo", "lspo", "dapo,tiny"), RunSpec("lspo_gspo", "lspo", "gspo,tiny")),
    # HAPO study: HAPO vs DAPO and each of the four components switched off alone. Every run (the DAPO
    # control too) makes _HAPO_MINI_BATCHES optimizer updates per rollout batch: with one, every update is
    # on-policy (ratio 1) and component D's adaptive clip bounds never bind (the paper uses 16).
    "hapo": tuple(RunSpec(name, module, "tiny", overrides + (("optim.mini_batches", _HAPO_MINI_BATCHES),))
                  for name, module, overrides in (
                      ("dapo", "dapo", ()), ("hapo", "hapo", ()),
                      ("hapo_no_A_temperature", "hapo", (("hapo.tau", 0.0),)),
                      ("hapo_no_B_token_group_adv", "hapo", (("advantage.estimator", "grpo"),)),
                      ("hapo_no_C_redistribution", "hapo", (("hapo.redistribute", False),)),
                      ("hapo_no_D_adaptive_clip", "hapo", (("hapo.adaptive_clip", False),)))),
    # REPRO study: REPRO on PPO and on GRPO vs the same without.
    "repro": (RunSpec("ppo", "ppo"), RunSpec("repro_ppo", "repro", "ppo,tiny"), _GRPO,
              RunSpec("repro_grpo", "repro", "grpo,tiny")),
}
# The LSPO study again, with room to fill every batch: the filtered runs (DAPO's zero-variance filter, LSPO's length
# filter) may draw up to FILL_ROUNDS generation rounds instead of base.py's 4. From a high-accuracy start few groups
# pass the filters, and with 4 rounds the LSPO runs trained on ~10 of 16 groups per update (their "groups per update").
# GRPO and GSPO do not filter: their runs are those of "lspo".
FILL_ROUNDS = 12
STUDIES["lspo_fill"] = tuple(
    spec._replace(overrides=spec.overrides + (("filter.max_rounds", FILL_ROUNDS),))
    if spec.name in ("dapo", "lspo_grpo", "lspo_dapo", "lspo_gspo") else spec for spec in STUDIES["lspo"])
ALL_STUDIES = ("dler", "lspo", "lspo_fill", "hapo", "repro", "tracerl", "tracerl_lr")
# The studies of diffusion policies: their runs are experiments/_repro_tracerl.py's STUDY_RUNS[study].
TRACERL_STUDIES = ("tracerl", "tracerl_lr")
# The block TraceRL lr of tracerl_lr (the tiny configs' 1e-4 lowered the block model's accuracy), as the run name,
# its configs/tracerl.py arg, the report title and the README-table name spell it; TRACERL_LR_RUN is that run.
TRACERL_LR = "1e-5"
TRACERL_LR_RUN = f"block_tracerl_lr{TRACERL_LR}"
# What reproduce.py runs by default: a study per claim of issue 6. Two follow-ups run when named: lspo_fill, a
# control of lspo that only matters where the filters reject most groups (a high-accuracy start), and tracerl_lr,
# block TraceRL at the lr a probe chose after the tracerl study (--studies=lspo_fill,tracerl_lr).
DEFAULT_STUDIES = tuple(name for name in ALL_STUDIES if name not in ("lspo_fill", "tracerl_lr"))


class Settings(NamedTuple):
    """What every run of one invocation shares (part of each run's key)."""

    rl_steps: int
    eval_problems: int
    eval_samples: int
    greedy: bool
    smoke: bool = False
    tracerl_prompts: int = 0  # > 0: the TraceRL runs' rollout prompts per iteration (--quick); not in AR run keys
    # The AR runs' warm start ("" = the method config's `model.sft_dir`, the shipped checkpoints/arith_tiny_sft).
    # Not in run keys by path: its weights are, by their digest (`warm_start_digest`).
    ar_start: str = ""


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


def eval_before_key(config) -> str:
    """Hash of everything the start policy's held-out evaluation depends on (train/loop.py evaluates it with the
    `eval` settings, the rollout lengths and the key PRNGKey(seed + 1)): the model section and the bytes of its
    warm start (not its path: a moved or copied work root keeps its evaluations), the task, the eval section, the
    lengths and the seed. Runs from one start with one budget (GRPO, DAPO, GSPO, LSPO, HAPO, REPRO, PPO at a
    study's settings) share it; DLER (64-token budget) does not.
    A diffusion policy's evaluation also depends on its sampler (the `tracerl` section, less the training
    estimator), so TraceRL and the one-step estimator from one start share it too."""
    r = config.rollout
    model = {k: v for k, v in config.model.to_dict().items() if k != "sft_dir"}  # the weights: by their digest
    content = {"model": model, "task": config.task.to_dict(), "eval": config.eval.to_dict(),
               "lengths": [r.max_prompt_len, r.max_new_tokens], "seed": config.seed,
               "warm_start": warm_start_digest(config)}
    if "tracerl" in config:  # diffusion policies only
        content["sampler"] = {k: v for k, v in config.tracerl.to_dict().items() if k != "estimator"}
    blob = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def read_curve(workdir: str) -> list[dict]:
    """Per-iteration records of `workdir/metrics.jsonl` (those with a train/loss), restricted to CURVE_KEYS."""
    from jaxrl_reason.train.metrics import read_metrics

    out = []
    for r in read_metrics(workdir):
        if "train/loss" in r:
            out.append({"step": int(r["step"]), **{k: r[k] for k in CURVE_KEYS if k in r}})
    return out


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)
    os.replace(tmp, path)


def train_from_start(config, workdir: str, workroot: str) -> dict:
    """`loop.run(config, workdir)` with the start policy's evaluation shared through `workroot/eval_before/`
    (eval_before_key): read when a run from the same start already stored it, stored otherwise. A preempted run
    exits with one sentence (the same command resumes it)."""
    from jaxrl_reason.train import loop

    before_path = os.path.join(workroot, EVAL_BEFORE_DIR, eval_before_key(config) + ".json")
    before = load_json(before_path) if os.path.exists(before_path) else None
    out = loop.run(config, workdir, eval_before=before)
    if out.get("preempted"):
        raise SystemExit(f"run {workdir} was preempted; the same command resumes it from its last checkpoint.")
    if before is None:
        write_json(before_path, out["eval_before"])
    return out


def run_one(spec: RunSpec, seed: int, s: Settings, workroot: str) -> dict:
    """Trains (or loads the finished result of) one run; returns eval before/after, curve, overrides, workdir."""
    workdir = os.path.join(workroot, "runs", run_key(spec, seed, s))
    path = os.path.join(workdir, RESULT_FILE)
    if os.path.exists(path):
        return load_json(path)
    config = make_config(spec, seed, s)
    print(f"== {spec.name} (configs/{spec.module}.py:{spec.arg}) seed {seed} -> {workdir}", flush=True)
    out = train_from_start(config, workdir, workroot)
    result = {"seed": seed, "module": spec.module, "arg": spec.arg, "overrides": [list(o) for o in spec.overrides],
              "eval_before": out["eval_before"], "eval_after": out["eval_after"], "iterations": out["iterations"],
              "curve": read_curve(workdir), "workdir": workdir}
    write_json(path, result)
    return result


def _load_sibling(name: str):
    """Imports experiments/<name>.py (not a package) as `experiments_<name>`, as tests/test_experiments.py does."""
    key = f"experiments_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, "experiments", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def study_specs(study: str, only=()) -> tuple:
    """The runs of `study` (STUDIES), only those named in `only` when it is not empty (reproduce.py --runs)."""
    return tuple(spec for spec in STUDIES.get(study, ()) if not only or spec.name in only)


def run_study(study: str, seeds, s: Settings, workroot: str, only=()) -> dict:
    """{run name: [per-seed result]} of one AR study (study_specs), plus the DLER extras when DLER is among them."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; known: {', '.join(STUDIES)}.")
    results = {spec.name: [run_one(spec, seed, s, workroot) for seed in seeds] for spec in study_specs(study, only)}
    if study == "dler" and "dler" in results:
        import _repro_dler  # imports this module

        results.update(_repro_dler.run_dler_extras(results, seeds, s, workroot))
    return results


def read_study_jsons(out_dir: str) -> dict:
    """{study: results/<study>.json} of the studies (ALL_STUDIES order) that have a JSON file in `out_dir`."""
    paths = {name: os.path.join(out_dir, f"{name}.json") for name in ALL_STUDIES}
    return {name: load_json(path) for name, path in paths.items() if os.path.exists(path)}


def tracerl_paper_numbers() -> dict | None:
    """The TraceRL paper's numbers for the report (experiments/_repro_tracerl.py), None without that module."""
    return getattr(tracerl_module(), "PAPER_NUMBERS_TRACERL", None)


def tracerl_module():
    """experiments/_repro_tracerl.py if it exists and imports, else None (the study is then "not run")."""
    if not os.path.exists(os.path.join(ROOT, "experiments", "_repro_tracerl.py")):
        return None
    try:
        return _load_sibling("_repro_tracerl")
    except Exception as e:  # noqa: BLE001 - another helper's module; its failure must not stop the AR studies
        print(f"experiments/_repro_tracerl.py does not import ({type(e).__name__}: {e}); TraceRL not run", flush=True)
        return None


def run_tracerl(seeds, s: Settings, sft_steps: int, workroot: str, study: str = "tracerl") -> dict | None:
    """A TraceRL study (TRACERL_STUDIES; experiments/_repro_tracerl.run_tracerl_study with its STUDY_RUNS; outside
    --smoke from the shipped diffusion SFT checkpoints when they exist), or None when that module is absent. Every
    TraceRL study shares `workroot/tracerl`, so a run in two studies trains once."""
    mod = tracerl_module()
    if mod is None:
        return None
    return mod.run_tracerl_study(seeds=list(seeds), rl_steps=s.rl_steps, eval_problems=s.eval_problems,
                                 eval_samples=s.eval_samples, sft_steps=sft_steps,
                                 workroot=os.path.join(workroot, "tracerl"), smoke=s.smoke, use_shipped=True,
                                 prompts_per_step=s.tracerl_prompts, runs=mod.STUDY_RUNS[study])


def tracerl_starts(s: Settings, study: str = "tracerl") -> dict:
    """{kind: where the TraceRL runs of `kind` in `study` start}: the shipped checkpoint (path from the repository
    root) or the one the study builds with --sft_steps (see _repro_tracerl.ensure_sft)."""
    mod = tracerl_module()
    return {k: os.path.relpath(mod.shipped_sft_dir(k, s.smoke), ROOT) if mod.shipped_sft_dir(k, s.smoke)
            else "built by the study (sft_steps)" for k in (mod.kinds(mod.STUDY_RUNS[study]) if mod else [])}


def study_json(study: str, results: dict | None, s: Settings, seeds, only=(), **extra_settings) -> dict:
    """What results/<study>.json holds: the settings, the run definitions and the per-seed results."""
    specs = {spec.name: {"module": spec.module, "arg": spec.arg, "overrides": [list(o) for o in spec.overrides]}
             for spec in study_specs(study, only)}
    if study == "dler" and "dler" in specs:
        specs["sft"] = {"checkpoint": "the policy RL starts from (model.sft_dir)"}
        specs["dler_merged"] = {"merge": "experiments/merge.merge_checkpoints(base=sft, tuned=dler, top_frac=0.25, "
                                         "scale=0.7, granularity=tensor)"}
    return {"study": study, "status": "run" if results is not None else "not run",
            "settings": {**s._asdict(), **extra_settings}, "seeds": list(seeds), "runs": specs,
            "results": results or {}}

