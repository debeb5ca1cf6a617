"""Chunked log-probs from hidden states (train/logprobs.py), mixed precision, and the no-grad passes of
train/batch.py: equal to the plain [rows, tokens, vocab] computation, memory that does not grow with tokens x vocab,
micro-batched == one pass, sharded == unsharded."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.train import batch as batch_lib
from jaxrl_reason.train import logprobs as lp
from jaxrl_reason.train.contracts import UpdateBatch
from jaxrl_reason.train.optimizer import make_optimizer


def _plain(h_NxRxD, w_DxV, targets_NxR):
    """The computation being replaced: full float32 logits, log-softmax over the whole vocabulary."""
    logits = jnp.einsum("nrd,dv->nrv", h_NxRxD, w_DxV, preferred_element_type=jnp.float32)
    return lp.token_logps(logits, targets_NxR)


def _masked_objective(fn, targets, mask):
    """A loss that weights log-probs and entropies differently per token, with masked (padded) rows."""
    def loss(h, w):
        logp, ent = fn(h, w, targets)
        wts = jnp.cos(jnp.arange(logp.shape[1], dtype=jnp.float32))
        return jnp.sum(logp * mask * wts) + 0.3 * jnp.sum(ent * mask)
    return loss


def _inputs(n=3, r=7, d=16, v=50, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = jax.random.normal(k[0], (n, r, d))
    w = jax.random.normal(k[1], (d, v)) * 0.5
    t = jax.random.randint(k[2], (n, r), 0, v)
    mask = jnp.ones((n, r)).at[1].set(0.0).at[2, 4:].set(0.0)  # row 1 all padding, row 2 right-padded
    return h, w, t, mask


@pytest.mark.parametrize("token_chunk,vocab_chunk", [(0, 0), (4, 0), (5, 16), (8, 7), (64, 50), (3, 49)])
def test_chunked_equals_plain_values_and_grads(token_chunk, vocab_chunk):
    """Uneven token chunks (21 tokens) and vocabulary slices that do not divide V = 50 included."""
    h, w, t, mask = _inputs()
    chunked = lambda h, w, t: lp.chunked_token_logps(h, w, t, token_chunk=token_chunk, vocab_chunk=vocab_chunk)
    for got, want in zip(jax.jit(chunked)(h, w, t), _plain(h, w, t)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    g_got = jax.jit(jax.grad(_masked_objective(chunked, t, mask), argnums=(0, 1)))(h, w)
    g_want = jax.jit(jax.grad(_masked_objective(_plain, t, mask), argnums=(0, 1)))(h, w)
    for got, want in zip(g_got, g_want):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    np.testing.assert_array_equal(g_got[0][1], 0.0)  # a fully masked row gets no gradient


def _temp_bytes(fn, n, r, d, v):
    h = jax.ShapeDtypeStruct((n, r, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    t = jax.ShapeDtypeStruct((n, r), jnp.int32)
    mask = jnp.ones((n, r))

    def loss_and_grad(h, w, t):
        return jax.value_and_grad(lambda h, w: _masked_objective(fn, t, mask)(h, w), argnums=(0, 1))(h, w)

    return jax.jit(loss_and_grad).lower(h, w, t).compile().memory_analysis().temp_size_in_bytes


def test_compiled_temporaries_do_not_grow_with_tokens_times_vocab():
    """Doubling tokens and vocabulary quadruples the [N, R, V] float32 tensor (here 1 -> 4 MiB): the plain loss+grad's
    temporaries grow by at least that much, the chunked one's by a small fraction of it."""
    n, r, d, v = 2, 256, 32, 512
    growth = 4 * n * (2 * r) * (2 * v) - 4 * n * r * v
    chunked = lambda h, w, t: lp.chunked_token_logps(h, w, t, token_chunk=64, vocab_chunk=128)
    plain_growth = _temp_bytes(_plain, n, 2 * r, d, 2 * v) - _temp_bytes(_plain, n, r, d, v)
    chunked_small, chunked_big = _temp_bytes(chunked, n, r, d, v), _temp_bytes(chunked, n, 2 * r, d, 2 * v)
    assert plain_growth >= growth, (plain_growth, growth)
    assert chunked_big - chunked_small < 0.2 * growth, (chunked_small, chunked_big, growth)
    assert chunked_big < 0.25 * 4 * n * (2 * r) * (2 * v)


CFG = TransformerConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1)


@pytest.fixture(scope="module")
def model_and_batch():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    n, p, r = 8, 5, 6
    prompt_mask = np.ones((n, p), bool)
    prompt_mask[::3, :2] = False  # left padding
    resp_mask = np.ones((n, r), bool)
    resp_mask[1, 3:] = False
    resp_mask[5] = False  # an empty (padding) row
    batch = UpdateBatch(tokens_NxL=rng.integers(0, CFG.vocab_size, (n, p + r)).astype(np.int32),
                        valid_NxL=np.concatenate([prompt_mask, resp_mask], 1),
                        response_mask_NxR=resp_mask.astype(np.float32))
    return model, batch


def _plain_ar_logps(model, batch):
    tokens, pos, mask = lp.causal_forward_inputs(batch)
    r = batch.response_mask_NxR.shape[1]
    logits, _ = model(tokens, pos, mask)
    return lp.token_logps(logits[:, -r - 1:-1], tokens[:, -r:])


def test_ar_logps_equals_full_logits_path(model_and_batch):
    model, batch = model_and_batch
    graphdef, params = nnx.split(model, nnx.Param)
    spec = lp.LogpSpec(logits_chunk=16, vocab_chunk=16)
    got = jax.jit(lambda p, b: lp.ar_logps(graphdef, p, b, spec))(params, batch)
    for a, b in zip(got, jax.jit(lambda b: _plain_ar_logps(model, b))(batch)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(model.lm_head_weight(), model.lm_head[...])


def test_bf16_compute_keeps_float32_gradients(model_and_batch):
    """The cast to the compute dtype happens inside the differentiated function: gradients come out float32."""
    model, batch = model_and_batch
    graphdef, params = nnx.split(model, nnx.Param)
    spec = lp.LogpSpec(logits_chunk=16, compute_dtype="bfloat16")
    def loss(p, spec):
        logp, _ = lp.ar_logps(graphdef, p, batch, spec)
        return jnp.sum(logp * batch.response_mask_NxR), logp

    (_, logp16), grads = jax.jit(jax.value_and_grad(lambda p: loss(p, spec), has_aux=True))(params)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    _, logp32 = jax.jit(lambda p: loss(p, lp.LogpSpec(logits_chunk=16)))(params)
    assert logp16.dtype == jnp.float32
    np.testing.assert_allclose(logp16, logp32, atol=0.1)  # bf16 compute: close, not equal
    assert not np.array_equal(logp16, logp32)


def test_float32_masters_take_updates_that_bf16_params_lose():
    """AdamW at lr 1e-6: float32 master weights (and state) change; the same update applied to bfloat16 params and
    state rounds away on almost every element (bf16 has 8 bits of mantissa: 1e-6 is far below half an ulp of ~0.1)."""
    w32 = jax.random.normal(jax.random.PRNGKey(0), (64, 64)) * 0.1
    grads = jax.random.normal(jax.random.PRNGKey(1), (64, 64))
    changed = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        params = {"w": w32.astype(dtype)}
        tx = make_optimizer(1e-6, grad_clip=None)
        updates, _ = tx.update({"w": grads.astype(dtype)}, tx.init(params), params)
        new = optax.apply_updates(params, updates)
        assert new["w"].dtype == dtype
        changed[dtype] = int(jnp.sum(new["w"] != params["w"]))
    assert changed[jnp.float32] > 0.99 * 64 * 64
    assert changed[jnp.bfloat16] < 0.01 * 64 * 64, changed


def test_cast_floating_leaves_ints_and_returns_same_arrays():
    tree = {"a": jnp.ones(3), "i": jnp.arange(3)}
    same = lp.cast_floating(tree, jnp.float32)
    assert same["a"] is tree["a"] and same["i"] is tree["i"]
    half = lp.cast_floating(tree, jnp.bfloat16)
    assert half["a"].dtype == jnp.bfloat16 and half["i"].dtype == tree["i"].dtype


@pytest.mark.parametrize("kwargs,sentence", [
    (dict(logits_chunk=-1), "logits_chunk must be an int >= 0"),
    (dict(vocab_chunk=1.5), "vocab_chunk must be an int >= 0"),
    (dict(compute_dtype="float16"), "unknown compute dtype 'float16'"),
])
def test_bad_spec_is_one_sentence(kwargs, sentence):
    with pytest.raises(ValueError, match=sentence):
        lp.LogpSpec(**kwargs).validate()


def test_micro_batched_passes_equal_one_pass(model_and_batch):
    model, batch = model_and_batch
    graphdef, params = nnx.split(model, nnx.Param)
    spec = lp.LogpSpec(logits_chunk=16)
    one, _ = batch_lib.make_forward_fns(graphdef, spec=spec)
    micro, _ = batch_lib.make_forward_fns(graphdef, spec=spec, micro_batch_rows=2)
    for a, b in zip(one(params, batch), micro(params, batch)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    bad, _ = batch_lib.make_forward_fns(graphdef, spec=spec, micro_batch_rows=3)
    with pytest.raises(ValueError, match="8 rows do not split into log-prob micro-batches of 3 rows"):
        bad(params, batch)


@pytest.mark.devices(8)
def test_sharded_passes_equal_unsharded(model_and_batch):
    """Rows over ('data', 'fsdp'), params with their training shardings: outputs sharded by rows, same values."""
    from jaxrl_reason.models.value import ValueModel

    model, batch = model_and_batch
    graphdef, params = nnx.split(model, nnx.Param)
    vgraphdef, vparams = nnx.split(ValueModel.from_policy(model, rngs=nnx.Rngs(1)), nnx.Param)
    vparams = jax.tree.map(lambda x: x + 0.01, vparams)  # a non-zero head
    mesh = sharding_lib.make_mesh(2, 2, 2)
    psh, vsh = sharding_lib.param_shardings(params, mesh), sharding_lib.param_shardings(vparams, mesh)
    rows = sharding_lib.batch_sharding(mesh, 1)
    spec = lp.LogpSpec(logits_chunk=16)
    ref_logps, ref_values = batch_lib.make_forward_fns(graphdef, vgraphdef, spec=spec)
    logps, values = batch_lib.make_forward_fns(graphdef, vgraphdef, spec=spec, micro_batch_rows=4,
                                               policy_shardings=psh, value_shardings=vsh, rows_sharding=rows)
    sharded = (jax.device_put(params, psh), jax.device_put(vparams, vsh))
    got = (*logps(sharded[0], batch), values(sharded[1], batch))
    want = (*ref_logps(params, batch), ref_values(vparams, batch))
    for a, b in zip(got, want):
        assert a.sharding.is_equivalent_to(rows, a.ndim)
        assert len(a.sharding.device_set) == 8
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _chunks_reference(h, t, blocks, chunk):
    """numpy: rows in `blocks` consecutive blocks, each block's tokens flattened, zero-padded and cut into chunks."""
    n, r, d = h.shape
    tokens = n // blocks * r
    num = -(-tokens // chunk)
    hp = np.zeros((blocks, num * chunk, d), h.dtype)
    tp = np.zeros((blocks, num * chunk), np.int32)
    hp[:, :tokens], tp[:, :tokens] = h.reshape(blocks, tokens, d), t.reshape(blocks, tokens)
    return hp.reshape(blocks, num, chunk, d).swapaxes(0, 1), tp.reshape(blocks, num, chunk).swapaxes(0, 1)


@pytest.mark.devices(8)
@pytest.mark.parametrize("mesh_shape,token_chunk,blocks,chunk", [
    (None, 4, 1, 4),  # no mesh: the flattened N*R = 56 tokens in chunks of 4
    (None, 0, 1, 56),
    ((2, 2, 2), 12, 4, 3),  # rows over data x fsdp = 4 devices: 2 rows (14 tokens) each, chunks of 12 / 4 = 3
    ((1, 8, 1), 100, 8, 7),  # one row per device: chunks of at most its 7 tokens
])
def test_token_chunks_keep_each_devices_rows_apart(mesh_shape, token_chunk, blocks, chunk):
    h = np.arange(8 * 7 * 2, dtype=np.float32).reshape(8, 7, 2)
    t = np.arange(8 * 7, dtype=np.int32).reshape(8, 7) + 1
    fn = jax.jit(lambda h, t: lp.token_chunks(h, t, token_chunk))
    if mesh_shape is None:
        got = fn(h, t)
    else:
        with jax.set_mesh(sharding_lib.make_mesh(*mesh_shape)):
            got = fn(h, t)
    want = _chunks_reference(h, t, blocks, chunk)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(lp.untile(got[1], (8, 7)), t)


@pytest.mark.devices(8)
def test_sharded_values_and_grads_equal_unsharded():
    """Rows over 4 devices of a 2x2x2 mesh (vocabulary over 2), each device's 2 rows x 7 = 14 tokens in chunks of
    12 / 4 = 3 (padded), streamed vocabulary: the unsharded log-probs, entropies and gradients."""
    h, w, t, mask = _inputs(n=8, r=7)
    chunked = lambda h, w, t: lp.chunked_token_logps(h, w, t, token_chunk=12, vocab_chunk=16)
    want = jax.jit(chunked)(h, w, t)
    g_want = jax.jit(jax.grad(_masked_objective(chunked, t, mask), argnums=(0, 1)))(h, w)
    with jax.set_mesh(sharding_lib.make_mesh(2, 2, 2)):
        got = jax.jit(chunked)(h, w, t)
        g_got = jax.jit(jax.grad(_masked_objective(chunked, t, mask), argnums=(0, 1)))(h, w)
    for a, b in zip((*got, *g_got), (*want, *g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.devices(8)
def test_sharded_chunks_equal_full_logits(model_and_batch):
    """Rows over 4 devices (and the vocabulary over 2), chunks of 8 tokens that do not divide a device's 12
    (2 rows x 6): the direct full-logits log-probs and entropies."""
    model, batch = model_and_batch
    graphdef, params = nnx.split(model, nnx.Param)
    mesh = sharding_lib.make_mesh(2, 2, 2)
    psh = sharding_lib.param_shardings(params, mesh)
    logps, _ = batch_lib.make_forward_fns(graphdef, spec=lp.LogpSpec(logits_chunk=32, vocab_chunk=16),
                                          policy_shardings=psh, rows_sharding=sharding_lib.batch_sharding(mesh, 1))
    got = logps(jax.device_put(params, psh), batch)
    for a, b in zip(got, jax.jit(lambda b: _plain_ar_logps(model, b))(batch)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.devices(8)
def test_sharded_lm_head_runs_each_devices_rows_only():
    """The compiled no-grad pass of a tied-embedding model on 8 devices: per device 1/8 of the single-device matmul
    FLOPs (the LM head is 70% of them), and no logits summed across devices. With the N*R tokens flattened into
    chunks, data=8 ran the LM head on every row on every device (5.9x), fsdp=8 split the hidden axis and all-reduced
    every chunk's logits."""
    from experiments import _hlo_flops

    cfg = TransformerConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, tie_embeddings=True)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    n, p, r = 16, 4, 12
    batch = UpdateBatch(tokens_NxL=jax.ShapeDtypeStruct((n, p + r), jnp.int32),
                        valid_NxL=jax.ShapeDtypeStruct((n, p + r), jnp.bool_),
                        response_mask_NxR=jax.ShapeDtypeStruct((n, r), jnp.float32))
    spec = lp.LogpSpec(logits_chunk=32)
    one = _hlo_flops.dot_flops(batch_lib.make_forward_fns(graphdef, spec=spec)[0].lower(params, batch).compile()
                               .as_text())
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        mesh = sharding_lib.make_mesh(*shape)
        fn, _ = batch_lib.make_forward_fns(graphdef, spec=spec, policy_shardings=sharding_lib.param_shardings(
            params, mesh), rows_sharding=sharding_lib.batch_sharding(mesh, 1))
        with jax.set_mesh(mesh):
            text = fn.lower(params, batch).compile().as_text()
        assert _hlo_flops.dot_flops(text) * 8 == pytest.approx(one, rel=0.01), shape
        summed = re.findall(r"= \w+\[([\d,]*)\]\S* (?:all-reduce|reduce-scatter)\(", text)
        vocab_dims = {cfg.vocab_size, cfg.vocab_size // shape[2]}
        assert not [s for s in summed if vocab_dims & {int(x) for x in s.split(",") if x}], (shape, summed)
