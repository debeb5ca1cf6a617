"""Runs the studies of study/runs.py and assembles what results/<study>.json holds.

Every run of a study gets the same number of RL iterations (`train.time_budget_s = 0`) and the same held-out set
(`task.eval_seed` is fixed, so every seed sees the same problems). AR runs live under
`<workroot>/runs/<run key>/seed<k>`, the TraceRL runs under `<workroot>/tracerl`; a finished run is read back from
its `result.json`, never trained again. The DLER study adds its evaluations at a common budget and the merged
checkpoint (study/dler.py).
"""
from __future__ import annotations

import os

from study import dler, tracerl
from study.common import RESULT_FILE, ROOT, load_json, make_config, read_curve, run_key, train, write_json
from study.runs import STUDIES, TRACERL_STUDY_RUNS, RunSpec, Settings, kinds, study_specs


def run_one(spec: RunSpec, seed: int, s: Settings, workroot: str) -> dict:
    """Trains (or loads the finished result of) one run; returns eval before/after, curve, overrides, workdir."""
    workdir = os.path.join(workroot, "runs", run_key(spec, seed, s))
    path = os.path.join(workdir, RESULT_FILE)
    if os.path.exists(path):
        return load_json(path)
    config = make_config(spec, seed, s)
    print(f"== {spec.name} (configs/{spec.module}.py:{spec.arg}) seed {seed} -> {workdir}", flush=True)
    out = train(config, workdir)
    result = {"seed": seed, "module": spec.module, "arg": spec.arg, "overrides": [list(o) for o in spec.overrides],
              "eval_before": out["eval_before"], "eval_after": out["eval_after"], "iterations": out["iterations"],
              "curve": read_curve(workdir), "workdir": workdir}
    write_json(path, result)
    return result


def run_study(study: str, seeds, s: Settings, workroot: str, only=()) -> dict:
    """{run name: [per-seed result]} of one AR study (study_specs), plus the DLER extras when DLER is among them."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; known: {', '.join(STUDIES)}.")
    results = {spec.name: [run_one(spec, seed, s, workroot) for seed in seeds] for spec in study_specs(study, only)}
    if study == "dler" and "dler" in results:
        results.update(dler.run_dler_extras(results, seeds, s, workroot))
    return results


def run_tracerl(seeds, s: Settings, sft_steps: int, workroot: str, study: str = "tracerl") -> dict:
    """A TraceRL study (its TRACERL_STUDY_RUNS; outside --smoke from the shipped diffusion SFT checkpoints when
    they exist). Every TraceRL study shares `workroot/tracerl`, so a run in two studies trains once."""
    return tracerl.run_tracerl_study(seeds=list(seeds), rl_steps=s.rl_steps, eval_problems=s.eval_problems,
                                     eval_samples=s.eval_samples, sft_steps=sft_steps,
                                     workroot=os.path.join(workroot, "tracerl"), smoke=s.smoke, use_shipped=True,
                                     prompts_per_step=s.tracerl_prompts, runs=TRACERL_STUDY_RUNS[study])


def tracerl_starts(s: Settings, study: str = "tracerl") -> dict:
    """{kind: where the TraceRL runs of `kind` in `study` start}: the shipped checkpoint (path from the repository
    root) or the one the study builds with --sft_steps (see tracerl.ensure_sft)."""
    return {k: os.path.relpath(tracerl.shipped_sft_dir(k, s.smoke), ROOT) if tracerl.shipped_sft_dir(k, s.smoke)
            else "built by the study (sft_steps)" for k in kinds(TRACERL_STUDY_RUNS[study])}


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
