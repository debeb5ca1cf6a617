"""`PolicyParts`: what the RL loop needs from a policy kind (autoregressive or masked diffusion).

It sits in a module of its own so that every policy kind can build one without importing the loop that runs it.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np


class PolicyParts(NamedTuple):
    """The samplers, the update-batch builder, the loss and the mini-batch split of one policy kind."""

    train_gen: Callable  # (params, prompt_tokens, prompt_mask, key, *sampler_args) -> Rollout
    eval_gen: Callable
    greedy_gen: Callable | None
    build_batch: Callable[[dict, dict], tuple[dict, dict, Any]]  # (rows, params) -> (batch, metrics, entropy)
    loss_fn: Callable  # (params, micro_batch, rng) -> (loss, metrics)
    split: Callable[[dict, np.random.Generator], list[dict]]  # rollout batch -> mini-batches
