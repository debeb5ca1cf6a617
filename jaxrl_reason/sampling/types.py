"""The `Rollout` pytree every sampler returns.

Shapes: B = rows (prompts x samples, groups contiguous), P = padded prompt length (LEFT-padded),
R = response budget (max new tokens / generation length).
"""
from typing import NamedTuple

import jax
import numpy as np

# step_map value of response slots that hold no real token (after EOS / never generated).
STEP_MAP_PAD = int(np.iinfo(np.int32).max)


class Rollout(NamedTuple):
    """One batch of sampled responses (a NamedTuple, hence a pytree; every field is an array).

    Fields:
        prompt_tokens_BxP: int32 [B, P] prompt ids, LEFT-padded with the pad id (the exact array fed to the model).
        prompt_mask_BxP: bool [B, P] True on real prompt tokens.
        tokens_BxR: int32 [B, R] response ids; slots after the end of a response hold the pad id.
        response_mask_BxR: bool [B, R] True on real generated tokens, INCLUDING the EOS / stop token.
        logp_BxR: float32 [B, R] log-prob of the sampled token under the distribution actually sampled from
            (after temperature / top-k / top-p / min-p / HAPO temperature); 0 for greedy decoding (a point mass)
            and on padding.
        logp_raw_BxR: float32 [B, R] log-prob of the sampled token under the raw policy (temperature 1, no
            truncation); 0 on padding.
        entropy_BxR: float32 [B, R] entropy (nats) of the raw policy distribution at that slot; 0 on padding.
        length_B: int32 [B] number of real response tokens (= response_mask_BxR.sum(-1)).
        truncated_B: bool [B] True when no EOS / stop token was produced within the budget R.
        step_map_BxR: int32 [B, R] decoding step at which each token was produced: AR 0..length-1, diffusion
            the global denoising step at which the token was unmasked; STEP_MAP_PAD on padding.
        confidence_BxR: float32 [B, R] AR: probability of the sampled token under the sampled-from distribution
            (= exp(logp_BxR)); diffusion: the sampler's confidence at commit; 0 on padding.
    """
    prompt_tokens_BxP: jax.Array
    prompt_mask_BxP: jax.Array
    tokens_BxR: jax.Array
    response_mask_BxR: jax.Array
    logp_BxR: jax.Array
    logp_raw_BxR: jax.Array
    entropy_BxR: jax.Array
    length_B: jax.Array
    truncated_B: jax.Array
    step_map_BxR: jax.Array
    confidence_BxR: jax.Array
