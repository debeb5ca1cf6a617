"""Masked-diffusion decoding with trajectories.

Primitives and the trajectory record are in `sampling/diffusion_steps.py`. Samplers (one jitted function each):
  * `make_llada_generate_fn`: full attention, semi-AR blocks, low-confidence remasking (LLaDA), or
    Fast-dLLM confidence-threshold parallel decoding, optionally with a Fast-dLLM DUAL KV cache.
  * `make_block_generate_fn`: SDAR / TraDo block diffusion with a block KV cache and static or dynamic
    (threshold) remasking, response-aligned blocks [design].
Both return `(Rollout, aux)`; `aux = {"num_forwards": int32 scalar}` counts model calls (one call may process
many tokens), for the benchmark.

Layout [design]: prompts LEFT-padded to P, response slots [P, P + R) start as the mask token M;
RoPE positions come from the prompt mask (`cumsum(valid) - 1`), so response token j has position
`len(prompt) + j`. The prediction for a masked position is read AT that position (no logit shift: LLaDA,
SDAR; Dream's shifted logits are not supported).

Trajectory: `step_map_BxR[b, j]` is the per-row decoding step (0, 1, ...) at which token j was unmasked;
a row's counter advances only on steps where that row commits at least one token, so ids are dense, globally
monotone across blocks, and shared by all tokens committed in the same step. `confidence_BxR`, `logp_BxR`,
`logp_raw_BxR`, `entropy_BxR` are those of the proposal at that step. After the first EOS (kept in the
response) slots hold the pad id, zeros, and `STEP_MAP_PAD`.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_reason.models import attention
from jaxrl_reason.models.transformer import init_cache
from jaxrl_reason.sampling import diffusion_steps as steps_lib
from jaxrl_reason.sampling.diffusion_steps import CONFIDENCES
from jaxrl_reason.sampling.processors import SamplingParams

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
# LLaDA / Fast-dLLM: full attention
# ----------------------------------------------------------------------------------------------------------

def make_llada_generate_fn(graphdef, *, prompt_len: int, gen_len: int, block_len: int, steps: int,
                           mask_token_id: int, eos_id: int | Sequence[int] | None, pad_id: int,
                           sampling: SamplingParams, threshold: float | None = None, use_cache: bool = False,
                           refresh_interval: int | None = None, confidence: str = "raw"):
    """LLaDA semi-AR low-confidence remasking / Fast-dLLM threshold decoding.

    Returns jitted `fn(params, prompt_tokens_BxP, prompt_mask_BxP, key) -> (Rollout, {"num_forwards"})`.
    Full bidirectional attention over `L = prompt_len + gen_len` (pad keys masked); the response is
    decoded block by block (`gen_len / block_len` blocks; candidates outside the current block are ignored).
      * `threshold=None`: `steps / num_blocks` steps per block, committing `transfer_schedule(block_len, .)`
        tokens per step by confidence (LLaDA `low_confidence`).
      * `threshold=tau`: Fast-dLLM parallel decoding: per step every masked block position with confidence
        `>= tau` plus the most confident one (`select_transfer(mode="fastdllm")`) until the block is full
        (at most `block_len` steps; `steps` is then only validated, not used).
    `use_cache=True`: Fast-dLLM DUAL cache: a full forward refreshes the K/V of all L positions at the
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
    """Logits `[B, bl, V]` of the block at slots [start, start + bl) and the updated cache.

    No cache, or a refresh step: full bidirectional forward over all L slots (writing every slot's K/V into
    the cache). Otherwise (dual cache): only the block's tokens, their K/V written at their slots, attending
    over all L cached slots (pad keys masked).
    """
    def full(cache):
        model = nnx.merge(graphdef, params)
        h, cache = model.hidden(x_BxL, pos_BxL, attention.bidirectional(valid_BxL), cache,
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
    k_sched = steps_lib.transfer_schedule(bl, steps // n_blocks)
    refresh = max_iters if refresh is None else refresh

    def generate(params, prompt_BxP, pmask_BxP, key):
        b = prompt_BxP.shape[0]
        x_BxL = jnp.concatenate([prompt_BxP, jnp.full((b, r), m, jnp.int32)], axis=1)
        valid_BxL = jnp.concatenate([pmask_BxP, jnp.ones((b, r), bool)], axis=1)
        pos_BxL = attention.positions_from_mask(valid_BxL)
        model = nnx.merge(graphdef, params)
        cache = init_cache(model.cfg, b, p + r, dtype=model.embed[...].dtype) if use_cache else None

        def step_cond(c):
            x_BxL, i, blk = c[0], c[4], c[6]
            return (i < max_iters) & jnp.any(jax.lax.dynamic_slice_in_dim(x_BxL, p + blk * bl, bl, 1) == m)

        def step_body(c):
            x_BxL, cache, trace, n_step_B, i, fwd, blk = c
            start = p + blk * bl
            logits, cache = _llada_forward(graphdef, params, x_BxL, pos_BxL, valid_BxL, cache, start, bl,
                                           True if refresh == 1 else i % refresh == 0)
            prop = steps_lib.propose(jax.random.fold_in(key, blk * max_iters + i), logits, sampling, m, confidence)
            xb_BxT = jax.lax.dynamic_slice_in_dim(x_BxL, start, bl, axis=1)
            masked = xb_BxT == m
            if threshold is None:
                sel = steps_lib.select_transfer(prop.conf, masked, k_sched[i], mode="static")
            else:
                sel = steps_lib.select_transfer(prop.conf, masked, 1, threshold, mode="fastdllm")
            x_BxL = jax.lax.dynamic_update_slice_in_dim(x_BxL, jnp.where(sel, prop.token, xb_BxT), start, axis=1)
            trace = steps_lib.record(trace, blk * bl, sel, prop, n_step_B)
            return x_BxL, cache, trace, n_step_B + sel.any(-1), i + 1, fwd + 1, blk

        def block_cond(c):
            return (c[6] < n_blocks) & ~jnp.all(c[7])

        def block_body(c):
            x_BxL, cache, trace, n_step_B, _, fwd, blk, done_B = c
            x_BxL, cache, trace, n_step_B, _, fwd, _ = jax.lax.while_loop(
                step_cond, step_body, (x_BxL, cache, trace, n_step_B, jnp.int32(0), fwd, blk))
            xb_BxT = jax.lax.dynamic_slice_in_dim(x_BxL, p + blk * bl, bl, axis=1)
            done_B = done_B | steps_lib.is_eos(xb_BxT, eos_ids).any(-1)
            return x_BxL, cache, trace, n_step_B, jnp.int32(0), fwd, blk + 1, done_B

        zero = jnp.int32(0)
        carry = (x_BxL, cache, steps_lib.empty_trace(b, r), jnp.zeros((b,), jnp.int32), zero, zero, zero,
                 jnp.zeros((b,), bool))
        x_BxL, _, trace, _, _, fwd, _, _ = jax.lax.while_loop(block_cond, block_body, carry)
        return steps_lib.finalize(prompt_BxP, pmask_BxP, x_BxL[:, p:], trace, eos_ids, pad_id), {"num_forwards": fwd}

    return jax.jit(generate)


# ----------------------------------------------------------------------------------------------------------
# SDAR / TraDo block diffusion with a block KV cache
# ----------------------------------------------------------------------------------------------------------

def make_block_generate_fn(graphdef, *, prompt_len: int, max_new_tokens: int, block_size: int,
                           steps_per_block: int, mask_token_id: int, eos_ids: Sequence[int], pad_id: int,
                           sampling: SamplingParams, remasking: str = "static", threshold: float = 0.9,
                           use_cache: bool = True, confidence: str = "sampled"):
    """SDAR / TraDo block-diffusion decoding (response-aligned blocks [design]).

    Returns jitted `fn(params, prompt_tokens_BxP, prompt_mask_BxP, key) -> (Rollout, {"num_forwards"})`.
    Blocks of `block_size` tokens are decoded left to right; block j is response slots `[jB, (j+1)B)` and the
    prompt is a clean prefix with block-causal attention counted back from P (`start = P`).
    Per block at most `steps_per_block` denoising steps; each re-proposes every masked position and commits
      * remasking="static": the `transfer_schedule(block_size, steps_per_block)[i]` most confident ones;
      * remasking="dynamic": every one with confidence `> threshold`, or the static top-k if fewer
        (`select_transfer(mode="sdar_dynamic")`, jetengine `low_confidence_dynamic`).
    `use_cache=True` (block KV cache): a prefill writes the prompt's K/V (block-causal); every denoising step
    is one model call over the window [block j-1 ; block j] (2B queries at their slots) that attends to the
    cached prefix and the window itself and writes both blocks' K/V: block j-1 is clean, so the separate
    commit pass of SDAR's block decoding is fused into block j's first step (block j's noisy K/V are invisible to
    everything before it and rewritten later). Same math as prefill + denoise + commit, one model call fewer per block
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
    """Logits `[B, bs, V]` of block `blk` given the current tokens, and the updated cache.

    Cache: one call over the window [block blk-1 ; block blk] (slots `[P + (blk-1) bs, P + (blk+1) bs)`,
    2 bs queries) that (re)writes both blocks' K/V and attends to the cached prefix + itself. Block blk-1 is
    clean (the last prompt block for blk = 0), so this call is also its commit pass. No cache: all L slots
    with the block-causal mask (the naive reference).
    """
    model = nnx.merge(graphdef, params)
    start = p + blk * bs
    if cache is None:
        h, _ = model.hidden(x_BxL, pos_BxL, attention.block_causal(valid_BxL, bs, p))
        return model.logits(jax.lax.dynamic_slice_in_dim(h, start, bs, axis=1)), None
    w = start - bs
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, w, 2 * bs, axis=1)  # noqa: E731
    h, cache = model.hidden(sl(x_BxL), sl(pos_BxL), attention.cached_block_mask(valid_BxL, w, 2 * bs, bs, p),
                            cache, w)
    return model.logits(h[:, bs:]), cache


@functools.lru_cache(maxsize=32)
def _block_core(graphdef, p, r, bs, t_b, m, eos_ids, pad_id, sampling, remasking, tau, use_cache, confidence):
    n_blocks = r // bs
    k_sched = steps_lib.transfer_schedule(bs, t_b)
    mode = "static" if remasking == "static" else "sdar_dynamic"

    def generate(params, prompt_BxP, pmask_BxP, key):
        b = prompt_BxP.shape[0]
        x_BxL = jnp.concatenate([prompt_BxP, jnp.full((b, r), m, jnp.int32)], axis=1)
        valid_BxL = jnp.concatenate([pmask_BxP, jnp.ones((b, r), bool)], axis=1)
        pos_BxL = attention.positions_from_mask(valid_BxL)
        cache, n_fwd = None, jnp.int32(0)
        if use_cache:   # prefill: the prompt's K/V with block-causal attention (no LM head)
            model = nnx.merge(graphdef, params)
            cache = init_cache(model.cfg, b, p + r, dtype=model.embed[...].dtype)
            _, cache = model.hidden(prompt_BxP, pos_BxL[:, :p], attention.cached_block_mask(valid_BxL, 0, p, bs, p),
                                    cache, 0)
            n_fwd = jnp.int32(1)

        def cond(c):
            return (c[6] < n_blocks) & jnp.any(c[3])

        def body(c):    # one denoising step of block blk (step i of the block)
            x_BxL, cache, trace, active_B, n_step_B, i, blk, n_fwd = c
            logits, cache = _block_forward(graphdef, params, x_BxL, pos_BxL, valid_BxL, cache, blk, p, bs)
            prop = steps_lib.propose(jax.random.fold_in(key, blk * t_b + i), logits, sampling, m, confidence)
            start = p + blk * bs
            xb_BxT = jax.lax.dynamic_slice_in_dim(x_BxL, start, bs, axis=1)
            masked = active_B[:, None] & (xb_BxT == m)
            sel = steps_lib.select_transfer(prop.conf, masked, k_sched[i], tau, mode)
            xb_BxT = jnp.where(sel, prop.token, xb_BxT)
            x_BxL = jax.lax.dynamic_update_slice_in_dim(x_BxL, xb_BxT, start, axis=1)
            trace = steps_lib.record(trace, blk * bs, sel, prop, n_step_B)
            done = (i + 1 >= t_b) | ~jnp.any(masked & ~sel)
            active_B = jnp.where(done, active_B & ~steps_lib.is_eos(xb_BxT, eos_ids).any(-1), active_B)
            return (x_BxL, cache, trace, active_B, n_step_B + sel.any(-1), jnp.where(done, 0, i + 1),
                    blk + done.astype(jnp.int32), n_fwd + 1)

        zero = jnp.int32(0)
        carry = (x_BxL, cache, steps_lib.empty_trace(b, r), jnp.ones((b,), bool), jnp.zeros((b,), jnp.int32),
                 zero, zero, n_fwd)
        x_BxL, _, trace, *_, n_fwd = jax.lax.while_loop(cond, body, carry)
        return steps_lib.finalize(prompt_BxP, pmask_BxP, x_BxL[:, p:], trace, eos_ids, pad_id), {"num_forwards": n_fwd}

    return jax.jit(generate)
