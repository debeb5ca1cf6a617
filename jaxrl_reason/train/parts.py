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
    # (rows: `train.contracts.Rows`, params) -> (batch, metrics, entropy_NxR); the batch is an `UpdateBatch`
    # (autoregressive) or the policy kind's own pytree (masked diffusion's packed replay rows)
    build_batch: Callable[[Any, dict], tuple[Any, dict, Any]]
    loss_fn: Callable  # (params, micro_batch, rng) -> (loss, metrics)
    split: Callable[[Any, np.random.Generator], list[Any]]  # rollout batch -> mini-batches
