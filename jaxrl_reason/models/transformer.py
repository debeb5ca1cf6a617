"""One NNX decoder for Qwen2 / Qwen3 / Llama-style LMs, autoregressive or masked-diffusion.

RMSNorm, rotary embeddings (HF `rotate_half` layout), grouped-query attention, SwiGLU MLP; optional qkv
bias (Qwen2), q/k RMSNorm over head_dim before RoPE (Qwen3) and tied embeddings. The model never chooses an
attention pattern: the caller passes `mask_BxTxS` ("query t may attend key s", built with `models/attention.py`),
a bool [B, T, S] array or an `AttentionMask` (pattern + key padding, which a fused kernel can take).
`cfg.attention` is metadata for mask builders, HF export and callers.

KV cache rule (one rule for AR prefill/decode and block-diffusion denoise/commit): with a cache of S slots,
the K/V of the T input tokens are written at slots `[cache_index, cache_index + T)` (same index for every
row, `lax.dynamic_update_slice`), then the T queries attend over all S slots with the given mask. A shared-prefix
cache (`models/shared_prefix.py`: a prompt part per group of rows, an own part per row) takes the write in its own
part and a `PrefixMask`.

Every parameter is an `nnx.Param` with `logical_axes` metadata (names: "vocab", "embed", "heads",
"kv_heads", "mlp", "head_dim", "norm", and "layers" for the leading axis of stacked layers), mapped to mesh
axes by `models/sharding.py`. The key is not flax's `out_sharding`, so building a model outside a mesh works
with default flax settings. Activations carry logical sharding constraints (`sharding.constrain`: batch over
the data axes, embedding whole, heads and MLP columns over "tensor"), so under a mesh the fsdp axis gathers
weights instead of resharding activations; outside a mesh they are no-ops.

Layer layouts: `scan_layers=False` keeps the layers as a list of Blocks (params `layers/<i>/...`), unrolled
in the program; `scan_layers=True` keeps one Block whose params have a leading layer axis (`layers/...`,
shape [L, ...]) run by `lax.scan`, so compile time does not grow with depth. The KV cache follows the layout
(a tuple of per-layer `LayerCache`, or one `LayerCache` with a leading layer axis). `remat` picks what the
backward pass recomputes per layer (`REMAT_POLICIES`); the names the "names" policy can save are tagged with
`checkpoint_name` in the block (`CHECKPOINT_NAMES`).
"""
import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxrl_reason.models import attention_ops, shared_prefix
from jaxrl_reason.models.attention import ATTENTION_KINDS
from jaxrl_reason.models.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = ("none", "full", "dots_saveable", "names")
# Block outputs tagged for the "names" remat policy: the projections' outputs.
CHECKPOINT_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    attention_impl: str = "auto"  # "auto" | "einsum" | "xla" | "cudnn" | "splash" (models/attention_ops.py)
    scan_layers: bool = False  # one stacked Block run by lax.scan instead of an unrolled list of Blocks
    remat: str = "none"  # "none" | "full" | "dots_saveable" | "names": what each layer's backward recomputes
    remat_names: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # saved by remat="names"
    constrain_activations: bool = True  # logical sharding constraints on activations (no-op outside a mesh)

    def __post_init__(self):
        object.__setattr__(self, "remat_names", tuple(self.remat_names))  # hashable, also from a config list

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
        if self.attention_impl not in attention_ops.ATTENTION_IMPLS:
            raise ValueError(f"Unknown attention_impl {self.attention_impl!r}; expected one of "
                             f"{attention_ops.ATTENTION_IMPLS}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat policy {self.remat!r}; expected one of {REMAT_POLICIES}.")
        unknown = [n for n in self.remat_names if n not in CHECKPOINT_NAMES]
        if unknown:
            raise ValueError(f"Unknown remat_names {unknown}; the block tags {CHECKPOINT_NAMES}.")

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


# One LayerCache per layer (unrolled layers), or one LayerCache whose fields have a leading layer axis
# (scanned layers). Either way a pytree.
KVCache = tuple[LayerCache, ...] | LayerCache
SLOT_AXIS = LayerCache(k=-1, v=-2)  # the slot axis of each cache field (counted from the end: both layouts)


def init_cache(cfg: TransformerConfig, batch: int, length: int, dtype=None) -> KVCache:
    """Zero KV cache: per layer K `[batch, num_kv_heads, head_dim, length]`, V `[batch, num_kv_heads, length,
    head_dim]`; with `cfg.scan_layers` one `LayerCache` of K `[L, batch, ...]`, V `[L, batch, ...]`."""
    dtype = cfg.dtype if dtype is None else dtype
    k_shape = (batch, cfg.num_kv_heads, cfg.head_dim_, length)
    v_shape = (batch, cfg.num_kv_heads, length, cfg.head_dim_)
    if cfg.scan_layers:
        stacked = lambda shape: jnp.zeros((cfg.num_layers, *shape), dtype)
        return LayerCache(stacked(k_shape), stacked(v_shape))
    return tuple(LayerCache(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype)) for _ in range(cfg.num_layers))


def stacked_cache(cache) -> bool:
    """Whether a cache is the stacked layout (one per-layer structure with a leading layer axis), either kind:
    a `KVCache` or a shared-prefix cache (`models/shared_prefix.py`)."""
    return isinstance(cache, (LayerCache, shared_prefix.PrefixLayerCache))


def cache_layers(cache) -> int:
    """Number of layers a cache holds (either layout, either kind)."""
    return jax.tree.leaves(cache)[0].shape[0] if stacked_cache(cache) else len(cache)


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


def attend(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxTxS, impl: str = "auto"):
    """Grouped-query softmax attention (`models/attention_ops.attend`): q [B, T, N, H], K/V in the KV-cache layout
    (`LayerCache`: K [B, K, H, S], V [B, K, S, H]), mask an `AttentionMask` or bool [B, T, S]; `impl` is
    `TransformerConfig.attention_impl`. Returns [B, T, N, H] in q's dtype."""
    return attention_ops.attend(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxTxS, impl)


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
        q, k, v = (checkpoint_name(x, n) for x, n in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")))
        q = _constrain(cfg, q.reshape(b, t, cfg.num_heads, h), _ACT_HEADS)
        k = _constrain(cfg, k.reshape(b, t, cfg.num_kv_heads, h), _ACT_KV_HEADS)
        v = _constrain(cfg, v.reshape(b, t, cfg.num_kv_heads, h), _ACT_KV_HEADS)
        if cfg.qk_norm:
            q = rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q = apply_rope(q, positions_BxT, cfg.rope_theta)
        k = apply_rope(k, positions_BxT, cfg.rope_theta).transpose(0, 2, 3, 1)  # -> [B, K, H, T]
        v = v.transpose(0, 2, 1, 3)  # -> [B, K, T, H]
        if isinstance(cache, shared_prefix.PrefixLayerCache):  # decode over a group-shared prompt part
            own = _write_cache(cache.own, k, v, cache_index)
            cache = shared_prefix.PrefixLayerCache(cache.prompt, own)
            kv = [x.astype(q.dtype) for x in (*cache.prompt, *own)]
            out = shared_prefix.attend(q, *kv, mask_BxTxS).reshape(b, t, cfg.num_heads * h)
        else:
            if cache is not None:
                cache = _write_cache(cache, k, v, cache_index)
                k, v = cache.k.astype(q.dtype), cache.v.astype(q.dtype)
            out = attend(q, k, v, mask_BxTxS, cfg.attention_impl).reshape(b, t, cfg.num_heads * h)
        return checkpoint_name(dense(out, self.o_proj[...]), "o_proj"), cache


def _write_cache(cache: LayerCache, k_BxKxHxT, v_BxKxTxH, cache_index) -> LayerCache:
    """The cache with the T new K/V at slots [cache_index, cache_index + T) (in place inside a loop)."""
    idx = jnp.asarray(cache_index, jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    return LayerCache(
        jax.lax.dynamic_update_slice(cache.k, k_BxKxHxT.astype(cache.k.dtype), (zero, zero, zero, idx)),
        jax.lax.dynamic_update_slice(cache.v, v_BxKxTxH.astype(cache.v.dtype), (zero, zero, idx, zero)))


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)); x + swiglu(norm(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.dtype
        self.cfg = cfg
        self.eps = cfg.rms_norm_eps
        self.input_norm = _param(None, (d,), ("norm",), dt)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = _param(None, (d,), ("norm",), dt)
        self.gate_proj = _param(rngs.params(), (d, f), ("embed", "mlp"), dt)
        self.up_proj = _param(rngs.params(), (d, f), ("embed", "mlp"), dt)
        self.down_proj = _param(rngs.params(), (f, d), ("mlp", "embed"), dt)

    def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache=None, cache_index=None):
        cfg = self.cfg
        x_BxTxD = _constrain(cfg, x_BxTxD, _ACT_EMBED)
        a, cache = self.attn(rms_norm(x_BxTxD, self.input_norm[...], self.eps), positions_BxT, mask_BxTxS,
                             cache, cache_index)
        x_BxTxD = _constrain(cfg, x_BxTxD + a, _ACT_EMBED)
        y = rms_norm(x_BxTxD, self.post_attn_norm[...], self.eps)
        gate = checkpoint_name(dense(y, self.gate_proj[...]), "gate_proj")
        up = checkpoint_name(dense(y, self.up_proj[...]), "up_proj")
        y_BxTxF = _constrain(cfg, jax.nn.silu(gate) * up, _ACT_MLP)
        out = checkpoint_name(dense(y_BxTxF, self.down_proj[...]), "down_proj")
        return _constrain(cfg, x_BxTxD + out, _ACT_EMBED), cache


_ACT_EMBED = ("act_batch", "act_len", "act_embed")
_ACT_HEADS = ("act_batch", "act_len", "act_heads", None)
_ACT_KV_HEADS = ("act_batch", "act_len", "act_kv_heads", None)
_ACT_MLP = ("act_batch", "act_len", "act_mlp")


def _constrain(cfg: TransformerConfig, x, logical_axes):
    return constrain(x, logical_axes) if cfg.constrain_activations else x


def _remat_policy(cfg: TransformerConfig):
    """The `jax.checkpoint` policy of `cfg.remat` ("full": save nothing, recompute the whole layer)."""
    if cfg.remat == "dots_saveable":
        return jax.checkpoint_policies.dots_saveable
    if cfg.remat == "names":
        return jax.checkpoint_policies.save_only_these_names(*cfg.remat_names)
    return jax.checkpoint_policies.nothing_saveable


def _stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose params are the blocks' params stacked on a new leading "layers" axis."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    for var in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        var.set_metadata(logical_axes=("layers",) + tuple(var.logical_axes))
    return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
    """Decoder LM. `__call__` -> (float32 logits [B, T, V], updated cache or None).

    `lm_head=False` builds the backbone without an (untied) LM head, for value models;
    `logits` then raises.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
        cfg.validate()
        self.cfg = cfg
        dt = cfg.dtype
        self.embed = _param(rngs.params(), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt, std=0.02)
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        # Stacked from the same per-layer init, so both layouts of one seed hold the same weights.
        self.layers = _stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = _param(None, (cfg.hidden_size,), ("norm",), dt)
        self.has_lm_head = lm_head and not cfg.tie_embeddings
        if self.has_lm_head:
            self.lm_head = _param(rngs.params(), (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)

    def hidden(self, tokens_BxT, positions_BxT, mask_BxTxS, cache=None, cache_index=None):
        """Final-normed hidden states [B, T, D] (param dtype) and the updated cache (or None)."""
        cfg = self.cfg
        if (cache is None) != (cache_index is None):
            raise ValueError("cache and cache_index must be given together.")
        if cache is not None and stacked_cache(cache) != cfg.scan_layers:
            raise ValueError(f"The cache layout does not match the model's scan_layers={cfg.scan_layers}; "
                             "build it with init_cache(model.cfg, ...).")
        if cache is not None and cache_layers(cache) != cfg.num_layers:
            raise ValueError(f"cache has {cache_layers(cache)} layers but the model has {cfg.num_layers}.")
        t = tokens_BxT.shape[1]
        s = t if cache is None else (cache if cfg.scan_layers else cache[0]).slots
        if isinstance(cache_index, int) and not 0 <= cache_index <= s - t:
            raise ValueError(f"cache_index {cache_index} with {t} new tokens does not fit a cache of {s} slots.")
        if mask_BxTxS.shape != (*tokens_BxT.shape, s):
            raise ValueError(f"mask_BxTxS has shape {mask_BxTxS.shape}, expected {(*tokens_BxT.shape, s)}.")
        # The table is gathered whole along the embedding (a weight gather) so that the lookup lands directly in
        # the batch-sharded activation layout, not in an embedding-sharded one that needs an all-to-all.
        table_VxD = _constrain(cfg, self.embed[...], ("vocab", "act_embed"))
        x = _constrain(cfg, jnp.take(table_VxD, tokens_BxT, axis=0), _ACT_EMBED)
        run = functools.partial(self._scanned if cfg.scan_layers else self._unrolled,
                                positions_BxT=positions_BxT, mask_BxTxS=mask_BxTxS, cache_index=cache_index)
        x, new_cache = run(x, cache)
        h = _constrain(cfg, rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), _ACT_EMBED)
        return h, new_cache

    def _layer_fn(self, graphdef, positions_BxT, mask_BxTxS, cache_index, remat: bool):
        """(layer params, x, layer cache) -> (x, layer cache); under `jax.checkpoint` with `cfg.remat` when
        `remat` (training passes: the sampler's cached calls have no backward pass to save memory for)."""
        def fn(state, x, cache):
            return nnx.merge(graphdef, state)(x, positions_BxT, mask_BxTxS, cache, cache_index)
        if not remat or self.cfg.remat == "none":
            return fn
        return jax.checkpoint(fn, policy=_remat_policy(self.cfg), prevent_cse=not self.cfg.scan_layers)

    def _unrolled(self, x, cache, *, positions_BxT, mask_BxTxS, cache_index):
        if self.cfg.remat == "none" or cache is not None:
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, c = layer(x, positions_BxT, mask_BxTxS, None if cache is None else cache[i], cache_index)
                new_cache.append(c)
            return x, (None if cache is None else tuple(new_cache))
        for layer in self.layers:
            graphdef, state = nnx.split(layer)
            x, _ = self._layer_fn(graphdef, positions_BxT, mask_BxTxS, cache_index, True)(state, x, None)
        return x, None

    def _scanned(self, x, cache, *, positions_BxT, mask_BxTxS, cache_index):
        graphdef, state = nnx.split(self.layers)
        fn = self._layer_fn(graphdef, positions_BxT, mask_BxTxS, cache_index, cache is None)

        def body(x, xs):
            return fn(*xs[:1], x, xs[1])

        return jax.lax.scan(body, x, (state, cache))

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
