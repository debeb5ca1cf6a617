"""The study's runs in N worker processes, each pinned to its own core (`experiments/reproduce.py --workers=N`).

Why: on XLA:CPU the ops of a ~1M-parameter model are too small to keep two cores busy, so two processes each
pinned to one core finish two runs in about the time one two-core process takes for one (study/README.md). The
pool only trains: a job is the call a sequential study makes (`runner.run_one`, `tracerl.ensure_sft` /
`run_named`), which stores its result on disk; the study then assembles every study from those files exactly as a
sequential invocation would (and runs the DLER study's evaluations and merge itself). A run shared by several
studies is one job (its run key). Jobs go in two phases, because the TraceRL runs start from SFT checkpoints the
first phase may build: phase 1 = the SFT builds first (they are the longest), then the AR runs; phase 2 = the
TraceRL runs.

Each worker takes the next job from a shared counter until none is left. A job that fails stops its worker (the
others finish theirs) and the pool raises after all have stopped. SIGTERM to the parent is forwarded to the
workers, which save their current run (train/loop.py) and take no new job; a worker that exits preempted makes the
pool exit with the study's one-sentence resume message.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback

from study import runner, tracerl
from study.common import RESULT_FILE, run_key
from study.runs import TRACERL_STUDIES, TRACERL_STUDY_RUNS, kinds, run_kind, study_specs

PREEMPTED = 3  # a worker's exit code when its run was preempted (SIGTERM)


def enable_jax_cache(path: str) -> None:
    """The persistent XLA compilation cache at `path`: identical programs of different runs compile once."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _execute(job: tuple) -> None:
    """Runs one job: ("ar", run_one kwargs) | ("sft", ensure_sft kwargs) | ("tracerl", run_named kwargs)."""
    kind, kwargs = job
    if kind == "ar":
        runner.run_one(**kwargs)
    elif kind == "sft":
        tracerl.ensure_sft(**kwargs)
    elif kind == "tracerl":
        kwargs = dict(kwargs)
        sft = kwargs.pop("sft")  # ensure_sft kwargs: the checkpoint phase 1 built (or the shipped one)
        tracerl.run_named(sft_dir=tracerl.ensure_sft(**sft), **kwargs)
    else:
        raise ValueError(f"unknown job kind {kind!r}.")


def _worker(jobs: list, counter, stop, core: int | None, cache_dir: str) -> None:
    """Pins itself to `core` (before jax starts its threads), then runs jobs until none is left or `stop` is set."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    # On a GPU the workers share its memory: without this each would reserve 75% of it (no effect on CPU).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if cache_dir:
        enable_jax_cache(cache_dir)
    while not stop.is_set():
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= len(jobs):
            return
        try:
            _execute(jobs[i])
        except SystemExit as e:  # a preempted run (common.train's sentence)
            print(e, flush=True)
            stop.set()
            raise SystemExit(PREEMPTED) from None
        except BaseException:  # noqa: BLE001 - reported by the parent with the job; the traceback is printed here
            traceback.print_exc()
            print(f"worker on core {core}: job {jobs[i][0]} {_describe(jobs[i][1])} failed", flush=True)
            raise SystemExit(1) from None


def _describe(kwargs: dict) -> str:
    return ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in kwargs.items() if k in ("spec", "seed", "run", "kind"))


def run_jobs(jobs: list, workers: int, cache_dir: str = "") -> None:
    """Runs `jobs` in `workers` spawned processes, worker i pinned to the i-th core of this process's affinity
    (no pinning when there are more workers than cores). Raises SystemExit (preempted) or RuntimeError (a job
    failed) once every worker has stopped."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    if not jobs:
        return
    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked jax state
    cores = sorted(os.sched_getaffinity(0))
    counter, stop = ctx.Value("i", 0), ctx.Event()
    n = min(workers, len(jobs))
    procs = [ctx.Process(target=_worker, args=(jobs, counter, stop, cores[i] if n <= len(cores) else None, cache_dir))
             for i in range(n)]
    for p in procs:
        p.start()

    def forward(signum, _frame):
        stop.set()
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        for p in procs:
            p.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    codes = [p.exitcode for p in procs]
    if any(c in (PREEMPTED, -signal.SIGTERM) for c in codes):
        raise SystemExit("a run was preempted; the same command resumes the study from its last checkpoints.")
    if any(c != 0 for c in codes):
        raise RuntimeError(f"a study job failed (worker exit codes {codes}); its traceback is printed above.")


def plan(study_names, seeds, s, sft_steps: int, workroot: str, only=()) -> tuple[list, list]:
    """(phase 1, phase 2) jobs for `study_names` (the --studies; `only`: the --runs): the runs without a stored
    result, each once, in study order. TraceRL runs need their SFT start: when a start must be built, phase 1 = the SFT
    builds + the AR runs and phase 2 = the TraceRL runs; when every start exists (shipped or built), the TraceRL
    runs (the longest jobs) open phase 1 and phase 2 is empty, so no worker idles at a phase boundary."""
    sft_jobs, ar_jobs, tracerl_jobs, seen = [], [], [], set()
    for name in study_names:
        for spec in study_specs(name, only):
            for seed in seeds:
                key = run_key(spec, seed, s)
                done = os.path.exists(os.path.join(workroot, "runs", key, RESULT_FILE))
                if key not in seen and not done:
                    ar_jobs.append(("ar", dict(spec=spec, seed=seed, s=s, workroot=workroot)))
                seen.add(key)
    diffusion = [name for name in study_names if name in TRACERL_STUDIES]
    if diffusion:
        root = os.path.join(workroot, "tracerl")
        runs = list(dict.fromkeys(run for name in diffusion for run in TRACERL_STUDY_RUNS[name]))  # shared runs once
        sft = {kind: dict(kind=kind, sft_steps=sft_steps, eval_problems=s.eval_problems, workroot=root,
                          smoke=s.smoke, use_shipped=True) for kind in kinds(runs)}
        sft_jobs = [("sft", kw) for kind, kw in sft.items()
                    if not tracerl.shipped_sft_dir(kind, s.smoke)
                    and not os.path.exists(os.path.join(root, f"sft_{kind}", tracerl.SFT_MARKER))]
        tracerl_jobs = [("tracerl", dict(run=run, seed=seed, sft=sft[run_kind(run)], rl_steps=s.rl_steps,
                                         eval_problems=s.eval_problems, eval_samples=s.eval_samples, workroot=root,
                                         smoke=s.smoke, prompts_per_step=s.tracerl_prompts))
                        for seed in seeds for run in runs
                        if not os.path.exists(os.path.join(root, run, f"seed{seed}", RESULT_FILE))]
    if not sft_jobs:
        return tracerl_jobs + ar_jobs, []
    return sft_jobs + ar_jobs, tracerl_jobs
