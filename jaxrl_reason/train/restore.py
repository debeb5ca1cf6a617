"""The policy of any saved RL checkpoint, rebuilt from the config the run saved in its workdir (`train/workdir.py`):
what `experiments/export.py` converts and `experiments/evaluate.py` evaluates."""
from __future__ import annotations

import json
import os
import types

import jax
from flax import nnx
from ml_collections import config_dict

from jaxrl_reason.train import build, loop
from jaxrl_reason.train import policy as policy_lib
from jaxrl_reason.train.checkpoint import Checkpointer


def load_run_config(workdir: str):
    """The config a run saved in its workdir, as an ml_collections ConfigDict."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{workdir!r} holds no config.json (written by experiments/train.py at start-up).")
    with open(path) as f:
        return config_dict.ConfigDict(json.load(f))


def restore_policy(workdir: str, step: int | None = None):
    """(config, policy, its TransformerConfig, tokenizer, step) of a saved RL checkpoint of `workdir`."""
    config = load_run_config(workdir)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1  # any device count restores
    tok = build.tokenizer_for(config)
    policy, mcfg, params, _ = policy_lib.build_parts(config, types.SimpleNamespace(tokenizer=tok))
    # the checkpoint's TrainState layout, from shapes alone: no optimizer state is allocated only to be overwritten
    target, _, _ = loop.abstract_state(config, loop._mesh(config), params, 1)
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            raise ValueError(f"{workdir!r} holds no saved checkpoint.")
        if step is not None and step not in steps:
            raise ValueError(f"{workdir!r} has no checkpoint of step {step} (saved: {steps}).")
        state, meta = ckpt.restore(target, step)
    nnx.update(policy, jax.device_get(state.params["policy"]))
    return config, policy, mcfg, tok, meta.get("iteration", step)
