"""The typed data contracts between the RL stages: rollout rows and the update batch.

Both are `flax.struct` dataclasses (pytrees) with shape-suffixed fields; a field keeps its name from the stage
that produces it to every stage that reads it (the rows' `response_mask_NxR` is the batch's `response_mask_NxR`).
N rows = prompts x group size (groups contiguous), P the left-padded prompt length, R the right-padded response
length, L = P + R.

`Rows` live on the host (numpy; `answer_N` is a string array, so rows never enter a jitted function). Fields a
later stage fills (`reward_N`) or that only some samplers produce (`step_map_NxR`) are None until set; None fields
are empty subtrees, so `jax.tree.map` (accumulation, padding, slicing) skips them.

`UpdateBatch` is what the update step and the no-grad forward passes take. The model inputs (`tokens_NxL`,
`valid_NxL`, `response_mask_NxR`) are always set; the optional terms are None when the run has no use for them
(no KL reference, no critic, no importance correction), and the counts are set per mini-batch.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
from flax import struct

Array = Any  # numpy or jax array


@struct.dataclass
class Rows:
    """One RL step's sampled, scored rows (host numpy)."""

    prompt_tokens_NxP: Array  # int32, left-padded
    prompt_mask_NxP: Array  # bool
    tokens_NxR: Array  # int32 response tokens, right-padded
    response_mask_NxR: Array  # bool: real response tokens (incl. EOS); all False on a padding row
    logp_sampler_NxR: Array  # float32 log-prob under the sampling distribution (temperature, truncation)
    logp_sampler_raw_NxR: Array  # float32 log-prob at temperature 1, no truncation: what the trainer recomputes
    entropy_NxR: Array  # float32 sampler entropy per token
    length_N: Array  # int32 response length
    truncated_N: Array  # bool: hit max_new_tokens without an end token
    score_N: Array  # float32 correctness score
    example_index_N: Array  # int: index of the row's example in its round
    answer_N: Array  # str: the gold answer of the row's example
    step_map_NxR: Optional[Array] = None  # int32 denoising step that unmasked each token (diffusion samplers)
    reward_N: Optional[Array] = None  # float32 shaped training reward (`rollout.shape_rewards`)
    greedy_reward_N: Optional[Array] = None  # float32 shaped reward of a greedy response to the row's prompt

    @property
    def num_rows(self) -> int:
        return int(np.shape(self.score_N)[0])


@struct.dataclass
class UpdateBatch:
    """The update batch of autoregressive policies (numpy on the host, jax arrays inside the step)."""

    tokens_NxL: Array  # int32 prompt + response tokens
    valid_NxL: Array  # bool
    response_mask_NxR: Array  # float32
    logp_old_NxR: Optional[Array] = None  # float32 trainer log-probs before the update
    adv_NxR: Optional[Array] = None  # float32 advantages
    logp_ref_NxR: Optional[Array] = None  # float32 reference log-probs (KL term)
    returns_NxR: Optional[Array] = None  # float32 critic targets (GAE)
    values_old_NxR: Optional[Array] = None  # float32 critic values before the update (GAE)
    is_weight_NxR: Optional[Array] = None  # float32 rollout importance weights (`train/mismatch.py`)
    num_tokens_N: Optional[Array] = None  # float32 the mini-batch's response-token count, broadcast over rows
    num_seqs_N: Optional[Array] = None  # float32 the mini-batch's non-empty sequence count, broadcast

    @property
    def num_rows(self) -> int:
        return int(self.tokens_NxL.shape[0])

    def model_inputs(self) -> "UpdateBatch":
        """Only the fields the forward passes read (one pytree layout for every no-grad pass)."""
        return UpdateBatch(tokens_NxL=self.tokens_NxL, valid_NxL=self.valid_NxL,
                           response_mask_NxR=self.response_mask_NxR)
