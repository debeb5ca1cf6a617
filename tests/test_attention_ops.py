"""Attention implementations (models/attention_ops.py) against the einsum path, on the CPU.

The xla implementation of `jax.nn.dot_product_attention` runs here with the same arguments the cudnn one gets
(cuDNN itself needs a CUDA GPU); splash attention runs in Pallas interpret mode; an ahead-of-time compile for a
TPU topology (libtpu on the CPU) shows that "auto" puts the splash kernel into the program.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_reason.models import attention as A
from jaxrl_reason.models import attention_ops as O
from jaxrl_reason.models import sharding
from jaxrl_reason.models.transformer import Transformer, TransformerConfig

T = 128  # the splash kernel's smallest tile


def _valid(b, t):
    """Row 0: left padding (a prompt) and right padding (a short response); row 1: right padding only; row 2 none."""
    valid = np.ones((b, t), bool)
    valid[0, :9], valid[0, t - 20:] = False, False
    valid[1, t - 33:] = False
    return valid


def _masks(valid):
    return {"causal": A.causal(valid), "bidirectional": A.bidirectional(valid), "block": A.block_causal(valid, 8, 13)}


def _splash_pattern(m):
    t = m.shape[1]
    return np.asarray(O.splash_pattern(m.kind, t, m.block_size, m.start)[:, :])


@pytest.mark.parametrize("kind,block_size,start", [("causal", 1, 0), ("bidirectional", 1, 0), ("block", 1, 0),
                                                   ("block", 3, 5), ("block", 4, 0), ("block", 2, 11)])
def test_splash_pattern_and_segment_ids_match_dense(kind, block_size, start):
    """Kernel form (splash mask class & equal segment ids) == dense mask on real-query rows; padding rows see
    only their own slot."""
    t = 14
    valid = _valid(3, t)
    m = A.pattern(kind, valid, block_size, start)
    dense = np.asarray(m.dense())
    seg = np.asarray(m.segment_ids())
    kernel_BxTxS = _splash_pattern(m)[None] & (seg[:, :, None] == seg[:, None, :])
    np.testing.assert_array_equal(kernel_BxTxS[valid], dense[valid])
    np.testing.assert_array_equal(kernel_BxTxS[~valid], np.eye(t, dtype=bool)[None].repeat(3, 0)[~valid])


def _qkv(b, t, n, kv, h, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kv, h, t)), jnp.float32)  # the KV-cache layout
    v = jnp.asarray(rng.normal(size=(b, kv, t, h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    return q, k, v, w


def _out_and_grads(impl, q, k, v, w, m, valid):
    """Output and d/d(q, k, v) of sum(out * w) over real-query rows, in one compiled program."""
    def f(q, k, v):
        out = O.attend(q, k, v, m, impl)
        return jnp.sum(out * w * valid[:, :, None, None]), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("kind,n,kv", [("causal", 4, 2), ("bidirectional", 4, 1), ("block", 2, 2)])
def test_kernel_matches_einsum(impl, kind, n, kv):
    valid = _valid(3, T)
    m = _masks(valid)[kind]
    q, k, v, w = _qkv(3, T, n, kv, 16)
    want_out, want_grads = _out_and_grads("einsum", q, k, v, w, m, valid)
    got_out, got_grads = _out_and_grads(impl, q, k, v, w, m, valid)
    rows = slice(None) if impl == "xla" else valid  # xla takes the dense mask: padding rows agree too
    np.testing.assert_allclose(np.asarray(got_out)[rows], np.asarray(want_out)[rows], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(got_out)).all()
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.devices(8)
def test_splash_under_mesh():
    """Under a (data, fsdp, tensor) mesh the kernel runs per shard (rows over data, kv heads over tensor)."""
    valid = _valid(4, T)
    m = A.causal(valid)
    q, k, v, w = _qkv(4, T, 4, 2, 16, seed=2)
    want_out, want_grads = _out_and_grads("einsum", q, k, v, w, m, valid)
    with jax.set_mesh(sharding.make_mesh(4, 1, 2)):
        got_out, got_grads = _out_and_grads("splash", q, k, v, w, m, valid)
    np.testing.assert_allclose(np.asarray(got_out)[valid], np.asarray(want_out)[valid], rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def _mask_of(kind, t=T, b=2):
    valid = np.ones((b, t), bool)
    if kind == "two_stream":
        return A.explicit(A.tracerl_mask(2, (t - 2) // 2, 4, np.ones((b, t), bool)))
    if kind == "cached":
        return A.cached_causal(valid, 5, 1)
    return A.pattern(kind, valid, 4, 2)


@pytest.mark.parametrize("platform", ["cpu", "gpu", "cuda", "tpu"])
def test_auto_choice(platform):
    kernel = {"cpu": "einsum", "gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}[platform]
    for kind in ("causal", "bidirectional", "block"):
        assert O.choose_impl("auto", _mask_of(kind), platform, jnp.bfloat16, 128) == kernel
    for kind in ("two_stream", "cached"):  # no kernel takes them, whatever is asked for
        for impl in O.ATTENTION_IMPLS:
            assert O.choose_impl(impl, _mask_of(kind), platform, jnp.bfloat16, 128) == "einsum"
    # shapes / dtypes a kernel cannot take fall back to einsum under auto
    assert O.choose_impl("auto", _mask_of("causal", t=100), platform, jnp.bfloat16, 128) == \
        ("cudnn" if kernel == "cudnn" else "einsum")
    assert O.choose_impl("auto", _mask_of("causal"), platform, jnp.float32, 128) == \
        ("splash" if kernel == "splash" else "einsum")
    assert O.choose_impl("einsum", _mask_of("causal"), platform, jnp.bfloat16, 128) == "einsum"
    assert O.choose_impl("xla", _mask_of("causal"), platform, jnp.float32, 128) == "xla"


def test_forced_choice_errors():
    with pytest.raises(ValueError, match="CUDA GPU"):
        O.choose_impl("cudnn", _mask_of("causal"), "cpu", jnp.bfloat16, 128)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        O.choose_impl("cudnn", _mask_of("causal"), "gpu", jnp.float32, 128)
    with pytest.raises(ValueError, match="multiples of 128"):
        O.choose_impl("splash", _mask_of("causal", t=100), "tpu", jnp.bfloat16, 128)
    with pytest.raises(ValueError, match="Unknown attention_impl"):
        O.choose_impl("flash", _mask_of("causal"), "tpu", jnp.bfloat16, 128)
    cfg = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="Unknown attention_impl"):
        TransformerConfig(**cfg, attention_impl="flash").validate()


def _tiny(impl):
    cfg = TransformerConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                            num_kv_heads=2, attention_impl=impl)
    return Transformer(cfg, rngs=nnx.Rngs(3))


def test_model_default_is_einsum_and_kernels_agree():
    """On the CPU the default ("auto") with an AttentionMask is the einsum path with the bool mask bit for bit; the
    model configured for splash gives the same logits on real tokens."""
    valid = _valid(2, T)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 40, size=(2, T)), jnp.int32)
    pos = A.positions_from_mask(valid)
    fwd = nnx.jit(lambda model, mask: model(tokens, pos, mask)[0])
    want = np.asarray(fwd(_tiny("einsum"), A.causal_mask(valid)))
    np.testing.assert_array_equal(np.asarray(fwd(_tiny("auto"), A.causal(valid))), want)
    got = np.asarray(fwd(_tiny("splash"), A.causal(valid)))
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-4)


def _tpu_topology():
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu (a compile check)
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    except Exception as e:  # noqa: BLE001  (libtpu missing or unable to load: say why)
        pytest.skip(f"no TPU topology on this machine: {type(e).__name__}: {str(e)[:200]}")


def test_aot_tpu_compile_picks_splash():
    """Compiled ahead of time for v5e:2x2 under its mesh, "auto" lowers the causal forward and backward to splash
    Pallas kernels (Mosaic custom calls: forward, dq, dkv), and an explicit mask to none."""
    topo = _tpu_topology()
    mesh = jax.sharding.Mesh(np.array(topo.devices).reshape(4, 1, 1), ("data", "fsdp", "tensor"))
    b, t, n, kv, h = 4, 2 * T, 4, 2, 128
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sh)  # noqa: E731
    args = (spec((b, t, n, h), jnp.bfloat16), spec((b, kv, h, t), jnp.bfloat16), spec((b, kv, t, h), jnp.bfloat16),
            spec((b, t), jnp.bool_))

    def grads(make_mask):
        def loss(q, k, v, valid):
            return O.attend(q, k, v, make_mask(valid)).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))

    # the suite's global "highest" matmul precision asks Mosaic for float32 contraction of bf16 operands, which
    # it rejects; programs run with the default precision
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        causal = jax.jit(grads(A.causal)).lower(*args)
        explicit = jax.jit(grads(lambda valid: A.explicit(A.causal_mask(valid)))).lower(*args)
        assert causal.as_text().count("tpu_custom_call") == 3
        assert explicit.as_text().count("tpu_custom_call") == 0
        assert causal.compile().memory_analysis() is not None
