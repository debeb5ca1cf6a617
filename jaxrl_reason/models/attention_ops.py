"""Attention implementations behind one call, chosen by platform and mask.

`attend(q, k, v, mask, impl)` takes q [B, T, N, H], K [B, K, H, S] and V [B, K, S, H] (the KV-cache layout,
`LayerCache`) and a mask (`AttentionMask` or bool [B, T, S]); it returns [B, T, N, H] in q's dtype.

  einsum  scores in float32 [B, K, G, T, S] from the dense mask; any mask, every platform (the CPU default).
  xla     `jax.nn.dot_product_attention(implementation="xla")`: the same call as cudnn, portable.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN flash attention on CUDA GPUs, bf16/fp16:
          `is_causal` for the causal pattern (upper blocks skipped) and the mask as a [B, 1, T, S] bias, so
          no [B, N, T, S] scores exist.
  splash  Pallas splash attention on TPU (jax.experimental.pallas.ops.tpu): the pattern as a splash mask class
          (causal, full, block-causal: blocks outside it are skipped), padding as segment ids; interpret mode
          elsewhere (tests on the CPU). With bf16 operands Mosaic rejects a global
          `jax_default_matmul_precision="highest"` (it asks the kernel's matmuls for float32 contraction).

"auto" picks cudnn on a CUDA GPU and splash on a TPU when the mask is a self-attention pattern and the shapes
suit the kernel, otherwise einsum. Explicit masks (two-stream) and cached masks (decode, denoise over a KV cache)
always take the einsum path: no kernel takes them, and a cached step has few queries. The platform is the
ambient mesh's (so an ahead-of-time compile for a TPU topology on the CPU picks splash), else the default backend.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from jaxrl_reason.models.attention import ATTENTION_KINDS, AttentionMask, as_mask

ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
_GPU_PLATFORMS = ("gpu", "cuda")
_SPLASH_BLOCK = 128  # the splash kernel's smallest tile along a sequence


def target_platform() -> str:
    """The platform the program is compiled for: the ambient mesh's devices, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        platform = getattr(mesh.abstract_device, "platform", None)
        if platform:
            return platform
    return jax.default_backend()


def _cudnn_problem(platform, dtype, head_dim, t, s):
    if platform not in _GPU_PLATFORMS:
        return f"cuDNN attention needs a CUDA GPU, and this program compiles for {platform!r}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention takes bfloat16 or float16, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 256:
        return f"cuDNN flash attention needs head_dim a multiple of 8 and at most 256, got {head_dim}"
    if t % 2 or s % 2:
        return f"cuDNN attention with a padding bias needs even lengths, got T={t}, S={s}"
    return None


def _splash_problem(t, s):
    if t % _SPLASH_BLOCK or s % _SPLASH_BLOCK:
        return f"splash attention needs lengths that are multiples of {_SPLASH_BLOCK}, got T={t}, S={s}"
    return None


def choose_impl(impl: str, mask: AttentionMask, platform: str, dtype, head_dim: int) -> str:
    """The implementation that runs `mask` on `platform`: "einsum" | "xla" | "cudnn" | "splash".

    A named kernel runs every self-attention pattern mask and raises ValueError where it cannot (wrong platform,
    dtype or lengths); explicit and cached masks take the einsum path whatever `impl` says.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"Unknown attention_impl {impl!r}; expected one of {ATTENTION_IMPLS}.")
    if impl == "einsum" or mask.kind not in ATTENTION_KINDS or not mask.self_attention:
        return "einsum"
    _, t, s = mask.shape
    problems = {"xla": lambda: None, "cudnn": lambda: _cudnn_problem(platform, dtype, head_dim, t, s),
                "splash": lambda: _splash_problem(t, s)}
    if impl == "auto":
        if platform in _GPU_PLATFORMS and problems["cudnn"]() is None:
            return "cudnn"
        if platform == "tpu" and problems["splash"]() is None:
            return "splash"
        return "einsum"
    problem = problems[impl]()
    if problem is not None:
        raise ValueError(f"attention_impl={impl!r} cannot run this attention: {problem}.")
    return impl


def einsum_attention(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask_BxTxS):
    """Grouped-query softmax attention, scores and softmax in float32, no K/V repeat.

    Query head n uses kv head n // (N // K) (HF `repeat_kv` order). The G query heads of a kv head are stacked as
    G*T rows, so both contractions are 4-D batched matmuls over (B, K) (2-3x faster on XLA:CPU than the 5-D einsum
    over [B, T, K, G, H]; K with slots last is faster again, for decode and for the training step). Masked scores
    get a finite minimum and rows with no visible key output zeros, so nothing is NaN.
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


def dot_product_attention(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask: AttentionMask, implementation: str):
    """`jax.nn.dot_product_attention` ("xla" or "cudnn"): K/V as [B, S, K, H] (GQA without repeat), `is_causal`
    for the causal pattern and the mask as [B, 1, T, S] (cuDNN turns it into a bias once per call)."""
    k_BxSxKxH = k_BxKxHxS.transpose(0, 3, 1, 2)
    v_BxSxKxH = v_BxKxSxH.transpose(0, 2, 1, 3)
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask.dense()[:, None],
                                        is_causal=mask.kind == "causal", implementation=implementation)


class BlockCausalMask(splash_mask._ComputableMask):  # pylint: disable=protected-access
    """Splash mask: key k visible from query q when floor((k - start) / bs) <= floor((q - start) / bs).

    Ids are shifted by a multiple of the block size so that the kernel divides non-negative integers only.
    """

    def __init__(self, shape: tuple[int, int], block_size: int, start: int):
        self.block_size, self.start = int(block_size), int(start)
        shift = (-(-self.start // self.block_size) + 1) * self.block_size - self.start  # -start + k * bs, >= 0

        def block_causal_fn(q_ids, kv_ids):
            return (kv_ids + shift) // self.block_size <= (q_ids + shift) // self.block_size

        super().__init__(shape=shape, mask_function=block_causal_fn)

    def __eq__(self, other):
        return (isinstance(other, BlockCausalMask) and self.shape == other.shape
                and (self.block_size, self.start) == (other.block_size, other.start))

    def __hash__(self):
        return hash((type(self), self.shape, self.block_size, self.start))


def splash_pattern(kind: str, t: int, block_size: int = 1, start: int = 0) -> splash_mask.Mask:
    """The splash mask class of a pattern over T x T slots."""
    if kind == "causal":
        return splash_mask.CausalMask((t, t))
    if kind == "bidirectional":
        return splash_mask.FullMask((t, t))
    if kind == "block":
        return BlockCausalMask((t, t), block_size, start)
    raise ValueError(f"No splash mask for attention kind {kind!r}.")


def _splash_kernel(kind, t, block_size, start, group, interpret):
    """An MQA splash kernel (the G query heads of a kv head share its K/V). Built inside each trace: its mask
    tables become constants of that program (splash caches the mask processing itself)."""
    tile = 512 if t % 512 == 0 else _SPLASH_BLOCK
    sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                              block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
    heads = splash_mask.MultiHeadMask([splash_pattern(kind, t, block_size, start)] * group)
    return splash.make_splash_mqa_single_device(heads, block_sizes=sizes, interpret=interpret)


def splash_attention(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask: AttentionMask, interpret: bool):
    """Splash attention, vmapped over batch rows and kv heads; padding as `mask.segment_ids()`."""
    b, t, n, h = q_BxTxNxH.shape
    kv = k_BxKxHxS.shape[1]
    g = n // kv
    kernel = _splash_kernel(mask.kind, t, mask.block_size, mask.start, g, interpret)
    q_BxKxGxTxH = (q_BxTxNxH * jnp.asarray(h ** -0.5, q_BxTxNxH.dtype)).reshape(b, t, kv, g, h)
    q_BxKxGxTxH = q_BxKxGxTxH.transpose(0, 2, 3, 1, 4)
    k_BxKxSxH = k_BxKxHxS.transpose(0, 1, 3, 2)

    def one_row(q_KxGxTxH, k_KxSxH, v_KxSxH, seg_S):
        ids = splash.SegmentIds(q=seg_S, kv=seg_S)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KxGxTxH, k_KxSxH, v_KxSxH)

    rows = _over_mesh(one_row, b, kv)
    out_BxKxGxTxH = rows(q_BxKxGxTxH, k_BxKxSxH, v_BxKxSxH, mask.segment_ids())
    return out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_BxTxNxH.dtype)


def _over_mesh(one_row, b, kv):
    """vmap over rows; under a mesh (the project's `AxisType.Auto` meshes), inside shard_map with rows over the
    batch axes and kv heads over 'tensor' where they divide (XLA does not partition a Pallas call)."""
    rows = jax.vmap(one_row)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return rows
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_axes = tuple(a for a in ("data", "fsdp") if a in sizes)
    if b % int(np.prod([sizes[a] for a in batch_axes])):
        batch_axes = ()
    head_axis = "tensor" if "tensor" in sizes and kv % sizes["tensor"] == 0 else None
    spec = jax.sharding.PartitionSpec(batch_axes or None, head_axis)
    in_specs = (spec, spec, spec, jax.sharding.PartitionSpec(batch_axes or None))
    return jax.shard_map(rows, in_specs=in_specs, out_specs=spec, check_vma=False)


def attend(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask, impl: str = "auto"):
    """Softmax attention of q [B, T, N, H] over K [B, K, H, S] / V [B, K, S, H] with `mask` (an `AttentionMask`
    or bool [B, T, S]) by the implementation `choose_impl` picks. Returns [B, T, N, H] in q's dtype.

    Kernel outputs equal the einsum path's on rows of real queries; on padding rows both are finite.
    """
    mask = as_mask(mask)
    chosen = choose_impl(impl, mask, target_platform(), q_BxTxNxH.dtype, q_BxTxNxH.shape[-1])
    if chosen == "einsum":
        return einsum_attention(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask.dense())
    if chosen == "splash":
        return splash_attention(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask, interpret=target_platform() != "tpu")
    return dot_product_attention(q_BxTxNxH, k_BxKxHxS, v_BxKxSxH, mask, chosen).astype(q_BxTxNxH.dtype)
