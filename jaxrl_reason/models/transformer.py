"""One NNX decoder for Qwen2 / Qwen3 / Llama-style LMs, autoregressive or masked-diffusion (DESIGN.md §1).

RMSNorm, rotary embeddings (HF `rotate_half` layout), grouped-query attention, SwiGLU MLP; optional qkv
bias (Qwen2), q/k RMSNorm over head_dim before RoPE (Qwen3) and tied embeddings. The model never chooses an
attention pattern: the caller passes a boolean `mask_BxTxS` ("query t may attend key s", built with
`models/attention.py`). `cfg.attention` is metadata for mask builders, HF export and callers.

KV cache rule (one rule for AR prefill/decode and block-diffusion denoise/commit): with a cache of S slots,
the K/V of the T input tokens are written at slots `[cache_index, cache_index + T)` (same index for every
row, `lax.dynamic_update_slice`), then the T queries attend over all S slots with the given mask.

Every parameter is an `nnx.Param` with `logical_axes` metadata (names: "vocab", "embed", "heads",
"kv_heads", "mlp", "head_dim", "norm"), mapped to mesh axes by `models/sharding.py`. The key is not
flax's `out_sharding`, so building a model outside a mesh works with default flax settings.
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_reason.models.attention import ATTENTION_KINDS

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a decoder LM. `attention`, `block_size`, `mask_token_id` are metadata only."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    tie_embeddings: bool = False
    attention: str = "causal"  # "causal" | "bidirectional" | "block"
    block_size: int = 1  # for attention == "block"
    mask_token_id: int | None = None  # diffusion models
    param_dtype: str = "float32"  # "float32" | "bfloat16"; compute in it, softmax + logits float32
    max_position_embeddings: int = 4096

    def validate(self) -> None:
        """Raises ValueError with one sentence for an impossible configuration."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "block_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}).")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                             f"({self.num_heads}); set head_dim explicitly.")
        if self.head_dim_ % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim_}.")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"Unknown attention {self.attention!r}; expected one of {ATTENTION_KINDS}.")
        if self.param_dtype not in _DTYPES:
            raise ValueError(f"Unknown param_dtype {self.param_dtype!r}; expected one of {tuple(_DTYPES)}.")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("rope_theta and rms_norm_eps must be positive.")

    @property
    def head_dim_(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def dtype(self):
        """The jnp dtype of parameters and activations."""
        return _DTYPES[self.param_dtype]


class LayerCache(NamedTuple):
    """One layer's K/V, heads-major so both attention contractions are plain batched matmuls on XLA:CPU.

    K is stored transposed (slots last): the score product `q @ K` then reads K along its contiguous axis, which
    makes a batch-32 decode step's attention ~2x faster on XLA:CPU than with K as [B, n_kv, S, head_dim].
    """
    k: jax.Array  # [B, n_kv, head_dim, S]
    v: jax.Array  # [B, n_kv, S, head_dim]

    @property
    def slots(self) -> int:
        return self.v.shape[SLOT_AXIS.v]


KVCache = tuple[LayerCache, ...]  # one per layer (a pytree)
SLOT_AXIS = LayerCache(k=3, v=2)  # the slot axis of each cache field


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype=None) -> KVCache:
    """Zero KV cache: per layer K `[batch, num_kv_heads, head_dim, length]`, V `[batch, num_kv_heads, length,
    head_dim]`."""
    dtype = cfg.dtype if dtype is None else dtype
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim_, length)
    v_shape = (batch, cfg.num_kv_heads, length, cfg.head_dim_)
    return tuple(LayerCache(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype)) for _ in range(cfg.num_layers))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key, shape, std, dtype):
    """One compiled kernel per (shape, std, dtype): eager model init stays cheap on CPU."""
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _param(key, shape, axes, dtype, std=None):
    """Normal(0, std) init (std = fan_in ** -0.5 by default), or ones when key is None (norm scales)."""
    if key is None:
        return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)
    std = shape[0] ** -0.5 if std is None else std
    return nnx.Param(_normal(key, shape, float(std), jnp.dtype(dtype)), logical_axes=axes)


def rms_norm(x, scale, eps):
    """HF RMSNorm: normalise in float32, cast back to x.dtype, then multiply by the scale."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * x32.astype(x.dtype)


def apply_rope(x_BxTxNxH, positions_BxT, theta):
    """Rotary embedding, HF `rotate_half` layout (first half / second half), computed in float32."""
    half = x_BxTxNxH.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / (2 * half)))
    ang_BxTxH = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(ang_BxTxH)[:, :, None, :], jnp.sin(ang_BxTxH)[:, :, None, :]
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def dense(x_BxTxD, w_DxF):
    """`x @ w` as one 2-D matmul ([B*T, D] @ [D, F]): XLA:CPU runs the weight gradient of a 3-D `x @ w` ~2x
    slower than the same contraction on the flattened rows."""
    return (x_BxTxD.reshape(-1, x_BxTxD.shape[-1]) @ w_DxF).reshape(*x_BxTxD.shape[:-1], w_DxF.shape[-1])


def attend(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxTxS):
    """Grouped-query softmax attention, scores and softmax in float32, no K/V repeat.

    Query head n uses kv head n // (N // K) (HF `repeat_kv` order). K/V are in the KV-cache layout (`LayerCache`:
    K [B, K, H, S], V [B, K, S, H]) and the G query heads of a kv head are stacked as G*T rows, so both contractions
    are 4-D batched matmuls over (B, K) (2-3x faster on XLA:CPU than the 5-D einsum over [B, T, K, G, H]; K with
    slots last is faster again, for decode and for the training step). Masked scores get a finite minimum and
    rows with no visible key output zeros, so nothing is NaN. Returns [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q_BxTxNxH.shape
    kv, s = k_BxKxHxS.shape[1], k_BxKxHxS.shape[3]
    g = n // kv
    q_BxKxQxH = q_BxTxNxH.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, h)
    s_BxKxGxTxS = jnp.einsum("bkqh,bkhs->bkqs", q_BxKxQxH, k_BxKxHxS,
                             preferred_element_type=jnp.float32).reshape(b, kv, g, t, s) * (h ** -0.5)
    m = mask_BxTxS[:, None, None].astype(bool)
    s_BxKxGxTxS = jnp.where(m, s_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s_BxKxGxTxS, axis=-1)
    p = jnp.where(jnp.any(m, axis=-1, keepdims=True), p, 0.0).astype(v_BxKxSxH.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", p.reshape(b, kv, g * t, s), v_BxKxSxH)
    return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nnx.Module):
    """GQA self-attention with RoPE, optional qkv bias and q/k norm, optional KV-cache write."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, n, kv, h, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_, cfg.dtype
        self.cfg = cfg
        self.q_proj = _param(rngs.params(), (d, n * h), ("embed", "heads"), dt)
        self.k_proj = _param(rngs.params(), (d, kv * h), ("embed", "kv_heads"), dt)
        self.v_proj = _param(rngs.params(), (d, kv * h), ("embed", "kv_heads"), dt)
        self.o_proj = _param(rngs.params(), (n * h, d), ("heads", "embed"), dt)
        if cfg.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((n * h,), dt), logical_axes=("heads",))
            self.k_bias = nnx.Param(jnp.zeros((kv * h,), dt), logical_axes=("kv_heads",))
            self.v_bias = nnx.Param(jnp.zeros((kv * h,), dt), logical_axes=("kv_heads",))
        if cfg.qk_norm:
            self.q_norm = _param(None, (h,), ("head_dim",), dt)
            self.k_norm = _param(None, (h,), ("head_dim",), dt)

    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache=None, cache_index=None):
        cfg = self.cfg
        b, t, _ = x_BxTxD.shape
        h = cfg.head_dim_
        q = dense(x_BxTxD, self.q_proj[...])
        k, v = dense(x_BxTxD, self.k_proj[...]), dense(x_BxTxD, self.v_proj[...])
        if cfg.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        q = q.reshape(b, t, cfg.num_heads, h)
        k = k.reshape(b, t, cfg.num_kv_heads, h)
        v = v.reshape(b, t, cfg.num_kv_heads, h)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q = apply_rope(q, positions_BxT, cfg.rope_theta)
        k = apply_rope(k, positions_BxT, cfg.rope_theta).transpose(0, 2, 3, 1)  # -> [B, K, H, T]
        v = v.transpose(0, 2, 1, 3)  # -> [B, K, T, H]
        if cache is not None:
            idx = jnp.asarray(cache_index, jnp.int32)
            zero = jnp.zeros((), jnp.int32)
            k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (zero, zero, zero, idx))
            v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (zero, zero, idx, zero))
            cache = LayerCache(k_all, v_all)
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        out = attend(q, k, v, mask_BxTxS).reshape(b, t, cfg.num_heads * h)
        return dense(out, self.o_proj[...]), cache


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)); x + swiglu(norm(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.dtype
        self.eps = cfg.rms_norm_eps
        self.input_norm = _param(None, (d,), ("norm",), dt)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = _param(None, (d,), ("norm",), dt)
        self.gate_proj = _param(rngs.params(), (d, f), ("embed", "mlp"), dt)
        self.up_proj = _param(rngs.params(), (d, f), ("embed", "mlp"), dt)
        self.down_proj = _param(rngs.params(), (f, d), ("mlp", "embed"), dt)

    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache=None, cache_index=None):
        a, cache = self.attn(rms_norm(x_BxTxD, self.input_norm[...], self.eps), positions_BxT, mask_BxTxS,
                             cache, cache_index)
        x_BxTxD = x_BxTxD + a
        y = rms_norm(x_BxTxD, self.post_attn_norm[...], self.eps)
        y = jax.nn.silu(dense(y, self.gate_proj[...])) * dense(y, self.up_proj[...])
        return x_BxTxD + dense(y, self.down_proj[...]), cache


class Transformer(nnx.Module):
    """Decoder LM. `__call__` -> (float32 logits [B, T, V], updated cache or None).

    `lm_head=False` builds the backbone without an (untied) LM head, for value models (diffusion.md §7.4);
    `logits` then raises.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
        cfg.validate()
        self.cfg = cfg
        dt = cfg.dtype
        self.embed = _param(rngs.params(), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt, std=0.02)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _param(None, (cfg.hidden_size,), ("norm",), dt)
        self.has_lm_head = lm_head and not cfg.tie_embeddings
        if self.has_lm_head:
            self.lm_head = _param(rngs.params(), (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)

    def hidden(self, tokens_BxT, positions_BxT, mask_BxTxS, cache=None, cache_index=None):
        """Final-normed hidden states [B, T, D] (param dtype) and the updated cache (or None)."""
        if (cache is None) != (cache_index is None):
            raise ValueError("cache and cache_index must be given together.")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers but the model has {len(self.layers)}.")
        t = tokens_BxT.shape[1]
        s = t if cache is None else cache[0].slots
        if isinstance(cache_index, int) and not 0 <= cache_index <= s - t:
            raise ValueError(f"cache_index {cache_index} with {t} new tokens does not fit a cache of {s} slots.")
        if mask_BxTxS.shape != (*tokens_BxT.shape, s):
            raise ValueError(f"mask_BxTxS has shape {mask_BxTxS.shape}, expected {(*tokens_BxT.shape, s)}.")
        x = jnp.take(self.embed[...], tokens_BxT, axis=0)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions_BxT, mask_BxTxS, None if cache is None else cache[i], cache_index)
            new_cache.append(c)
        h = rms_norm(x, self.final_norm[...], self.cfg.rms_norm_eps)
        return h, (None if cache is None else tuple(new_cache))

    def lm_head_weight(self) -> jax.Array:
        """The LM head weight [D, V]: the embedding transposed when tied."""
        if not (self.cfg.tie_embeddings or self.has_lm_head):
            raise ValueError("This Transformer was built with lm_head=False and has no LM head.")
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def lm_head_slices(self, vocab_chunk: int | None = None) -> tuple[jax.Array, ...]:
        """The LM head weight [D, V] (the embedding transposed when tied) as column slices of <= `vocab_chunk`."""
        if not (self.cfg.tie_embeddings or self.has_lm_head):
            raise ValueError("This Transformer was built with lm_head=False and has no LM head.")
        if vocab_chunk is not None and (not isinstance(vocab_chunk, int) or vocab_chunk < 1):
            raise ValueError(f"vocab_chunk must be a positive int or None, got {vocab_chunk!r}.")
        w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        v = w_DxV.shape[1]
        step = v if vocab_chunk is None else min(vocab_chunk, v)
        return tuple(w_DxV[:, i:i + step] for i in range(0, v, step))

    def logits(self, h_BxTxD, head_slices: tuple[jax.Array, ...] | None = None):
        """LM head (or tied embedding) -> float32 logits [B, T, V].

        `head_slices` (from `lm_head_slices`) computes the logits as one matmul per vocabulary slice (same
        values). The AR sampler slices once per call, outside its decode loop: on XLA:CPU a [32, 512] x [512, 8192]
        head as 8 matmuls of 1024 columns runs ~3x faster than the one wide matmul (measured, bench_sampler.py).
        """
        head_slices = self.lm_head_slices() if head_slices is None else head_slices
        return jnp.concatenate([jnp.einsum("btd,dv->btv", h_BxTxD, w, preferred_element_type=jnp.float32)
                                for w in head_slices], axis=-1)

    def __call__(self, tokens_BxT, positions_BxT, mask_BxTxS, cache: KVCache | None = None,
                 cache_index=None):
        """tokens int[B, T], positions int[B, T], mask bool[B, T, S] -> (logits f32[B, T, V], cache)."""
        h, cache = self.hidden(tokens_BxT, positions_BxT, mask_BxTxS, cache, cache_index)
        return self.logits(h), cache
