"""The small-scale reproduction study of issue 6 in one command: DLER, LSPO, HAPO, REPRO (and TraceRL).

  python experiments/reproduce.py --quick                 # 1 seed, 2 RL iterations, 100 problems x 2 samples
  python experiments/reproduce.py                         # 3 seeds, 100 RL iterations, 500 problems
  python experiments/reproduce.py --studies=dler,hapo --seeds=5 --rl_steps=150 --out=results
  python experiments/reproduce.py --quick --workers=2     # two runs at a time, one per core
  python experiments/reproduce.py --start=checkpoints/arith_tiny_sft_plateau --out=results/plateau
  python experiments/reproduce.py --studies=tracerl_lr --rl_steps=30 --eval_samples=2 --out=results/full

Every AR run starts from an SFT checkpoint with the method's `tiny` config: by default the shipped mid-SFT one
(`checkpoints/arith_tiny_sft`; RL from it improves held-out accuracy, README "Main-job results"), with
`--start=checkpoints/arith_tiny_sft_plateau` the plateaued one (configs/sft.py:plateau, calibration.md lesson 3).
The TraceRL runs start from the shipped diffusion SFT checkpoints (`checkpoints/arith_tiny_sft_{block,full}`; built
under <out>/work when absent). Methods are compared with their papers' baseline RL methods from that same start.
Within a study every run gets the same number of RL iterations and the same held-out set
(experiments/_repro_studies.py). Runs live under `<out>/work/runs/<config hash>/seed<k>`: identical runs are
shared between studies and a finished run is never retrained, so an interrupted study resumes where it stopped.
Writes `<out>/<study>.json`, `<out>/summary.md` (tables with the papers' numbers and a computed "reproduced?"
column, experiments/_repro_report.py), `<out>/<study>_curves.png` and `<out>/tradeoff.png`.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import flags  # noqa: E402

import _repro_pool as pool  # noqa: E402
import _repro_report as report  # noqa: E402
import _repro_studies as studies_lib  # noqa: E402

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
    flags.DEFINE_list("studies", list(studies_lib.DEFAULT_STUDIES), "Studies to run (known: "
                      f"{', '.join(studies_lib.ALL_STUDIES)}).", flag_values=fv)
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
                         "(experiments/_repro_pool.py); 2 on a 2-core CPU nearly halves the wall time.", flag_values=fv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(fv.get_help())
        raise SystemExit(0)
    fv(list(argv))
    if fv.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {fv.workers}.")
    if fv.start and not os.path.isfile(os.path.join(fv.start, "model.safetensors")):
        raise ValueError(f"--start={fv.start} is not an SFT checkpoint directory (no model.safetensors in it).")
    unknown = [s for s in fv.studies if s not in studies_lib.ALL_STUDIES]
    if unknown:
        raise ValueError(f"unknown studies {unknown}; choose from {', '.join(studies_lib.ALL_STUDIES)}.")
    _check_runs(fv.runs, fv.studies)
    return fv


def _check_runs(runs: list[str], studies: list[str]) -> None:
    """--runs names runs of the chosen autoregressive studies only."""
    if not runs:
        return
    diffusion = [name for name in studies if name in studies_lib.TRACERL_STUDIES]
    if diffusion:
        ar = ", ".join(name for name in studies_lib.ALL_STUDIES if name not in studies_lib.TRACERL_STUDIES)
        raise ValueError(f"--runs applies to the autoregressive studies ({ar}), not {', '.join(diffusion)}.")
    known = {spec.name for st in studies for spec in studies_lib.study_specs(st)}
    if set(runs) - known:
        raise ValueError(f"--runs: {sorted(set(runs) - known)} are not runs of {', '.join(studies)}; "
                         f"those are {', '.join(sorted(known))}.")


def resolve(fv) -> tuple[list[int], studies_lib.Settings, int]:
    """(seeds, Settings, sft_steps) from the mode defaults and the explicit flags."""
    d = SMOKE if fv.smoke else QUICK if fv.quick else FULL
    pick = lambda name: d[name] if fv[name].value is None else fv[name].value  # noqa: E731
    for name in ("seeds", "rl_steps", "eval_problems", "eval_samples", "sft_steps"):
        if pick(name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {pick(name)}.")
    s = studies_lib.Settings(rl_steps=pick("rl_steps"), eval_problems=pick("eval_problems"),
                             eval_samples=pick("eval_samples"), greedy=d["greedy"], smoke=fv.smoke,
                             tracerl_prompts=d["tracerl_prompts"], ar_start=_repo_relative(fv.start))
    return list(range(pick("seeds"))), s, pick("sft_steps")


def _repo_relative(path: str) -> str:
    """`path` relative to the repository root when inside it (results/*.json then name no machine's paths)."""
    if not path:
        return ""
    rel = os.path.relpath(os.path.abspath(path), studies_lib.ROOT)
    return os.path.abspath(path) if rel.startswith("..") else rel


def main(argv: list[str]) -> dict:
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
        diffusion = study in studies_lib.TRACERL_STUDIES
        if diffusion:
            results = studies_lib.run_tracerl(seeds, s, sft_steps, workroot, study)
        else:
            results = studies_lib.run_study(study, seeds, s, workroot, fv.runs)
        extra = {"sft_steps": sft_steps, "sft_start": studies_lib.tracerl_starts(s, study)} if diffusion else {}
        out[study] = studies_lib.study_json(study, results, s, seeds, fv.runs, **extra)
        with open(os.path.join(fv.out, f"{study}.json"), "w") as f:
            json.dump(out[study], f, indent=1)
        print(f"study {study}: {time.time() - t:.0f}s", flush=True)
    earlier = studies_lib.read_study_jsons(fv.out)  # also the studies of earlier invocations, all in ALL_STUDIES order
    out = {name: out.get(name, earlier.get(name)) for name in studies_lib.ALL_STUDIES if name in out or name in earlier}
    any_tracerl = any(name in out for name in studies_lib.TRACERL_STUDIES)
    paths = report.write_report(out, fv.out, studies_lib.tracerl_paper_numbers() if any_tracerl else None)
    print(f"done in {time.time() - t0:.0f}s; wrote " + ", ".join(paths), flush=True)
    return out


if __name__ == "__main__":
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)
    main(sys.argv)
