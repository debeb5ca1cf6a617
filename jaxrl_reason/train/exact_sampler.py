"""The exact-log-prob sampler: every token is drawn from the trainer's own forward pass, so the sampler's raw
log-probs equal the trainer's recomputed old log-probs bit for bit.

The KV-cache sampler (`sampling/autoregressive.py`) computes each step's logits from one new position against a
cache, in its own shapes; the trainer (`train/logprobs.py` `ar_logps`) runs the whole [rows, P + R] sequence at
once and applies the LM head in token chunks. The two agree to float rounding, not bit for bit. Here each decode
step t runs the trainer's computation instead:

    h = model.hidden(tokens_BxL, positions_from_mask(valid_BxL), causal(valid_BxL))   (ar_logps' call)
    z = the LM head on the B*R states h[:, P-1 : L-1] in the trainer's token chunks, row (b, t)
    token ~ processed(z);  logp_raw, entropy = column t of `chunked_token_logps` (the trainer's function)

with the response slots not yet generated held as invalid padding. A causal mask hides every later slot from the
query at P + t - 1, and a hidden key adds an exact 0 to the attention sum, so that query's hidden state is the one
the trainer computes on the finished sequence (measured: equal bit for bit). The params are cast to the trainer's
compute dtype the way `ar_logps` casts them. Equality also needs the two passes to run the same number of rows per
device: on XLA:CPU a row's result depends on how many rows the matmuls see (4 vs 16 rows differ in the last bits,
tests/test_mismatch.py), so on a mesh the rows are split over ('data', 'fsdp') as the trainer's pass splits them,
and the loop requires the sampler call and the old log-prob pass to have the same row count.

Cost: no KV cache; each of the R steps runs a full forward over P + R positions and the LM head over all B*R
response positions twice, about (P + R) / 2 times the model FLOPs of the cached sampler. Measured on the 2-core
CPU VM (4-layer d=128 model of the tiny scale, 16 rows, P = 24, R = 160): 0.48 s per call cached, 39 s exact.
A correctness mode, not a fast one.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_reason.models.attention import causal, positions_from_mask
from jaxrl_reason.sampling import autoregressive as ar
from jaxrl_reason.sampling.processors import SamplingParams, sample_logits
from jaxrl_reason.sampling.types import STEP_MAP_PAD, Rollout
from jaxrl_reason.train.logprobs import LogpSpec, cast_floating, chunked_logits, chunked_token_logps


def make_exact_generate_fn(graphdef, *, spec: LogpSpec, max_prompt_len: int, max_new_tokens: int,
                           eos_ids: Sequence[int], pad_id: int, params: SamplingParams):
    """`fn(params_state, prompt_tokens_BxP, prompt_mask_BxP, key, hapo_stats=None) -> Rollout`, the arguments and
    output of `autoregressive.make_generate_fn`; `spec` is the trainer's `LogpSpec` (compute dtype, vocabulary
    chunk). `logp_raw_BxR` and `entropy_BxR` are computed with the trainer's own functions."""
    ar.make_generate_fn(graphdef, max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                        pad_id=pad_id, params=params)  # validates the arguments
    spec.validate()
    body = functools.partial(_exact_generate, graphdef=graphdef, spec=spec, max_new_tokens=max_new_tokens,
                             eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id), sampling=params)
    compiled = {}

    def generate_fn(params_state, prompt_tokens_BxP, prompt_mask_BxP, key, hapo_stats=None) -> Rollout:
        tokens, mask = ar.left_pad(prompt_tokens_BxP, prompt_mask_BxP, max_prompt_len, pad_id)
        mesh = ar.rows_mesh(params_state, tokens.shape[0])
        case = (mesh, hapo_stats is not None)
        if case not in compiled:
            compiled[case] = jax.jit(body, **ar.sampler_shardings(*case))
        if mesh is None:
            return compiled[case](params_state, tokens, mask, key, hapo_stats)
        with jax.set_mesh(mesh):  # as the trainer's pass: rows over ('data', 'fsdp'), its activation constraints
            return compiled[case](params_state, tokens, mask, key, hapo_stats)

    return generate_fn


def _exact_generate(params_state, prompt_tokens_BxP, prompt_mask_BxP, key, hapo_stats, *, graphdef, spec,
                    max_new_tokens, eos_ids, pad_id, sampling) -> Rollout:
    model = nnx.merge(graphdef, cast_floating(params_state, spec.dtype))
    w_DxV = model.lm_head_weight()
    b, p = prompt_tokens_BxP.shape
    r = max_new_tokens
    eos_E = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    tokens_BxL = jnp.concatenate([prompt_tokens_BxP, jnp.full((b, r), pad_id, jnp.int32)], axis=1)
    valid_BxL = jnp.concatenate([prompt_mask_BxP, jnp.zeros((b, r), bool)], axis=1)
    bufs = (jnp.full((b, r), pad_id, jnp.int32),) + tuple(jnp.zeros((b, r), jnp.float32) for _ in range(4)) \
        + (jnp.full((b, r), STEP_MAP_PAD, jnp.int32),)

    def cond(carry):
        t, _, _, done_B, _ = carry
        return (t < r) & ~jnp.all(done_B)

    def body(carry):
        t, tokens_BxL, valid_BxL, done_B, bufs = carry
        h_BxLxD, _ = model.hidden(tokens_BxL, positions_from_mask(valid_BxL), causal(valid_BxL))
        h_BxRxD = h_BxLxD[:, p - 1:-1]  # the states that predict the response slots, as in ar_logps
        s = sample_logits(jax.random.fold_in(key, t), _logits_at(h_BxRxD, w_DxV, t, spec.logits_chunk), sampling,
                          hapo_stats)
        alive_B = ~done_B
        tokens_BxL = jax.lax.dynamic_update_slice(tokens_BxL, jnp.where(alive_B, s.token, pad_id)[:, None], (0, p + t))
        logp_BxR, entropy_BxR = chunked_token_logps(h_BxRxD, w_DxV, tokens_BxL[:, p:], token_chunk=spec.logits_chunk,
                                                    vocab_chunk=spec.vocab_chunk)
        s = s._replace(logp_raw=_column(logp_BxR, t), entropy=_column(entropy_BxR, t))
        bufs = ar.record_step(bufs, t, s, alive_B, pad_id)
        valid_BxL = jax.lax.dynamic_update_slice(valid_BxL, alive_B[:, None], (0, p + t))
        return t + 1, tokens_BxL, valid_BxL, done_B | jnp.isin(s.token, eos_E), bufs

    carry = (jnp.asarray(0, jnp.int32), tokens_BxL, valid_BxL, jnp.zeros((b,), bool), bufs)
    _, _, _, done_B, bufs = jax.lax.while_loop(cond, body, carry)
    return ar.to_rollout(prompt_tokens_BxP, prompt_mask_BxP, done_B, bufs)


def _column(x_BxR, t):
    return jax.lax.dynamic_index_in_dim(x_BxR, t, axis=1, keepdims=False)


def _logits_at(h_BxRxD, w_DxV, t, token_chunk):
    """float32 logits `[B, V]` of response slot t, computed as the trainer's LM head computes them
    (`chunked_logits`: the trainer's chunks, so that each row meets the same matmul shape)."""
    return jax.lax.dynamic_index_in_dim(chunked_logits(h_BxRxD, w_DxV, token_chunk), t, axis=1, keepdims=False)
