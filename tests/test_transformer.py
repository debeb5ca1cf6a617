"""Transformer: cached decoding == full forward (causal and block), attention vs numpy, bf16, errors."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_reason.models import attention as A
from jaxrl_reason.models import transformer as tf

CFG = tf.TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, qkv_bias=True, qk_norm=True)


def _model(cfg=CFG, seed=0):
    model = tf.Transformer(cfg, rngs=nnx.Rngs(seed))
    # non-trivial biases / norm scales so that every parameter matters.
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param) and (path[-1].endswith("bias") or path[-1].endswith("norm")):
            key = jax.random.PRNGKey(hash(path) % 2**31)
            v[...] = v[...] + 0.3 * jax.random.normal(key, v.shape, v.dtype)
    return model


def _left_padded(b, t, seed=0, vocab=64):
    rng = np.random.default_rng(seed)
    lens = np.array([t, t - 3, 2, t - 1][:b])
    valid = np.arange(t)[None, :] >= (t - lens)[:, None]
    tokens = np.where(valid, rng.integers(1, vocab, (b, t)), 0)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(valid)


def test_attend_matches_numpy_gqa():
    rng = np.random.default_rng(0)
    b, t, s, n, kv, h = 2, 3, 5, 4, 2, 8
    q, k, v = rng.normal(size=(b, t, n, h)), rng.normal(size=(b, s, kv, h)), rng.normal(size=(b, s, kv, h))
    mask = rng.random((b, t, s)) < 0.6
    mask[1, 2] = False  # a row that sees nothing -> zeros, not NaN
    cache_layout = lambda x, axes: jnp.asarray(x.transpose(axes), jnp.float32)  # K [B, K, H, S], V [B, K, S, H]
    got = np.asarray(tf.attend(jnp.asarray(q, jnp.float32), cache_layout(k, (0, 2, 3, 1)),
                               cache_layout(v, (0, 2, 1, 3)), jnp.asarray(mask)))
    want = np.zeros((b, t, n, h))
    for bi in range(b):
        for ti in range(t):
            for ni in range(n):
                g = ni // (n // kv)  # HF repeat_kv: query head n uses kv head n // groups
                sc = k[bi, :, g] @ q[bi, ti, ni] / np.sqrt(h)
                m = mask[bi, ti]
                if m.any():
                    w = np.exp(sc[m] - sc[m].max())
                    want[bi, ti, ni] = (w / w.sum()) @ v[bi, m, g]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rope_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 3, 2, 8))
    pos = np.array([[0, 5, 17]])
    got = np.asarray(tf.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), 1e4))
    inv = 1.0 / 1e4 ** (np.arange(0, 8, 2) / 8)
    ang = pos[..., None] * inv  # [1, 3, 4]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, :, None], np.sin(np.concatenate([ang, ang], -1))[:, :, None]
    rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    np.testing.assert_allclose(got, x * cos + rot * sin, atol=1e-5)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _apply_jit(graphdef, state, method, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args)


def _apply(module, *args, method="__call__"):
    """module.method(*args), jitted over the split state."""
    graphdef, state = nnx.split(module)
    return _apply_jit(graphdef, state, method, *args)


def _jitted(model):
    """model(tokens, pos, mask, cache, idx) as one jitted function of the split state."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, tokens, pos, mask, cache, idx):
        return nnx.merge(graphdef, state)(tokens, pos, mask, cache, idx)

    return lambda tokens, pos, mask, cache=None, idx=None: f(state, tokens, pos, mask, cache, idx)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_causal_decoding_equals_full(scan):
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    model = _model(cfg)
    fwd = _jitted(model)
    b, t, p = 3, 10, 6
    tokens, valid = _left_padded(b, t)
    pos = A.positions_from_mask(valid)
    full, none = fwd(tokens, pos, A.causal_mask(valid))
    assert none is None and full.dtype == jnp.float32
    cache = tf.init_cache(cfg, b, t)
    assert isinstance(cache, tf.LayerCache) == scan and tf.cache_layers(cache) == 2
    logits, cache = fwd(tokens[:, :p], pos[:, :p], A.cached_causal_mask(valid, 0, p), cache, 0)
    outs = [logits]
    for i in range(p, t):
        i = jnp.int32(i)
        step, cache = fwd(jax.lax.dynamic_slice_in_dim(tokens, i, 1, 1), jax.lax.dynamic_slice_in_dim(pos, i, 1, 1),
                          A.cached_causal_mask(valid, i, 1), cache, i)
        outs.append(step)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1))[np.asarray(valid)],
                               np.asarray(full)[np.asarray(valid)], atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_block_decoding_equals_full_with_stale_slots(scan):
    cfg = dataclasses.replace(CFG, attention="block", block_size=3, qkv_bias=False, tie_embeddings=True,
                              scan_layers=scan)
    fwd = _jitted(_model(cfg, seed=1))
    b, t, bs, start = 3, 12, 3, 6  # prompt = 6 (two blocks), response = two blocks of 3
    tokens, valid = _left_padded(b, t, seed=2)
    pos = A.positions_from_mask(valid)
    full, _ = fwd(tokens, pos, A.block_causal_mask(valid, bs, start))
    cache = tf.init_cache(cfg, b, t)
    logits, cache = fwd(tokens[:, :start], pos[:, :start], A.cached_block_mask(valid, 0, start, bs, start),
                        cache, 0)
    outs = [logits]
    for j in range(start, t, bs):
        j = jnp.int32(j)
        mask = A.cached_block_mask(valid, j, bs, bs, start)
        pos_j = jax.lax.dynamic_slice_in_dim(pos, j, bs, 1)
        # denoise pass with garbage tokens writes stale K/V into this block's slots ...
        _, cache = fwd(jnp.full((b, bs), 5, jnp.int32), pos_j, mask, cache, j)
        # ... which the commit pass overwrites; its logits must equal the full forward.
        step, cache = fwd(jax.lax.dynamic_slice_in_dim(tokens, j, bs, 1), pos_j, mask, cache, j)
        outs.append(step)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1))[np.asarray(valid)],
                               np.asarray(full)[np.asarray(valid)], atol=1e-5)


def test_fully_padded_row_no_nan_and_rows_independent():
    model = _model()
    tokens, valid = _left_padded(2, 6)
    valid = valid.at[1].set(False)
    out = _apply(model, tokens, A.positions_from_mask(valid), A.causal_mask(valid))[0]
    assert np.isfinite(np.asarray(out)).all()
    alone = _apply(model, tokens[:1], A.positions_from_mask(valid[:1]), A.causal_mask(valid[:1]))[0]
    np.testing.assert_allclose(np.asarray(out)[0], np.asarray(alone)[0], atol=1e-5)


def test_bfloat16_model_float32_logits():
    cfg = dataclasses.replace(CFG, param_dtype="bfloat16")
    model = tf.Transformer(cfg, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tokens, valid = _left_padded(2, 5)
    logits, _ = _jitted(model)(tokens, A.positions_from_mask(valid), A.causal_mask(valid))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
    # close to the same weights run in float32
    f32 = tf.Transformer(dataclasses.replace(cfg, param_dtype="float32"), rngs=nnx.Rngs(0))
    nnx.update(f32, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model, nnx.Param)))
    ref, _ = _jitted(f32)(tokens, A.positions_from_mask(valid), A.causal_mask(valid))
    assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()


@pytest.mark.parametrize("tie", [False, True])
def test_logits_from_vocab_slices_equal_one_matmul(tie):
    """`lm_head_slices(c)` (the decode head) gives the logits of the one wide matmul, uneven last slice included."""
    model = tf.Transformer(dataclasses.replace(CFG, tie_embeddings=tie), rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(1), (2, 3, CFG.hidden_size))
    w = np.asarray(model.embed[...]).T if tie else np.asarray(model.lm_head[...])
    want = np.einsum("btd,dv->btv", np.asarray(h, np.float64), w)
    slices = model.lm_head_slices(24)  # 64 = 24 + 24 + 16
    assert [x.shape[1] for x in slices] == [24, 24, 16]
    for got in (model.logits(h), model.logits(h, slices)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="vocab_chunk must be a positive int"):
        model.lm_head_slices(0)


def test_logical_axes_and_no_mesh_needed():
    model = tf.Transformer(CFG, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for v in leaves:
        assert len(v.logical_axes) == v[...].ndim
    assert model.layers[0].attn.q_proj.logical_axes == ("embed", "heads")
    assert model.layers[0].attn.k_proj.logical_axes == ("embed", "kv_heads")
    assert model.embed.logical_axes == ("vocab", "embed")


def test_scanned_params_are_the_stacked_unrolled_params():
    """One seed gives the same weights in both layouts; stacked params carry the leading "layers" axis."""
    unrolled = nnx.to_pure_dict(nnx.state(tf.Transformer(CFG, rngs=nnx.Rngs(3)), nnx.Param))
    scanned = tf.Transformer(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(3))
    assert scanned.layers.attn.q_proj.logical_axes == ("layers", "embed", "heads")
    assert scanned.layers.input_norm.logical_axes == ("layers", "norm")
    stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))["layers"]
    per_layer = [unrolled["layers"][i] for i in range(CFG.num_layers)]
    jax.tree.map(lambda s, *xs: np.testing.assert_array_equal(s, np.stack(xs)), stacked, *per_layer)


def _stacked(state):
    """An unrolled model's params (or grads) as a pure dict in the scanned layout."""
    pure = nnx.to_pure_dict(state)
    pure["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[pure["layers"][i] for i in range(len(pure["layers"]))])
    return pure


@functools.lru_cache(maxsize=None)
def _loss_and_grad(graphdef):
    def loss(params, tokens, pos, mask):
        logits, _ = nnx.merge(graphdef, params)(tokens, pos, mask)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
    return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "full"), (True, "dots_saveable"), (True, "names")])
def test_scanned_and_rematerialized_equal_unrolled(scan, remat):
    """Loss and every gradient of the scanned and/or rematerialized model equal the plain unrolled model's
    (float32); the remat policies do put the layers under `jax.checkpoint`."""
    base = _model()
    cfg = dataclasses.replace(CFG, scan_layers=scan, remat=remat, remat_names=("q_proj", "down_proj"))
    tokens, valid = _left_padded(3, 7)
    args = (tokens, A.positions_from_mask(valid), A.causal_mask(valid))
    graphdef, params = nnx.split(base, nnx.Param)
    want_loss, want_grads = _loss_and_grad(graphdef)(params, *args)
    want_grads = _stacked(want_grads) if scan else nnx.to_pure_dict(want_grads)
    other_graphdef, other = nnx.split(nnx.eval_shape(lambda: tf.Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    nnx.replace_by_pure_dict(other, _stacked(params) if scan else nnx.to_pure_dict(params))
    loss, grads = _loss_and_grad(other_graphdef)(other, *args)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    # The two programs sum in different orders: a gradient entry near 0 carries float32 rounding of the leaf's
    # largest terms, so the absolute tolerance scales with the leaf (a wrong gradient is off by orders more).
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(w).max())),
                 nnx.to_pure_dict(grads), want_grads)
    jaxpr = str(jax.make_jaxpr(lambda p: _loss_and_grad.__wrapped__(other_graphdef)(p, *args))(other))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none")
    assert ("scan" in jaxpr) == scan


def test_cache_layout_must_match_the_model():
    model = _model(dataclasses.replace(CFG, scan_layers=True))
    tokens, valid = _left_padded(2, 5)
    with pytest.raises(ValueError, match="cache layout does not match the model's scan_layers=True"):
        model(tokens, A.positions_from_mask(valid), A.causal_mask(valid), tf.init_cache(CFG, 2, 5), 0)


@pytest.mark.parametrize("kw,msg", [
    (dict(remat="some"), "Unknown remat policy"),
    (dict(remat="names", remat_names=("qkv",)), "Unknown remat_names"),
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(attention="sliding"), "Unknown attention"),
    (dict(param_dtype="float16"), "Unknown param_dtype"),
    (dict(hidden_size=30), "not divisible by num_heads"),
    (dict(head_dim=7), "even"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        dataclasses.replace(CFG, **kw).validate()


def test_call_errors():
    model = _model()
    tokens, valid = _left_padded(2, 5)
    pos = A.positions_from_mask(valid)
    with pytest.raises(ValueError, match="together"):
        model(tokens, pos, A.causal_mask(valid), tf.init_cache(CFG, 2, 5))
    with pytest.raises(ValueError, match="does not fit a cache of 6 slots"):
        model(tokens, pos, A.causal_mask(valid)[:, :, :1].repeat(6, -1), tf.init_cache(CFG, 2, 6), 2)
    with pytest.raises(ValueError, match="mask_BxTxS has shape"):
        model(tokens, pos, A.causal_mask(valid)[:, :4])


def test_value_model_from_policy():
    from jaxrl_reason.models.value import ValueModel
    policy = _model()
    vm = ValueModel.from_policy(policy, rngs=nnx.Rngs(1))
    assert "lm_head" not in nnx.state(vm, nnx.Param)["backbone"]
    tokens, valid = _left_padded(2, 5)
    args = (tokens, A.positions_from_mask(valid), A.causal_mask(valid))
    values = _apply(vm, *args)
    assert values.shape == (2, 5) and values.dtype == jnp.float32 and not np.asarray(values).any()  # zero head
    w = np.random.default_rng(0).normal(size=(CFG.hidden_size, 1)).astype(np.float32)
    vm.head[...] = jnp.asarray(w)
    h = np.asarray(_apply(policy, *args, method="hidden")[0])
    np.testing.assert_allclose(np.asarray(_apply(vm, *args)), (h @ w)[..., 0], atol=1e-5)
    policy.embed[...] = policy.embed[...] + 1.0  # the copy owns its buffers
    np.testing.assert_allclose(np.asarray(_apply(vm, *args)), (h @ w)[..., 0], atol=1e-5)
    fresh = ValueModel(CFG, rngs=nnx.Rngs(0))
    assert not np.asarray(fresh.head[...]).any() and not hasattr(fresh.backbone, "lm_head")
