"""The study's command line: `experiments/reproduce.py` calls `main(sys.argv)` (its docstring lists the flags).

The mode defaults (QUICK, FULL, SMOKE) are overridden by explicit flags; `main` trains every run the chosen
studies need (in a worker pool with --workers > 1), writes `<out>/<study>.json` for each, then the report over every
study JSON in `<out>` (study/report.py).
"""
from __future__ import annotations

import json
import os
import time

from absl import flags

from study import pool, report, runner
from study.common import ROOT, read_study_jsons
from study.runs import ALL_STUDIES, DEFAULT_STUDIES, TRACERL_STUDIES, Settings, study_specs

# tracerl_prompts: the TraceRL runs' prompts per iteration (0 = configs/tracerl.py's 16). --quick uses 4: one block
# TraceRL iteration of 16 prompts x 8 samples takes ~2 min on one core of the 2-core CPU.
QUICK = {"seeds": 1, "rl_steps": 2, "eval_problems": 100, "eval_samples": 2, "sft_steps": 300, "greedy": False,
         "tracerl_prompts": 4}
FULL = {"seeds": 3, "rl_steps": 100, "eval_problems": 500, "eval_samples": 4, "sft_steps": 1500, "greedy": True,
        "tracerl_prompts": 0}
SMOKE = {"seeds": 1, "rl_steps": 1, "eval_problems": 9, "eval_samples": 2, "sft_steps": 2, "greedy": False,
         "tracerl_prompts": 0}


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """A fresh FlagValues parsed from `argv` (argv[0] is the program name); no global flag state."""
    fv = flags.FlagValues()
    flags.DEFINE_bool("quick", False, "Quick mode: 1 seed, 2 RL iterations, 100 problems x 2 samples, no greedy, "
                      "4 TraceRL prompts per iteration.",
                      flag_values=fv)
    flags.DEFINE_bool("smoke", False, "Micro scale (random 1-layer model, tests only).", flag_values=fv)
    flags.DEFINE_list("studies", list(DEFAULT_STUDIES), "Studies to run (known: "
                      f"{', '.join(ALL_STUDIES)}).", flag_values=fv)
    flags.DEFINE_integer("seeds", None, "Number of seeds (0..n-1); default 3, quick 1.", flag_values=fv)
    flags.DEFINE_string("out", "results", "Output directory (JSON, summary.md, PNGs; runs under <out>/work).",
                        flag_values=fv)
    flags.DEFINE_integer("rl_steps", None, "RL iterations per run; default 100, quick 2.", flag_values=fv)
    flags.DEFINE_integer("eval_problems", None, "Held-out problems; default 500, quick 100.", flag_values=fv)
    flags.DEFINE_integer("eval_samples", None, "T=1 samples per problem; default 4, quick 2.", flag_values=fv)
    flags.DEFINE_integer("sft_steps", None, "Diffusion SFT steps when the TraceRL study builds its own start (--smoke, "
                         "or no shipped checkpoints/arith_tiny_sft_<kind>); default 1500, quick 300.", flag_values=fv)
    flags.DEFINE_string("jax_cache", "", "Persistent XLA compilation cache directory ('' = <out>/work/xla_cache, "
                        "'none' = off); identical samplers of different runs then compile once.", flag_values=fv)
    flags.DEFINE_string("start", "", "The AR runs' SFT warm start, an HF checkpoint directory ('' = the shipped "
                        "checkpoints/arith_tiny_sft; checkpoints/arith_tiny_sft_plateau = the plateaued one).",
                        flag_values=fv)
    flags.DEFINE_list("runs", [], "Only these runs of the chosen autoregressive studies (names as in "
                      "results/<study>.json, e.g. grpo,lspo_grpo); empty = all. Claims whose runs are missing are "
                      "left out of the tables.", flag_values=fv)
    flags.DEFINE_integer("workers", 1, "Processes training runs side by side, each pinned to one core "
                         "(study/pool.py); 2 on a 2-core CPU nearly halves the wall time.", flag_values=fv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(fv.get_help())
        raise SystemExit(0)
    fv(list(argv))
    if fv.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {fv.workers}.")
    if fv.start and not os.path.isfile(os.path.join(fv.start, "model.safetensors")):
        raise ValueError(f"--start={fv.start} is not an SFT checkpoint directory (no model.safetensors in it).")
    unknown = [s for s in fv.studies if s not in ALL_STUDIES]
    if unknown:
        raise ValueError(f"unknown studies {unknown}; choose from {', '.join(ALL_STUDIES)}.")
    _check_runs(fv.runs, fv.studies)
    return fv


def _check_runs(runs: list[str], studies: list[str]) -> None:
    """--runs names runs of the chosen autoregressive studies only."""
    if not runs:
        return
    diffusion = [name for name in studies if name in TRACERL_STUDIES]
    if diffusion:
        ar = ", ".join(name for name in ALL_STUDIES if name not in TRACERL_STUDIES)
        raise ValueError(f"--runs applies to the autoregressive studies ({ar}), not {', '.join(diffusion)}.")
    known = {spec.name for st in studies for spec in study_specs(st)}
    if set(runs) - known:
        raise ValueError(f"--runs: {sorted(set(runs) - known)} are not runs of {', '.join(studies)}; "
                         f"those are {', '.join(sorted(known))}.")


def resolve(fv) -> tuple[list[int], Settings, int]:
    """(seeds, Settings, sft_steps) from the mode defaults and the explicit flags."""
    d = SMOKE if fv.smoke else QUICK if fv.quick else FULL
    pick = lambda name: d[name] if fv[name].value is None else fv[name].value  # noqa: E731
    for name in ("seeds", "rl_steps", "eval_problems", "eval_samples", "sft_steps"):
        if pick(name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {pick(name)}.")
    s = Settings(rl_steps=pick("rl_steps"), eval_problems=pick("eval_problems"), eval_samples=pick("eval_samples"),
                 greedy=d["greedy"], smoke=fv.smoke, tracerl_prompts=d["tracerl_prompts"],
                 ar_start=_repo_relative(fv.start))
    return list(range(pick("seeds"))), s, pick("sft_steps")


def _repo_relative(path: str) -> str:
    """`path` relative to the repository root when inside it (results/*.json then name no machine's paths)."""
    if not path:
        return ""
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return os.path.abspath(path) if rel.startswith("..") else rel


def main(argv: list[str]) -> dict:
    """Trains what the chosen studies need, writes `<out>/<study>.json` and the report; returns {study: its JSON}."""
    fv = parse_flags(argv)
    seeds, s, sft_steps = resolve(fv)
    workroot = os.path.join(fv.out, "work")
    os.makedirs(workroot, exist_ok=True)
    cache = "" if fv.jax_cache == "none" else fv.jax_cache or os.path.join(workroot, "xla_cache")
    if cache:
        pool.enable_jax_cache(cache)
    out, t0 = {}, time.time()
    if fv.workers > 1:  # train every run in the pool; the loop below then reads the results back
        for jobs in pool.plan(fv.studies, seeds, s, sft_steps, workroot, fv.runs):
            pool.run_jobs(jobs, fv.workers, cache)
    for study in fv.studies:
        t = time.time()
        diffusion = study in TRACERL_STUDIES
        if diffusion:
            results = runner.run_tracerl(seeds, s, sft_steps, workroot, study)
        else:
            results = runner.run_study(study, seeds, s, workroot, fv.runs)
        extra = {"sft_steps": sft_steps, "sft_start": runner.tracerl_starts(s, study)} if diffusion else {}
        out[study] = runner.study_json(study, results, s, seeds, fv.runs, **extra)
        with open(os.path.join(fv.out, f"{study}.json"), "w") as f:
            json.dump(out[study], f, indent=1)
        print(f"study {study}: {time.time() - t:.0f}s", flush=True)
    earlier = read_study_jsons(fv.out)  # also the studies of earlier invocations, all in ALL_STUDIES order
    out = {name: out.get(name, earlier.get(name)) for name in ALL_STUDIES if name in out or name in earlier}
    paths = report.write_report(out, fv.out)
    print(f"done in {time.time() - t0:.0f}s; wrote " + ", ".join(paths), flush=True)
    return out
