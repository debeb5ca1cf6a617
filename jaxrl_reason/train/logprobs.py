"""Response-token log-probs and entropies from hidden states, in chunks: no [rows, tokens, vocab] tensor.

The LM head runs only on the R positions that predict response tokens (P-1 .. L-2). Those N*R hidden states are
flattened and cut into chunks of `token_chunk` tokens, each device's rows apart (`token_chunks`: rows sharded
over devices stay on their device); a `lax.scan` takes one chunk at a time under `jax.checkpoint`, so the
backward pass recomputes a chunk's logits instead of keeping them: the largest vocabulary-sized buffer is one
chunk's `[token_chunk, V]` (or `[token_chunk, vocab_chunk]`, below), split over the devices that hold the rows.
With
`vocab_chunk` > 0 the vocabulary is streamed too: a running max m, the sum s of exp(z - m) and the sum a of
exp(z - m) * (z - m) are carried over vocabulary slices, rescaled whenever m grows, and give

    logsumexp = m + log s,   logp(target) = z_target - logsumexp,   entropy = log s - a / s,

all in float32 whatever the compute dtype. The max is held out of the gradient (both results are invariant
to it). With `vocab_chunk` = 0 each token chunk takes one float32 log-softmax over the whole vocabulary.

`ar_logps` / `ar_values` are the autoregressive forward passes of the RL update and of the no-grad old /
reference / value passes (`train/batch.py`); they take a `LogpSpec` (chunk sizes and the compute dtype: the
float32 master params are cast to it inside the function, so gradients come back in float32).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_reason.models.attention import AttentionMask, causal, positions_from_mask
from jaxrl_reason.models.sharding import activation_shards, constrain

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LogpSpec:
    """How log-probs are computed (hashable: part of the jitted functions' identity).

    logits_chunk: tokens per LM-head chunk, logits_chunk / S of them on each of the S devices the rows are
    sharded over (0: all N*R tokens in one chunk). vocab_chunk: vocabulary columns per streamed slice (0: the
    whole vocabulary at once). compute_dtype: dtype the params are cast to for the forward pass ("float32" |
    "bfloat16").
    """
    logits_chunk: int = 1024
    vocab_chunk: int = 0
    compute_dtype: str = "float32"

    def validate(self) -> LogpSpec:
        """Raises ValueError with one sentence on an impossible setting; returns self."""
        for name in ("logits_chunk", "vocab_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0: no chunking), got {value!r}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute dtype {self.compute_dtype!r}; use one of {tuple(COMPUTE_DTYPES)}.")
        return self

    @property
    def dtype(self):
        return COMPUTE_DTYPES[self.compute_dtype]


def cast_floating(tree, dtype):
    """`tree` with its floating-point leaves in `dtype`; leaves already in `dtype` are returned as they are."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree.map(cast, tree)


def token_logps(logits_NxRxV: jax.Array, targets_NxR: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float32 log-prob of each target token and the entropy of each predictive distribution (plain form)."""
    logprobs = jax.nn.log_softmax(logits_NxRxV.astype(jnp.float32), axis=-1)
    logp = jnp.take_along_axis(logprobs, targets_NxR[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logprobs) * logprobs, axis=-1)
    return logp, entropy


def lm_head_logits(h_CxD, w_DxK):
    """float32 logits `h @ w` (float32 accumulation whatever the compute dtype)."""
    return jnp.dot(h_CxD, w_DxK, preferred_element_type=jnp.float32)


def _stream_update(carry, z_CxK, offset, targets_C):
    """Folds one vocabulary slice (columns offset .. offset+K) into the running (m, s, a, z_target)."""
    m, s, a, zt = carry
    m_new = jnp.maximum(m, jax.lax.stop_gradient(jnp.max(z_CxK, axis=-1)))
    scale = jnp.exp(m - m_new)
    shifted = z_CxK - m_new[:, None]
    e = jnp.exp(shifted)
    s_new = scale * s + jnp.sum(e, axis=-1)
    a_new = scale * (a + s * (m - m_new)) + jnp.sum(e * shifted, axis=-1)
    local = targets_C - offset
    hit = (local >= 0) & (local < z_CxK.shape[1])
    z_hit = jnp.take_along_axis(z_CxK, jnp.clip(local, 0, z_CxK.shape[1] - 1)[:, None], axis=-1)[:, 0]
    return m_new, s_new, a_new, zt + jnp.where(hit, z_hit, 0.0)


def _streamed_logps(h_CxD, w_DxV, targets_C, vocab_chunk: int):
    """One token chunk against the vocabulary in slices of `vocab_chunk` (the last one may be shorter)."""
    c, v = h_CxD.shape[0], w_DxV.shape[1]
    full = v // vocab_chunk
    lowest = jnp.full((c,), jnp.finfo(jnp.float32).min, jnp.float32)
    carry = (lowest, jnp.zeros((c,), jnp.float32), jnp.zeros((c,), jnp.float32), jnp.zeros((c,), jnp.float32))

    @jax.checkpoint
    def step(carry, w_DxK, offset):
        return _stream_update(carry, lm_head_logits(h_CxD, w_DxK), offset, targets_C)

    def body(carry, i):
        offset = i * vocab_chunk
        return step(carry, jax.lax.dynamic_slice_in_dim(w_DxV, offset, vocab_chunk, axis=1), offset), None

    carry, _ = jax.lax.scan(body, carry, jnp.arange(full, dtype=jnp.int32))
    if v % vocab_chunk:
        carry = step(carry, w_DxV[:, full * vocab_chunk:], full * vocab_chunk)
    m, s, a, zt = carry
    log_s = jnp.log(s)
    return (zt - m) - log_s, log_s - a / s


def chunk_logps(w_DxV, h_CxD, targets_C, vocab_chunk: int):
    """(logp of each target, entropy) of one token chunk: what `chunked_token_logps` computes per chunk (the exact
    sampler calls it too, so that both score a token with the same function)."""
    if vocab_chunk and vocab_chunk < w_DxV.shape[1]:
        return _streamed_logps(h_CxD, w_DxV, targets_C, vocab_chunk)
    return token_logps(lm_head_logits(h_CxD, w_DxV), targets_C)


def chunked_token_logps(h_NxRxD: jax.Array, w_DxV: jax.Array, targets_NxR: jax.Array, *, token_chunk: int = 1024,
                        vocab_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """`token_logps(h @ w, targets)` without the `[N, R, V]` logits (module docstring); float32 `[N, R]` each.

    The hidden states and head are used in their own dtype (the matmul accumulates in float32), in the chunks of
    `token_chunks` (padded with zero states, whose results are dropped).
    """
    chunk_fn = jax.checkpoint(lambda w, h, t: chunk_logps(w, h, t, vocab_chunk), prevent_cse=False)
    w_DxV = whole_head(w_DxV)

    def body(_, xs):
        h_SxCxD, t_SxC = xs
        logp, entropy = chunk_fn(w_DxV, h_SxCxD.reshape(-1, h_SxCxD.shape[-1]), t_SxC.reshape(-1))
        return None, (logp.reshape(t_SxC.shape), entropy.reshape(t_SxC.shape))

    _, (logp_KxSxC, entropy_KxSxC) = jax.lax.scan(body, None, token_chunks(h_NxRxD, targets_NxR, token_chunk))
    return untile(logp_KxSxC, targets_NxR.shape), untile(entropy_KxSxC, targets_NxR.shape)


def chunked_logits(h_NxRxD: jax.Array, w_DxV: jax.Array, token_chunk: int) -> jax.Array:
    """float32 logits `[N, R, V]` computed in `chunked_token_logps`' chunks, each row by the same matmul shape and
    layout as there (the exact sampler samples from them and must score what the trainer scores)."""
    w_DxV = whole_head(w_DxV)
    h_KxSxCxD, _ = token_chunks(h_NxRxD, jnp.zeros(h_NxRxD.shape[:2], jnp.int32), token_chunk)
    z_KxSxCxV = jax.lax.map(lambda h_SxCxD: lm_head_logits(h_SxCxD.reshape(-1, h_SxCxD.shape[-1]), w_DxV)
                            .reshape(*h_SxCxD.shape[:2], -1), h_KxSxCxD)
    return untile(z_KxSxCxV, h_NxRxD.shape[:2])


def whole_head(w_DxV: jax.Array) -> jax.Array:
    """The LM head gathered whole over the hidden axis (vocabulary over 'tensor') on the current mesh: every
    device multiplies its own rows by it, one gather per pass instead of one per chunk (no-op outside a mesh)."""
    return constrain(w_DxV, ("act_embed", "act_vocab"))


def token_chunks(h_NxRxD: jax.Array, targets_NxR: jax.Array, token_chunk: int) -> tuple[jax.Array, jax.Array]:
    """The hidden states and targets in chunks for the LM head: (`[K, S, C, D]`, int32 `[K, S, C]`).

    The N rows are cut into S blocks of consecutive rows, S = the devices the rows are sharded over on the current
    mesh (1 outside a mesh); each block's tokens are flattened row by row, padded with zero states up to a multiple
    of C = token_chunk // S (at least 1, at most the block's tokens; all of them when token_chunk <= 0) and cut into
    K chunks. Chunk k holds every block's k-th piece with the block axis pinned to the devices of its rows, so each
    device runs the LM head on its own rows only, as one device would on them alone (chunks of all N*R tokens
    would each sit on one device, and XLA would gather every chunk to every device or split the hidden axis and
    sum the logits across devices). Unsharded (S = 1) the chunks are the flattened N*R tokens, token_chunk each.
    """
    n, r, d = h_NxRxD.shape
    shards = activation_shards(n)
    tokens = n // shards * r
    chunk = tokens if token_chunk <= 0 else max(1, min(tokens, token_chunk // shards))
    num = -(-tokens // chunk)
    pad = ((0, 0), (0, num * chunk - tokens))
    h_SxTxD = jnp.pad(h_NxRxD.reshape(shards, tokens, d), pad + ((0, 0),))
    t_SxT = jnp.pad(targets_NxR.reshape(shards, tokens).astype(jnp.int32), pad)
    h_KxSxCxD = constrain(jnp.swapaxes(h_SxTxD.reshape(shards, num, chunk, d), 0, 1),
                          (None, "act_batch", "act_len", "act_embed"))
    return h_KxSxCxD, jnp.swapaxes(t_SxT.reshape(shards, num, chunk), 0, 1)


def untile(x_KxSxC: jax.Array, rows_tokens: tuple[int, int]) -> jax.Array:
    """Per-chunk results `[K, S, C, ...]` back to `[N, R, ...]` (the inverse of `token_chunks`, padding dropped)."""
    k, s, c = x_KxSxC.shape[:3]
    n, r = rows_tokens
    rest = x_KxSxC.shape[3:]
    return jnp.swapaxes(x_KxSxC, 0, 1).reshape(s, k * c, *rest)[:, :n // s * r].reshape(n, r, *rest)


def causal_forward_inputs(batch) -> tuple[jax.Array, jax.Array, AttentionMask]:
    """tokens, positions and the causal mask (a pattern with key padding, for the fused kernels) of a batch (an
    `UpdateBatch`, or anything with its `tokens_NxL` and `valid_NxL`)."""
    valid = batch.valid_NxL
    return batch.tokens_NxL, positions_from_mask(valid), causal(valid)


def ar_logps(graphdef: nnx.GraphDef, params, batch, spec: LogpSpec = LogpSpec()):
    """Autoregressive `logps_fn`: hidden states at P-1 .. L-2 predict the response tokens.

    Returns float32 `(logp_NxR, entropy_NxR)`; the params are cast to `spec.compute_dtype` here, inside whatever
    function is differentiated, so their gradients keep the params' own dtype.
    """
    model = nnx.merge(graphdef, cast_floating(params, spec.dtype))
    tokens, positions, mask = causal_forward_inputs(batch)
    num_resp = batch.response_mask_NxR.shape[1]
    h_NxLxD, _ = model.hidden(tokens, positions, mask)
    return chunked_token_logps(h_NxLxD[:, -num_resp - 1:-1], model.lm_head_weight(), tokens[:, -num_resp:],
                               token_chunk=spec.logits_chunk, vocab_chunk=spec.vocab_chunk)


def ar_values(graphdef: nnx.GraphDef, params, batch, spec: LogpSpec = LogpSpec()) -> jax.Array:
    """Critic values of the states before each response token (verl `values[:, -R-1:-1]`), float32."""
    model = nnx.merge(graphdef, cast_floating(params, spec.dtype))
    tokens, positions, mask = causal_forward_inputs(batch)
    num_resp = batch.response_mask_NxR.shape[1]
    return model(tokens, positions, mask)[:, -num_resp - 1:-1].astype(jnp.float32)
