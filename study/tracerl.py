"""The TraceRL studies: diffusion SFT starts, then the study's RL runs per seed.

    from study.tracerl import run_tracerl_study
    results = run_tracerl_study(seeds=(0, 1, 2), rl_steps=..., eval_problems=500, eval_samples=4, sft_steps=...,
                                workroot="runs/repro_tracerl")

What the runs compare (study/runs.py: TRACERL_STUDY_RUNS): accuracy before / after TraceRL on a tiny
block-diffusion model (SFT'd with the block-diffusion loss) and a tiny full-attention diffusion model (SFT'd with
the LLaDA loss); TraceRL's trajectory estimate vs the one-step estimate of d1; with and without the diffusion
value model.

Steps:
  1. two SFT checkpoints: with `use_shipped` (experiments/reproduce.py outside --smoke) the shipped
     `checkpoints/arith_tiny_sft_{block,full}` (experiments/sft.py with configs/sft_diffusion.py:<kind>,tiny), as
     the AR studies start from checkpoints/arith_tiny_sft; otherwise, or when one is missing, `workroot/sft_<kind>`
     (the same config with `sft_steps` steps; the library calls of experiments/sft.py's `_diffusion_sft`, without
     its evaluation, which the RL runs' `eval_before` replaces). A built directory counts once its `sft_done.json`
     marker exists; the marker stores the SFT config, and reusing it under a different config raises ValueError.
  2. for each seed (seed-major, so every finished seed is a complete comparison) the runs of the study, each from
     its kind's SFT checkpoint in a fresh workdir `workroot/<run>/seed<k>`, all with the same `rl_steps` (no time
     budget), eval problems and samples. A run is done once `result.json` exists (it stores the run's config; a
     different config, or another SFT checkpoint (its sha256), raises ValueError); an unfinished run resumes
     from its last checkpoint (train/loop.py).
  3. `{run: [{"eval_before", "eval_after", "curve", "seed", "iterations", "wall_s"}, ...]}`; `curve` holds the
     per-iteration records of the run's metrics.jsonl (the rows with a `train/loss`).

`smoke=True` shrinks everything (a 1-layer 32-wide model, level-0 problems, 24 new tokens, 4 prompts x 4
samples, 2 mini-batches) so a test can run it; pass small `sft_steps`, `rl_steps`, `eval_problems` with it.
Compilation dominates short runs; seeds of one run share programs, so a driver that sets
JAX_COMPILATION_CACHE_DIR (and JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0) before importing jax compiles each
run once instead of once per seed.
"""
from __future__ import annotations

import json
import os
import time

from configs import sft_diffusion as sft_diffusion_config
from configs import tracerl as tracerl_config
from configs.base import shrink_for_smoke
from jaxrl_reason.train import build, diffusion_sft, sft
from study.common import RESULT_FILE, ROOT, read_curve, train, warm_start_digest, write_json
from study.runs import TRACERL_RUNS, TRACERL_STUDY_RUNS, kinds, run_kind

SFT_MARKER = "sft_done.json"
# The shipped diffusion SFT checkpoints (configs/tracerl.py's default model.sft_dir), built with
#   python experiments/sft.py --config=configs/sft_diffusion.py:<kind>,tiny --out=checkpoints/arith_tiny_sft_<kind>
SHIPPED_SFT = os.path.join(ROOT, "checkpoints", "arith_tiny_sft_{kind}")


def _shrink(c) -> None:
    """`configs.base.shrink_for_smoke` plus level-0 traces without re-checks (they fit 24 tokens), in place."""
    init, lr = c.model.init, c.optim.lr  # keeps the SFT start and the method's lr
    shrink_for_smoke(c)
    c.model.init, c.optim.lr = init, lr
    c.task.train_levels = c.task.eval_levels = (0,)
    c.task.recheck_prob = 0.0


def sft_config(kind: str, *, sft_steps: int, eval_problems: int, smoke: bool = False):
    """configs/sft_diffusion.py:<kind>,tiny with `sft_steps` steps, its data disjoint from `eval_problems` held-out."""
    c = sft_diffusion_config.get_config(f"{kind},tiny")
    c.sft.steps = int(sft_steps)
    c.sft.eval_problems = max(c.sft.eval_problems, int(eval_problems))  # held-out sets are prefixes of each other
    if smoke:
        _shrink(c)
        c.sft.num_problems, c.sft.batch_size, c.sft.warmup_steps = 64, 8, 0
    return c


def rl_config(run: str, *, seed: int, rl_steps: int, eval_problems: int, eval_samples: int, sft_dir: str,
              greedy: bool = False, smoke: bool = False, prompts_per_step: int = 0):
    """configs/tracerl.py:<TRACERL_RUNS[run]> from the SFT checkpoint `sft_dir`: exactly `rl_steps` iterations, no
    HF export; `prompts_per_step` > 0 replaces the config's rollout prompts per iteration (--quick)."""
    if run not in TRACERL_RUNS:
        raise ValueError(f"unknown TraceRL study run {run!r}; use one of {tuple(TRACERL_RUNS)}.")
    c = tracerl_config.get_config(TRACERL_RUNS[run])
    c.seed = int(seed)
    c.model.init, c.model.sft_dir = "sft", sft_dir
    c.train.num_steps, c.train.time_budget_s, c.train.export_hf = int(rl_steps), 0.0, False
    c.train.checkpoint_every = min(c.train.checkpoint_every, 5)  # ~2 min per block iteration on one core: save often
    c.eval.num_problems, c.eval.samples, c.eval.greedy = int(eval_problems), int(eval_samples), bool(greedy)
    if prompts_per_step > 0:
        c.rollout.prompts_per_step = int(prompts_per_step)
    if smoke:
        _shrink(c)
    return c


def _as_json(config, workroot: str | None = None) -> dict:
    """The config as JSON; with `workroot`, `model.sft_dir` relative to it (a workroot may be moved or copied)."""
    out = json.loads(config.to_json_best_effort())
    if workroot is not None:
        out["model"]["sft_dir"] = os.path.relpath(config.model.sft_dir, workroot)
        out["model"]["sft_sha256"] = warm_start_digest(config)  # a rebuilt start is another run
    return out


def _load_marker(path: str, config_json: dict, what: str):
    """The marker's content if it exists and was made with `config_json`; None if absent; ValueError if stale."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        done = json.load(f)
    if done.get("config") != config_json:
        raise ValueError(f"{path} was made with a different {what} config; delete it or use another workroot.")
    return done


def build_sft_checkpoint(config, out_dir: str, log_fn=print) -> dict:
    """Diffusion SFT as experiments/sft.py (`_diffusion_sft`) into `out_dir`, or reuse it; returns the marker.

    The marker `out_dir/sft_done.json` holds {"config", "history" (train_diffusion_sft's loss log), "wall_s"}.
    """
    marker = os.path.join(out_dir, SFT_MARKER)
    config_json = _as_json(config)
    done = _load_marker(marker, config_json, "SFT")
    if done is not None:
        return done
    start = time.time()
    c = config
    tok = build.tokenizer_for(c)
    model, mcfg = build.load_policy(c, tok)
    prompts, traces = sft.arithmetic_sft_set_from_config(c)
    model, history = diffusion_sft.diffusion_sft_from_config(c, tok, model, prompts, traces, log_fn=log_fn)
    sft.save_sft_checkpoint(model, mcfg, tok, out_dir)
    done = {"config": config_json, "history": history, "wall_s": time.time() - start}
    write_json(marker, done)
    return done


def run_one(config, workdir: str, workroot: str) -> dict:
    """One RL run into `workdir` (skipped when its result.json exists); returns the study's per-run record."""
    path = os.path.join(workdir, RESULT_FILE)
    config_json = _as_json(config, workroot)
    done = _load_marker(path, config_json, "RL")
    if done is None:
        start = time.time()
        out = train(config, workdir)
        curve = read_curve(workdir, keys=None)
        done = {"config": config_json, "seed": int(config.seed), "eval_before": out["eval_before"],
                "eval_after": out["eval_after"], "iterations": int(out["iterations"]), "curve": curve,
                "wall_s": time.time() - start}
        write_json(path, done)
    return {k: v for k, v in done.items() if k != "config"}


def shipped_sft_dir(kind: str, smoke: bool = False) -> str | None:
    """checkpoints/arith_tiny_sft_<kind> if it holds a checkpoint, else None (always None at smoke size, whose
    shrunk model the shipped weights do not fit)."""
    path = SHIPPED_SFT.format(kind=kind)
    return path if not smoke and os.path.exists(os.path.join(path, "model.safetensors")) else None


def ensure_sft(kind: str, *, sft_steps: int, eval_problems: int, workroot: str, smoke: bool = False,
               use_shipped: bool = False, log_fn=print) -> str:
    """The SFT checkpoint the `kind` runs start from: the shipped one when `use_shipped` and it exists (as the AR
    studies start from checkpoints/arith_tiny_sft), else `workroot/sft_<kind>`, built with `sft_steps` if absent."""
    shipped = shipped_sft_dir(kind, smoke) if use_shipped else None
    if shipped:
        return shipped
    out = os.path.join(workroot, f"sft_{kind}")
    cfg = sft_config(kind, sft_steps=sft_steps, eval_problems=eval_problems, smoke=smoke)
    done = build_sft_checkpoint(cfg, out, log_fn=log_fn)
    log_fn(f"sft_{kind}: {len(done['history'])} loss records, last {done['history'][-1]}")
    return out


def run_named(run: str, seed: int, *, sft_dir: str, rl_steps: int, eval_problems: int, eval_samples: int,
              workroot: str, smoke: bool = False, greedy: bool = False, prompts_per_step: int = 0,
              log_fn=print) -> dict:
    """One run of `TRACERL_RUNS` from `sft_dir` into `workroot/<run>/seed<seed>` (run_one's record)."""
    cfg = rl_config(run, seed=seed, rl_steps=rl_steps, eval_problems=eval_problems, eval_samples=eval_samples,
                    sft_dir=sft_dir, greedy=greedy, smoke=smoke, prompts_per_step=prompts_per_step)
    record = run_one(cfg, os.path.join(workroot, run, f"seed{seed}"), workroot)
    log_fn(f"{run} seed {seed}: pass@1 {record['eval_before'].get('pass@1')} -> "
           f"{record['eval_after'].get('pass@1')} ({record['wall_s']:.0f}s)")
    return record


def run_tracerl_study(*, seeds, rl_steps: int, eval_problems: int, eval_samples: int, sft_steps: int, workroot: str,
                      smoke: bool = False, greedy: bool = False, runs=TRACERL_STUDY_RUNS["tracerl"],
                      use_shipped: bool = False, prompts_per_step: int = 0, log_fn=print) -> dict:
    """SFT checkpoints (block, full; see ensure_sft) then `runs` x `seeds` RL runs; returns {run: [record per
    seed]} (see above)."""
    if not seeds:
        raise ValueError("run_tracerl_study needs at least one seed.")
    unknown = [r for r in runs if r not in TRACERL_RUNS]
    if unknown:
        raise ValueError(f"unknown TraceRL study runs {unknown}; use names from {tuple(TRACERL_RUNS)}.")
    os.makedirs(workroot, exist_ok=True)
    sft_dirs = {kind: ensure_sft(kind, sft_steps=sft_steps, eval_problems=eval_problems, workroot=workroot,
                                 smoke=smoke, use_shipped=use_shipped, log_fn=log_fn)
                for kind in kinds(runs)}
    results = {r: [] for r in runs}
    for seed in seeds:
        for run in runs:
            results[run].append(run_named(run, seed, sft_dir=sft_dirs[run_kind(run)], rl_steps=rl_steps,
                                          eval_problems=eval_problems, eval_samples=eval_samples, workroot=workroot,
                                          smoke=smoke, greedy=greedy, prompts_per_step=prompts_per_step,
                                          log_fn=log_fn))
    return results
