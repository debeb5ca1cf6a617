"""Shared helpers for the RL-system tests: a very small config of any method that runs in seconds."""
import importlib
import os

from configs.base import shrink_for_smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(module: str = "grpo", arg: str = "tiny", **overrides):
    """`configs/<module>.py:<arg>` shrunk to a random 1-layer model, 4 prompts x 4 samples, 24 new tokens."""
    c = shrink_for_smoke(importlib.import_module(f"configs.{module}").get_config(arg))
    c.train.num_steps, c.train.checkpoint_every, c.train.time_budget_s = 2, 100, 0.0
    c.train.export_hf = False
    c.eval.num_problems, c.eval.samples, c.eval.greedy = 4, 4, False
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        getattr(c, section)[key] = value
    return c


def digit_scorer(texts, answers):
    """A reward a random policy can earn (the response contains a '1'), so RL mechanics can be tested."""
    del answers
    import numpy as np

    return np.asarray([float("1" in t) for t in texts], np.float32)


def final_policy_params(workdir: str) -> list:
    """The policy parameters of a run's last checkpoint (where `loop.run` leaves its trained weights), as numpy
    arrays in `jax.tree.leaves` order of the train state's policy params."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxrl_reason.train.restore import restore_policy

    _, policy, *_ = restore_policy(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(policy, nnx.Param))]


def loss_hp(**fields):
    """The frozen loss section of the base config (what `rl_loss` gets as `hp`) with `fields` replaced; no critic
    term, no fixed aggregation constant. A nested dict (`hapo=dict(...)`) replaces a method's section."""
    from jaxrl_reason.train import hparams
    from configs.base import get_base_config

    return hparams.freeze({**hparams.loss_hp(get_base_config("tiny")).to_dict(), "agg_const": None, **fields})
