"""Masked-diffusion decoding primitives and the trajectory record.

`transfer_schedule` (tokens to commit per step), `select_transfer` (which masked positions to commit: static
top-k, SDAR dynamic threshold, Fast-dLLM threshold), `propose` (a candidate and its scores at every position), and
`Trace` / `record` / `finalize`: the per-slot commit step, confidence and log-probs that TraceRL trains on, cut at
the first EOS into a `Rollout`. The samplers that compose them are in `sampling/diffusion.py`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrl_reason.sampling.processors import SamplingParams, sample_logits, token_entropy
from jaxrl_reason.sampling.types import STEP_MAP_PAD, Rollout

SELECT_MODES = ("static", "sdar_dynamic", "fastdllm")
CONFIDENCES = ("raw", "sampled")


def transfer_schedule(n, steps: int) -> jax.Array:
    """Tokens to commit at each of `steps` steps for `n` masked tokens.

    `k_i = floor(n / steps) + [i < n mod steps]` (LLaDA `get_num_transfer_tokens`), so the `k_i` sum to `n`.

    Args:
      n: int or int array `[...]` (e.g. `n_B`), number of masked tokens.
      steps: static number of steps (>= 1).
    Returns:
      int32 `[..., steps]`.
    """
    if steps < 1:
        raise ValueError(f"transfer_schedule needs steps >= 1, got {steps}.")
    n = jnp.asarray(n, jnp.int32)[..., None]
    i = jnp.arange(steps, dtype=jnp.int32)
    return n // steps + (i < n % steps).astype(jnp.int32)


def select_transfer(conf_BxR, masked_BxR, k_B, tau=None, mode: str = "static") -> jax.Array:
    """Which masked positions to commit this step (static-shape form).

    Modes:
      "static":       the `k_B` most confident masked positions (LLaDA `low_confidence`).
      "sdar_dynamic": all masked positions with `conf > tau` (strict, jetengine); if fewer than `k_B`,
                      the top-`k_B` instead (SDAR/TraDo `low_confidence_dynamic`).
      "fastdllm":     all masked positions with `conf >= tau`, and always the most confident one
                      (Fast-dLLM threshold parallel decoding; `k_B` is ignored).
    Ties are broken towards the leftmost position (stable sort).

    Args:
      conf_BxR: float confidences (any real values; positions outside `masked_BxR` are ignored).
      masked_BxR: bool, positions still masked (candidates).
      k_B: int `[B]` (or scalar), number of tokens of the static schedule.
      tau: confidence threshold, needed by the two dynamic modes.
      mode: one of `SELECT_MODES`.
    Returns:
      bool `[B, R]`, a subset of `masked_BxR`.
    """
    if mode not in SELECT_MODES:
        raise ValueError(f"select_transfer mode must be one of {SELECT_MODES}, got {mode!r}.")
    if mode != "static" and tau is None:
        raise ValueError(f"select_transfer mode {mode!r} needs a threshold tau.")
    c = jnp.where(masked_BxR, conf_BxR.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-c, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)                  # 0 = most confident
    k_B = jnp.broadcast_to(jnp.asarray(k_B, jnp.int32), c.shape[:-1])
    topk = (rank < k_B[..., None]) & masked_BxR
    if mode == "static":
        return topk
    if mode == "sdar_dynamic":
        above = masked_BxR & (c > tau)
        enough = above.sum(-1) >= k_B
        return jnp.where(enough[..., None], above, topk)
    return masked_BxR & ((c >= tau) | (rank == 0))


class Proposal(NamedTuple):
    """Candidate token for every position of a block and its scores. All `[B, T]`."""
    token: jax.Array     # int32, never the mask token
    conf: jax.Array      # confidence used by the selection rule
    logp: jax.Array      # log-prob under the distribution sampled from (0 for greedy)
    logp_raw: jax.Array  # log-prob under the raw policy (full softmax of the model's logits)
    entropy: jax.Array   # entropy of the raw policy (nats)


def propose(key, logits_BxTxV, sampling: SamplingParams, mask_token_id: int, confidence: str) -> Proposal:
    """Samples a candidate at every position and scores it.

    The mask token is never proposed (its logit is -inf for sampling); `logp_raw` and `entropy` use the full,
    untouched float32 logits, i.e. exactly what a training forward would score.
    Confidence switch (both [code]): "raw" = probability of the candidate under the untempered softmax
    (LLaDA); "sampled" = its probability under the processed (temperature / top-k / top-p) distribution
    actually sampled from (SDAR / jetengine). Greedy decoding is a point mass, so there "sampled" falls back to
    "raw" (argmax of the logits, ranked by raw probability).
    """
    raw = logits_BxTxV.astype(jnp.float32)
    s = sample_logits(key, raw.at[..., mask_token_id].set(-jnp.inf), sampling)
    lse = jax.nn.logsumexp(raw, axis=-1)
    logp_raw = jnp.take_along_axis(raw, s.token[..., None], axis=-1)[..., 0] - lse
    conf = jnp.exp(logp_raw) if (confidence == "raw" or sampling.greedy) else s.prob
    return Proposal(s.token, conf, s.logp, logp_raw, token_entropy(raw))


class Trace(NamedTuple):
    """Per response slot, the proposal stats at commit time. All `[B, R]`."""
    step: jax.Array
    conf: jax.Array
    logp: jax.Array
    logp_raw: jax.Array
    entropy: jax.Array


def empty_trace(b: int, r: int) -> Trace:
    z = jnp.zeros((b, r), jnp.float32)
    return Trace(jnp.full((b, r), STEP_MAP_PAD, jnp.int32), z, z, z, z)


def record(trace: Trace, start, sel_BxT, prop: Proposal, step_B) -> Trace:
    """Writes the stats of the selected positions of the block at response slots [start, start + T)."""
    t = sel_BxT.shape[1]
    step_BxT = jnp.broadcast_to(step_B[:, None], sel_BxT.shape)
    new = (step_BxT, prop.conf, prop.logp, prop.logp_raw, prop.entropy)
    out = []
    for buf, val in zip(trace, new):
        old = jax.lax.dynamic_slice_in_dim(buf, start, t, axis=1)
        out.append(jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(sel_BxT, val.astype(buf.dtype), old),
                                                       start, axis=1))
    return Trace(*out)


def is_eos(tokens, eos_ids: tuple[int, ...]):
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def finalize(prompt_BxP, pmask_BxP, resp_BxR, trace: Trace, eos_ids, pad_id) -> Rollout:
    """Cuts every response after its first EOS (kept) and builds the Rollout (types.py)."""
    r = resp_BxR.shape[1]
    eos_BxR = is_eos(resp_BxR, eos_ids)
    has_eos_B = eos_BxR.any(-1)
    length_B = jnp.where(has_eos_B, jnp.argmax(eos_BxR, axis=-1) + 1, r).astype(jnp.int32)
    keep = jnp.arange(r)[None, :] < length_B[:, None]
    zero = lambda a: jnp.where(keep, a, 0.0)  # noqa: E731
    return Rollout(prompt_tokens_BxP=prompt_BxP, prompt_mask_BxP=pmask_BxP,
                   tokens_BxR=jnp.where(keep, resp_BxR, pad_id), response_mask_BxR=keep,
                   logp_BxR=zero(trace.logp), logp_raw_BxR=zero(trace.logp_raw), entropy_BxR=zero(trace.entropy),
                   length_B=length_B, truncated_B=~has_eos_B,
                   step_map_BxR=jnp.where(keep, trace.step, STEP_MAP_PAD), confidence_BxR=zero(trace.conf))
