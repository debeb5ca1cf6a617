"""Masked-diffusion decoding with trajectories (diffusion.md §4, §5.2–§5.3, §6.5, §10).

Primitives (§4.1): `transfer_schedule`, `select_transfer`, `propose`. Samplers (one jitted function each):
  * `make_llada_generate_fn`: full attention, semi-AR blocks, low-confidence remasking (LLaDA, §4.2), or
    Fast-dLLM confidence-threshold parallel decoding (§4.3), optionally with a Fast-dLLM DUAL KV cache.
  * `make_block_generate_fn`: SDAR / TraDo block diffusion with a block KV cache and static or dynamic
    (threshold) remasking (§4.5), response-aligned blocks [design].
Both return `(Rollout, aux)`; `aux = {"num_forwards": int32 scalar}` counts model calls (one call may process
many tokens), for the benchmark.

Layout (§4.5 [design], §10): prompts LEFT-padded to P, response slots [P, P + R) start as the mask token M;
RoPE positions come from the prompt mask (`cumsum(valid) - 1`), so response token j has position
`len(prompt) + j`. The prediction for a masked position is read AT that position (no logit shift: LLaDA,
SDAR; Dream's shifted logits are not supported).

Trajectory (§6.5): `step_map_BxR[b, j]` is the per-row decoding step (0, 1, ...) at which token j was unmasked;
a row's counter advances only on steps where that row commits at least one token, so ids are dense, globally
monotone across blocks, and shared by all tokens committed in the same step. `confidence_BxR`, `logp_BxR`,
`logp_raw_BxR`, `entropy_BxR` are those of the proposal at that step. After the first EOS (kept in the
response) slots hold the pad id, zeros, and `STEP_MAP_PAD`.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_reason.models import attention
from jaxrl_reason.models.transformer import init_cache
from jaxrl_reason.sampling.processors import SamplingParams, sample_logits, token_entropy
from jaxrl_reason.sampling.types import STEP_MAP_PAD, Rollout

SELECT_MODES = ("static", "sdar_dynamic", "fastdllm")
CONFIDENCES = ("raw", "sampled")


def transfer_schedule(n, steps: int) -> jax.Array:
    """Tokens to commit at each of `steps` steps for `n` masked tokens (diffusion.md §4.1.3).

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
    """Which masked positions to commit this step (diffusion.md §4.1.4, static-shape form).

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
    """Samples a candidate at every position and scores it (diffusion.md §4.1.1–§4.1.2).

    The mask token is never proposed (its logit is -inf for sampling); `logp_raw` and `entropy` use the full,
    untouched float32 logits, i.e. exactly what a training forward would score (§6.5).
    Confidence switch (§4.1.2, both [code]): "raw" = probability of the candidate under the untempered softmax
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


class _Trace(NamedTuple):
    """Per response slot, the proposal stats at commit time. All `[B, R]`."""
    step: jax.Array
    conf: jax.Array
    logp: jax.Array
    logp_raw: jax.Array
    entropy: jax.Array


def _empty_trace(b: int, r: int) -> _Trace:
    z = jnp.zeros((b, r), jnp.float32)
    return _Trace(jnp.full((b, r), STEP_MAP_PAD, jnp.int32), z, z, z, z)


def _record(trace: _Trace, start, sel_BxT, prop: Proposal, step_B) -> _Trace:
    """Writes the stats of the selected positions of the block at response slots [start, start + T)."""
    t = sel_BxT.shape[1]
    step_BxT = jnp.broadcast_to(step_B[:, None], sel_BxT.shape)
    new = (step_BxT, prop.conf, prop.logp, prop.logp_raw, prop.entropy)
    out = []
    for buf, val in zip(trace, new):
        old = jax.lax.dynamic_slice_in_dim(buf, start, t, axis=1)
        out.append(jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(sel_BxT, val.astype(buf.dtype), old),
                                                       start, axis=1))
    return _Trace(*out)


def _is_eos(tokens, eos_ids: tuple[int, ...]):
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def _finalize(prompt_BxP, pmask_BxP, resp_BxR, trace: _Trace, eos_ids, pad_id) -> Rollout:
    """Cuts every response after its first EOS (kept) and builds the Rollout (types.py)."""
    r = resp_BxR.shape[1]
    eos_BxR = _is_eos(resp_BxR, eos_ids)
    has_eos_B = eos_BxR.any(-1)
    length_B = jnp.where(has_eos_B, jnp.argmax(eos_BxR, axis=-1) + 1, r).astype(jnp.int32)
    keep = jnp.arange(r)[None, :] < length_B[:, None]
    zero = lambda a: jnp.where(keep, a, 0.0)  # noqa: E731
    return Rollout(prompt_tokens_BxP=prompt_BxP, prompt_mask_BxP=pmask_BxP,
                   tokens_BxR=jnp.where(keep, resp_BxR, pad_id), response_mask_BxR=keep,
                   logp_BxR=zero(trace.logp), logp_raw_BxR=zero(trace.logp_raw), entropy_BxR=zero(trace.entropy),
                   length_B=length_B, truncated_B=~has_eos_B,
                   step_map_BxR=jnp.where(keep, trace.step, STEP_MAP_PAD), confidence_BxR=zero(trace.conf))


def _left_pad(tokens_BxP, mask_BxP, prompt_len: int, pad_id: int):
    """Validates `[B, P']` prompts and LEFT-pads them to `prompt_len` (int32 tokens, bool mask)."""
    if tokens_BxP.ndim != 2 or tokens_BxP.shape != mask_BxP.shape:
        raise ValueError(f"prompt tokens {tokens_BxP.shape} and mask {mask_BxP.shape} must be equal [B, P] shapes.")
    p = tokens_BxP.shape[1]
    if p > prompt_len:
        raise ValueError(f"The prompts have length {p} but prompt_len is {prompt_len}.")
    widths = ((0, 0), (prompt_len - p, 0))
    return (jnp.pad(jnp.asarray(tokens_BxP, jnp.int32), widths, constant_values=pad_id),
            jnp.pad(jnp.asarray(mask_BxP, bool), widths, constant_values=False))


def _check_common(mask_token_id, pad_id, eos_ids, sampling, confidence, threshold):
    for name, v in (("mask_token_id", mask_token_id), ("pad_id", pad_id)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative token id, got {v!r}.")
    if any(not isinstance(e, (int, np.integer)) or e < 0 or e == mask_token_id for e in eos_ids):
        raise ValueError(f"EOS ids must be non-negative token ids other than the mask token, got {eos_ids!r}.")
    if not isinstance(sampling, SamplingParams):
        raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}.")
    sampling.validate()
    if sampling.hapo_tau > 0:
        raise ValueError("HAPO adaptive temperature (hapo_tau > 0) is not supported by the diffusion samplers.")
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}.")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}.")


def _eos_tuple(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, (int, np.integer)):
        return (int(eos),)
    return tuple(int(e) for e in eos)


def _wrap(core, prompt_len, pad_id):
    """Left-pads outside the jit (so shorter prompts do not need new code paths) and calls the core."""
    def generate_fn(params, prompt_tokens_BxP, prompt_mask_BxP, key):
        tokens, mask = _left_pad(prompt_tokens_BxP, prompt_mask_BxP, prompt_len, pad_id)
        return core(params, tokens, mask, key)
    return generate_fn


# ----------------------------------------------------------------------------------------------------------
# LLaDA / Fast-dLLM: full attention (diffusion.md §4.2, §4.3)
# ----------------------------------------------------------------------------------------------------------

def make_llada_generate_fn(graphdef, *, prompt_len: int, gen_len: int, block_len: int, steps: int,
                           mask_token_id: int, eos_id: int | Sequence[int] | None, pad_id: int,
                           sampling: SamplingParams, threshold: float | None = None, use_cache: bool = False,
                           refresh_interval: int | None = None, confidence: str = "raw"):
    """LLaDA semi-AR low-confidence remasking / Fast-dLLM threshold decoding (diffusion.md §4.2, §4.3).

    Returns jitted `fn(params, prompt_tokens_BxP, prompt_mask_BxP, key) -> (Rollout, {"num_forwards"})`.
    Full bidirectional attention over `L = prompt_len + gen_len` (pad keys masked, §5.2); the response is
    decoded block by block (`gen_len / block_len` blocks; candidates outside the current block are ignored).
      * `threshold=None`: `steps / num_blocks` steps per block, committing `transfer_schedule(block_len, .)`
        tokens per step by confidence (LLaDA `low_confidence`).
      * `threshold=tau`: Fast-dLLM parallel decoding: per step every masked block position with confidence
        `>= tau` plus the most confident one (`select_transfer(mode="fastdllm")`) until the block is full
        (at most `block_len` steps; `steps` is then only validated, not used).
    `use_cache=True`: Fast-dLLM DUAL cache (§4.3): a full forward refreshes the K/V of all L positions at the
    first step of every block and then every `refresh_interval` steps (None: block start only); other steps
    feed only the block's tokens, write their K/V at the block slots and attend over all L cached slots
    (stale suffix = approximation). `refresh_interval=1` is exactly the uncached sampler; a 1-layer model is
    exact at any interval (its K/V depend only on the token and its position).
    Rows stop mattering after their first EOS (`eos_id`: int, ids, or None); decoding exits early once every
    row has an EOS in a finished block. `confidence`: "raw" (LLaDA, default) or "sampled", see `propose`.
    """
    for name, v in (("prompt_len", prompt_len), ("gen_len", gen_len), ("block_len", block_len), ("steps", steps)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if gen_len % block_len:
        raise ValueError(f"gen_len ({gen_len}) must be a multiple of block_len ({block_len}).")
    if steps % (gen_len // block_len):
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({gen_len // block_len}).")
    if refresh_interval is not None and (not isinstance(refresh_interval, int) or refresh_interval < 1):
        raise ValueError(f"refresh_interval must be None or a positive int, got {refresh_interval!r}.")
    eos_ids = _eos_tuple(eos_id)
    _check_common(mask_token_id, pad_id, eos_ids, sampling, confidence, threshold)
    core = _llada_core(graphdef, prompt_len, gen_len, block_len, steps, int(mask_token_id), eos_ids, int(pad_id),
                       sampling, threshold, bool(use_cache), refresh_interval, confidence)
    return _wrap(core, prompt_len, int(pad_id))


def _llada_forward(graphdef, params, x_BxL, pos_BxL, valid_BxL, cache, start, bl, refresh_now):
    """Logits `[B, bl, V]` of the block at slots [start, start + bl) and the updated cache (§4.3, §5.2).

    No cache, or a refresh step: full bidirectional forward over all L slots (writing every slot's K/V into
    the cache). Otherwise (dual cache): only the block's tokens, their K/V written at their slots, attending
    over all L cached slots (pad keys masked).
    """
    def full(cache):
        model = nnx.merge(graphdef, params)
        h, cache = model.hidden(x_BxL, pos_BxL, attention.bidirectional_mask(valid_BxL), cache,
                                None if cache is None else 0)
        return model.logits(jax.lax.dynamic_slice_in_dim(h, start, bl, axis=1)), cache

    def part(cache):
        model = nnx.merge(graphdef, params)
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, bl, axis=1)  # noqa: E731
        mask_BxTxL = jnp.broadcast_to(valid_BxL[:, None, :], (x_BxL.shape[0], bl, x_BxL.shape[1]))
        return model(sl(x_BxL), sl(pos_BxL), mask_BxTxL, cache, start)

    if cache is None or refresh_now is True:
        return full(cache)
    return jax.lax.cond(refresh_now, full, part, cache)


@functools.lru_cache(maxsize=32)
def _llada_core(graphdef, p, r, bl, steps, m, eos_ids, pad_id, sampling, threshold, use_cache, refresh, confidence):
    n_blocks = r // bl
    max_iters = bl if threshold is not None else steps // n_blocks
    k_sched = transfer_schedule(bl, steps // n_blocks)
    refresh = max_iters if refresh is None else refresh

    def generate(params, prompt_BxP, pmask_BxP, key):
        b = prompt_BxP.shape[0]
        x_BxL = jnp.concatenate([prompt_BxP, jnp.full((b, r), m, jnp.int32)], axis=1)
        valid_BxL = jnp.concatenate([pmask_BxP, jnp.ones((b, r), bool)], axis=1)
        pos_BxL = attention.positions_from_mask(valid_BxL)
        cache = init_cache(nnx.merge(graphdef, params).cfg, b, p + r) if use_cache else None

        def step_cond(c):
            x_BxL, i, blk = c[0], c[4], c[6]
            return (i < max_iters) & jnp.any(jax.lax.dynamic_slice_in_dim(x_BxL, p + blk * bl, bl, 1) == m)

        def step_body(c):
            x_BxL, cache, trace, n_step_B, i, fwd, blk = c
            start = p + blk * bl
            logits, cache = _llada_forward(graphdef, params, x_BxL, pos_BxL, valid_BxL, cache, start, bl,
                                           True if refresh == 1 else i % refresh == 0)
            prop = propose(jax.random.fold_in(key, blk * max_iters + i), logits, sampling, m, confidence)
            xb_BxT = jax.lax.dynamic_slice_in_dim(x_BxL, start, bl, axis=1)
            masked = xb_BxT == m
            if threshold is None:
                sel = select_transfer(prop.conf, masked, k_sched[i], mode="static")
            else:
                sel = select_transfer(prop.conf, masked, 1, threshold, mode="fastdllm")
            x_BxL = jax.lax.dynamic_update_slice_in_dim(x_BxL, jnp.where(sel, prop.token, xb_BxT), start, axis=1)
            trace = _record(trace, blk * bl, sel, prop, n_step_B)
            return x_BxL, cache, trace, n_step_B + sel.any(-1), i + 1, fwd + 1, blk

        def block_cond(c):
            return (c[6] < n_blocks) & ~jnp.all(c[7])

        def block_body(c):
            x_BxL, cache, trace, n_step_B, _, fwd, blk, done_B = c
            x_BxL, cache, trace, n_step_B, _, fwd, _ = jax.lax.while_loop(
                step_cond, step_body, (x_BxL, cache, trace, n_step_B, jnp.int32(0), fwd, blk))
            xb_BxT = jax.lax.dynamic_slice_in_dim(x_BxL, p + blk * bl, bl, axis=1)
            done_B = done_B | _is_eos(xb_BxT, eos_ids).any(-1)
            return x_BxL, cache, trace, n_step_B, jnp.int32(0), fwd, blk + 1, done_B

        zero = jnp.int32(0)
        carry = (x_BxL, cache, _empty_trace(b, r), jnp.zeros((b,), jnp.int32), zero, zero, zero,
                 jnp.zeros((b,), bool))
        x_BxL, _, trace, _, _, fwd, _, _ = jax.lax.while_loop(block_cond, block_body, carry)
        return _finalize(prompt_BxP, pmask_BxP, x_BxL[:, p:], trace, eos_ids, pad_id), {"num_forwards": fwd}

    return jax.jit(generate)


# ----------------------------------------------------------------------------------------------------------
# SDAR / TraDo block diffusion with a block KV cache (diffusion.md §4.5)
# ----------------------------------------------------------------------------------------------------------

def make_block_generate_fn(graphdef, *, prompt_len: int, max_new_tokens: int, block_size: int,
                           steps_per_block: int, mask_token_id: int, eos_ids: Sequence[int], pad_id: int,
                           sampling: SamplingParams, remasking: str = "static", threshold: float = 0.9,
                           use_cache: bool = True, confidence: str = "sampled"):
    """SDAR / TraDo block-diffusion decoding (diffusion.md §4.5, response-aligned blocks [design]).

    Returns jitted `fn(params, prompt_tokens_BxP, prompt_mask_BxP, key) -> (Rollout, {"num_forwards"})`.
    Blocks of `block_size` tokens are decoded left to right; block j is response slots `[jB, (j+1)B)` and the
    prompt is a clean prefix with block-causal attention counted back from P (§5.3, `start = P`).
    Per block at most `steps_per_block` denoising steps; each re-proposes every masked position and commits
      * remasking="static": the `transfer_schedule(block_size, steps_per_block)[i]` most confident ones;
      * remasking="dynamic": every one with confidence `> threshold`, or the static top-k if fewer
        (`select_transfer(mode="sdar_dynamic")`, jetengine `low_confidence_dynamic`).
    `use_cache=True` (block KV cache): a prefill writes the prompt's K/V (block-causal); every denoising step
    is one model call over the window [block j-1 ; block j] (2B queries at their slots) that attends to the
    cached prefix and the window itself and writes both blocks' K/V: block j-1 is clean, so the separate
    commit pass of §4.5 is fused into block j's first step (block j's noisy K/V are invisible to everything
    before it and rewritten later). Same math as prefill + denoise + commit, one model call fewer per block
    and a single call site in the loop (small compiled program). `use_cache=False` recomputes all
    L = P + R positions with the block-causal mask at every step (the naive reference; same tokens up to
    float round-off).
    Rows stop after a block that contains one of `eos_ids` (may be empty: decode the full budget); the loop
    exits early when every row has stopped. `confidence`: "sampled" (SDAR, default) or "raw", see `propose`.
    """
    for name, v in (("prompt_len", prompt_len), ("max_new_tokens", max_new_tokens), ("block_size", block_size),
                    ("steps_per_block", steps_per_block)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if max_new_tokens % block_size or prompt_len % block_size:
        raise ValueError(f"prompt_len ({prompt_len}) and max_new_tokens ({max_new_tokens}) must be multiples "
                         f"of block_size ({block_size}).")
    if block_size % steps_per_block:
        raise ValueError(f"steps_per_block ({steps_per_block}) must divide block_size ({block_size}).")
    if remasking not in ("static", "dynamic"):
        raise ValueError(f"remasking must be 'static' or 'dynamic', got {remasking!r}.")
    eos_ids = _eos_tuple(eos_ids)
    _check_common(mask_token_id, pad_id, eos_ids, sampling, confidence, threshold)
    core = _block_core(graphdef, prompt_len, max_new_tokens, block_size, steps_per_block, int(mask_token_id),
                       eos_ids, int(pad_id), sampling, remasking, float(threshold), bool(use_cache), confidence)
    return _wrap(core, prompt_len, int(pad_id))


def _block_forward(graphdef, params, x_BxL, pos_BxL, valid_BxL, cache, blk, p, bs):
    """Logits `[B, bs, V]` of block `blk` given the current tokens, and the updated cache (§4.5, §5.3).

    Cache: one call over the window [block blk-1 ; block blk] (slots `[P + (blk-1) bs, P + (blk+1) bs)`,
    2 bs queries) that (re)writes both blocks' K/V and attends to the cached prefix + itself. Block blk-1 is
    clean (the last prompt block for blk = 0), so this call is also its commit pass. No cache: all L slots
    with the block-causal mask (the naive reference).
    """
    model = nnx.merge(graphdef, params)
    start = p + blk * bs
    if cache is None:
        h, _ = model.hidden(x_BxL, pos_BxL, attention.block_causal_mask(valid_BxL, bs, p))
        return model.logits(jax.lax.dynamic_slice_in_dim(h, start, bs, axis=1)), None
    w = start - bs
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, w, 2 * bs, axis=1)  # noqa: E731
    h, cache = model.hidden(sl(x_BxL), sl(pos_BxL), attention.cached_block_mask(valid_BxL, w, 2 * bs, bs, p),
                            cache, w)
    return model.logits(h[:, bs:]), cache


@functools.lru_cache(maxsize=32)
def _block_core(graphdef, p, r, bs, t_b, m, eos_ids, pad_id, sampling, remasking, tau, use_cache, confidence):
    n_blocks = r // bs
    k_sched = transfer_schedule(bs, t_b)
    mode = "static" if remasking == "static" else "sdar_dynamic"

    def generate(params, prompt_BxP, pmask_BxP, key):
        b = prompt_BxP.shape[0]
        x_BxL = jnp.concatenate([prompt_BxP, jnp.full((b, r), m, jnp.int32)], axis=1)
        valid_BxL = jnp.concatenate([pmask_BxP, jnp.ones((b, r), bool)], axis=1)
        pos_BxL = attention.positions_from_mask(valid_BxL)
        cache, n_fwd = None, jnp.int32(0)
        if use_cache:   # prefill: the prompt's K/V with block-causal attention (no LM head)
            model = nnx.merge(graphdef, params)
            cache = init_cache(model.cfg, b, p + r)
            _, cache = model.hidden(prompt_BxP, pos_BxL[:, :p], attention.cached_block_mask(valid_BxL, 0, p, bs, p),
                                    cache, 0)
            n_fwd = jnp.int32(1)

        def cond(c):
            return (c[6] < n_blocks) & jnp.any(c[3])

        def body(c):    # one denoising step of block blk (step i of the block)
            x_BxL, cache, trace, active_B, n_step_B, i, blk, n_fwd = c
            logits, cache = _block_forward(graphdef, params, x_BxL, pos_BxL, valid_BxL, cache, blk, p, bs)
            prop = propose(jax.random.fold_in(key, blk * t_b + i), logits, sampling, m, confidence)
            start = p + blk * bs
            xb_BxT = jax.lax.dynamic_slice_in_dim(x_BxL, start, bs, axis=1)
            masked = active_B[:, None] & (xb_BxT == m)
            sel = select_transfer(prop.conf, masked, k_sched[i], tau, mode)
            xb_BxT = jnp.where(sel, prop.token, xb_BxT)
            x_BxL = jax.lax.dynamic_update_slice_in_dim(x_BxL, xb_BxT, start, axis=1)
            trace = _record(trace, blk * bs, sel, prop, n_step_B)
            done = (i + 1 >= t_b) | ~jnp.any(masked & ~sel)
            active_B = jnp.where(done, active_B & ~_is_eos(xb_BxT, eos_ids).any(-1), active_B)
            return (x_BxL, cache, trace, active_B, n_step_B + sel.any(-1), jnp.where(done, 0, i + 1),
                    blk + done.astype(jnp.int32), n_fwd + 1)

        zero = jnp.int32(0)
        carry = (x_BxL, cache, _empty_trace(b, r), jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32), zero, zero,
                 n_fwd)
        x_BxL, _, trace, *_, n_fwd = jax.lax.while_loop(cond, body, carry)
        return _finalize(prompt_BxP, pmask_BxP, x_BxL[:, p:], trace, eos_ids, pad_id), {"num_forwards": n_fwd}

    return jax.jit(generate)
