"""The run table of the reproduction study: which runs each study compares, as data.

A run is `RunSpec(name, module, arg, overrides)`: `configs/<module>.py:get_config(arg)` plus dotted overrides. A
study is a tuple of RunSpecs trained with the same budget (the same number of RL iterations, hence optimizer
updates) and evaluated on the same held-out set. The diffusion studies name runs of `TRACERL_RUNS` (the
configs/tracerl.py arg of each). `Settings` is what every run of one invocation shares.

This module imports nothing: the runner, the worker pool, the report and the results table all read it.
"""
from __future__ import annotations

from typing import NamedTuple

# Difficulty tiers of the arithmetic task (level = (n_terms - 3) * 3 + (digits - 1)): 1-digit terms are easy,
# 3-digit terms hard (a mid-SFT model at 44% overall solves 78-94% of the 1-digit levels and 0-19% of the
# 3-digit ones, so the tiers separate what a method does to easy and to hard problems).
TIERS = {"easy": (0, 3, 6), "medium": (1, 4, 7), "hard": (2, 5, 8)}


class RunSpec(NamedTuple):
    """One method of a study: configs/<module>.py:<arg> with `overrides` ((dotted key, value), ...)."""

    name: str
    module: str
    arg: str = "tiny"
    overrides: tuple = ()


class Settings(NamedTuple):
    """What every run of one invocation shares (part of each run's key)."""

    rl_steps: int
    eval_problems: int
    eval_samples: int
    greedy: bool
    smoke: bool = False
    tracerl_prompts: int = 0  # > 0: the TraceRL runs' rollout prompts per iteration (--quick); not in AR run keys
    # The AR runs' warm start ("" = the method config's `model.sft_dir`, the shipped checkpoints/arith_tiny_sft).
    # Not in run keys by path: its weights are, by their digest (`common.warm_start_digest`).
    ar_start: str = ""


GRPO, DAPO = RunSpec("grpo", "grpo"), RunSpec("dapo", "dapo")
# Several optimizer updates per rollout batch for every HAPO-study run (the DAPO control too): with one, every
# update is on-policy (ratio 1) and HAPO's adaptive clip bounds never bind (the paper uses 16).
HAPO_MINI_BATCHES = 4
STUDIES = {
    # DLER against correctness-only controls (correctness-only RL shortens responses too, so a length claim needs
    # that control beside it), and DA-DLER; the merged DLER checkpoint is added by study/dler.py.
    "dler": (GRPO, DAPO, RunSpec("dler", "dler"), RunSpec("da_dler", "da_dler")),
    # Each base with and without LSPO. configs/grpo.py:tiny drops GRPO's KL; so does its LSPO twin here.
    "lspo": (GRPO, DAPO, RunSpec("gspo", "gspo"),
             RunSpec("lspo_grpo", "lspo", "grpo,tiny", (("loss.kl_coef", 0.0),)),
             RunSpec("lspo_dapo", "lspo", "dapo,tiny"), RunSpec("lspo_gspo", "lspo", "gspo,tiny")),
    # HAPO vs DAPO and each of its four components (A adaptive temperature, B token-level group advantage,
    # C advantage redistribution, D adaptive clip) switched off alone.
    "hapo": tuple(RunSpec(name, module, "tiny", overrides + (("optim.mini_batches", HAPO_MINI_BATCHES),))
                  for name, module, overrides in (
                      ("dapo", "dapo", ()), ("hapo", "hapo", ()),
                      ("hapo_no_A_temperature", "hapo", (("hapo.tau", 0.0),)),
                      ("hapo_no_B_token_group_adv", "hapo", (("advantage.estimator", "grpo"),)),
                      ("hapo_no_C_redistribution", "hapo", (("hapo.redistribute", False),)),
                      ("hapo_no_D_adaptive_clip", "hapo", (("hapo.adaptive_clip", False),)))),
    # REPRO on PPO and on GRPO vs the same without.
    "repro": (RunSpec("ppo", "ppo"), RunSpec("repro_ppo", "repro", "ppo,tiny"), GRPO,
              RunSpec("repro_grpo", "repro", "grpo,tiny")),
}
# LSPO with room to fill every batch: the filtered runs (DAPO's zero-variance filter, LSPO's length filter) may
# draw up to FILL_ROUNDS generation rounds instead of base.py's 4. From a high-accuracy start few groups pass the
# filters, and with 4 rounds the LSPO runs trained on ~10 of 16 groups per update (their "groups per update").
# GRPO and GSPO do not filter: their runs are those of "lspo".
FILL_ROUNDS = 12
STUDIES["lspo_fill"] = tuple(
    spec._replace(overrides=spec.overrides + (("filter.max_rounds", FILL_ROUNDS),))
    if spec.name in ("dapo", "lspo_grpo", "lspo_dapo", "lspo_gspo") else spec for spec in STUDIES["lspo"])

# The block TraceRL lr of tracerl_lr (the tiny configs' 1e-4 lowered the block model's accuracy), as the run name,
# its configs/tracerl.py arg, the report title and the README-table name spell it; TRACERL_LR_RUN is that run.
TRACERL_LR = "1e-5"
TRACERL_LR_RUN = f"block_tracerl_lr{TRACERL_LR}"
TRACERL_RUNS = {  # run name -> configs/tracerl.py arg (tiny scale)
    "block_tracerl": "block",
    "block_onestep": "block,onestep",
    "block_tracerl_value": "block,value",
    "full_tracerl": "full",
    TRACERL_LR_RUN: f"block,lr={TRACERL_LR}",
}
# The runs of each diffusion study. "tracerl": accuracy before / after TraceRL on a block and a full-attention
# model, TraceRL's trajectory estimate vs the one-step estimate, with vs without the value model, at the tiny
# configs' lr 1e-4. "tracerl_lr": block TraceRL at TRACERL_LR, where a one-seed probe
# (results/full/tracerl_lr_probe.log) found RL does not lower the block model's accuracy there.
TRACERL_STUDY_RUNS = {
    "tracerl": ("block_tracerl", "block_onestep", "block_tracerl_value", "full_tracerl"),
    "tracerl_lr": (TRACERL_LR_RUN,),
}
TRACERL_STUDIES = tuple(TRACERL_STUDY_RUNS)

ALL_STUDIES = ("dler", "lspo", "lspo_fill", "hapo", "repro", "tracerl", "tracerl_lr")
# What experiments/reproduce.py runs by default: a study per claim. Two follow-ups run when named: lspo_fill, a
# control of lspo that only matters where the filters reject most groups (a high-accuracy start), and tracerl_lr,
# block TraceRL at the lr a probe chose after the tracerl study (--studies=lspo_fill,tracerl_lr).
DEFAULT_STUDIES = tuple(name for name in ALL_STUDIES if name not in ("lspo_fill", "tracerl_lr"))


def study_specs(study: str, only=()) -> tuple:
    """The runs of AR `study` (STUDIES), only those named in `only` when it is not empty (--runs)."""
    return tuple(spec for spec in STUDIES.get(study, ()) if not only or spec.name in only)


def run_kind(run: str) -> str:
    """The attention kind ("block" | "full") of a TraceRL run: the first word of its configs/tracerl.py arg."""
    return TRACERL_RUNS[run].split(",")[0]


def kinds(runs=None) -> list[str]:
    """The sorted attention kinds of `runs` (default: every TraceRL run): the SFT starts they need."""
    return sorted({run_kind(r) for r in (TRACERL_RUNS if runs is None else runs)})
