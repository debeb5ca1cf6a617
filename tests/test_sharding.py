"""Sharding rules and a 2x2x2 sharded forward == unsharded (8 fake CPU devices from conftest)."""
import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl_reason.models import attention as A
from jaxrl_reason.models import sharding as S
from jaxrl_reason.models import transformer as tf
from jaxrl_reason.train.state import init_train_state
from jaxrl_reason.train.step import make_train_step

CFG = tf.TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2, qkv_bias=True, qk_norm=True)


@pytest.mark.devices(8)
def test_make_mesh():
    mesh = S.make_mesh(2, 2, 2)
    assert mesh.axis_names == S.MESH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert S.make_mesh(1, 2, 1, devices=jax.devices()[:2]).devices.shape == (1, 2, 1)
    with pytest.raises(ValueError, match="does not equal the number of devices \\(8\\)"):
        S.make_mesh(2, 2, 3)


@pytest.mark.devices(8)
def test_logical_to_spec_rules_and_fallback():
    mesh = S.make_mesh(2, 2, 2)
    assert S.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert S.logical_to_spec(("batch", None)) == P(("data", "fsdp"), None)
    assert S.logical_to_spec(("norm",)) == P(None)
    # 3 is not divisible by fsdp=2 -> replicated; 4 % 2 == 0 -> kept
    assert S.logical_to_spec(("embed", "mlp"), shape=(3, 4), mesh=mesh) == P(None, "tensor")
    assert S.logical_to_spec(("batch",), shape=(6,), mesh=mesh) == P(None)  # 6 % (2*2) != 0
    # a mesh axis is never used twice in one spec
    assert S.logical_to_spec(("heads", "mlp")) == P("tensor", None)
    with pytest.raises(ValueError, match="no rule"):
        S.logical_to_spec(("unknown",))
    custom = (("embed", None), ("mlp", ("fsdp", "tensor")))
    assert S.logical_to_spec(("embed", "mlp"), rules=custom) == P(None, ("fsdp", "tensor"))


@pytest.mark.devices(8)
def test_param_specs_on_model_and_abstract_state():
    model = nnx.eval_shape(lambda: tf.Transformer(dataclasses.replace(CFG, vocab_size=63), rngs=nnx.Rngs(0)))
    mesh = S.make_mesh(2, 2, 2)
    specs = S.param_specs(nnx.state(model, nnx.Param), mesh=mesh)
    assert specs["layers"][0]["attn"]["q_proj"].get_value() == P("fsdp", "tensor")
    assert specs["layers"][0]["attn"]["q_norm"].get_value() == P(None)
    assert specs["embed"].get_value() == P(None, "fsdp")  # vocab 63 does not divide tensor=2
    assert S.param_specs(nnx.state(model, nnx.Param))["embed"].get_value() == P("tensor", "fsdp")
    abstract = nnx.state(nnx.eval_shape(lambda: tf.Transformer(CFG, rngs=nnx.Rngs(0))), nnx.Param)
    sh = S.param_shardings(abstract, mesh)
    assert sh["lm_head"].get_value() == jax.sharding.NamedSharding(mesh, P("fsdp", "tensor"))


@pytest.mark.devices(8)
@pytest.mark.parametrize("scan", [False, True])
def test_sharded_forward_equals_unsharded(scan):
    model = tf.Transformer(dataclasses.replace(CFG, scan_layers=scan), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    valid = np.arange(6)[None, :] >= np.array([0, 2, 3, 5])[:, None]
    tokens = jnp.asarray(np.where(valid, rng.integers(0, 64, (4, 6)), 0), jnp.int32)
    valid = jnp.asarray(valid)

    def fwd(params, tokens, valid):
        return nnx.merge(graphdef, params)(tokens, A.positions_from_mask(valid), A.causal_mask(valid))[0]

    want = jax.jit(fwd)(params, tokens, valid)
    mesh = S.make_mesh(2, 2, 2)
    sharded = S.shard_state(params, mesh)
    q = sharded["layers"]["attn"]["q_proj"] if scan else sharded["layers"][0]["attn"]["q_proj"]
    lead = (None,) if scan else ()
    assert q.get_value().sharding.spec == P(*lead, "fsdp", "tensor")
    assert q.logical_axes == ("layers",) * scan + ("embed", "heads")
    assert len(q.get_value().addressable_shards) == 8
    with jax.set_mesh(mesh):
        batch = [jax.device_put(x, S.batch_sharding(mesh, 2)) for x in (tokens, valid)]
        got = jax.jit(fwd, in_shardings=(S.param_shardings(params, mesh), S.batch_sharding(mesh, 2),
                                         S.batch_sharding(mesh, 2)))(sharded, *batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_resolve_mesh_shape():
    assert S.resolve_mesh_shape(-1, 1, 1, 8) == (8, 1, 1)
    assert S.resolve_mesh_shape(1, -1, 2, 8) == (1, 4, 2)
    assert S.resolve_mesh_shape(2, 2, 2, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one of data and fsdp"):
        S.resolve_mesh_shape(-1, -1, 1, 8)
    with pytest.raises(ValueError, match="does not cover the 8 available devices"):
        S.resolve_mesh_shape(1, -1, 3, 8)
    with pytest.raises(ValueError, match="does not cover the 8 available devices"):
        S.resolve_mesh_shape(2, 2, 1, 8)


def test_constrain_is_a_no_op_outside_a_mesh():
    x = jnp.ones((4, 3, 8))
    assert S.constrain(x, ("act_batch", "act_len", "act_embed")) is x
    jaxpr = str(jax.make_jaxpr(lambda x: S.constrain(x, ("act_batch", "act_len", "act_embed")))(x))
    assert "sharding_constraint" not in jaxpr


@pytest.mark.devices(8)
def test_constrain_under_a_mesh_pins_the_logical_layout():
    mesh = S.make_mesh(1, 4, 2)
    f = lambda x: S.constrain(x * 2, ("act_batch", "act_len", "act_heads", None))  # noqa: E731
    with jax.set_mesh(mesh):
        assert "sharding_constraint" in str(jax.make_jaxpr(f)(jnp.ones((8, 3, 4, 2))))
        y = jax.jit(f)(jnp.ones((8, 3, 4, 2)))
        want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        assert y.sharding.is_equivalent_to(want, 4)
        y = jax.jit(f)(jnp.ones((6, 3, 3, 2)))  # 6 rows over fsdp=4, 3 heads over tensor=2: replicated
        assert y.sharding.is_fully_replicated


def _compiled_ce_step(mesh, constrain: bool, scan: bool):
    """The update step (make_train_step, plain next-token CE, Adam) of a tiny model compiled on `mesh`;
    returns (compiled HLO text, temporaries per device, the set of full parameter shapes)."""
    cfg = tf.TransformerConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=2, constrain_activations=constrain, scan_layers=scan)
    graphdef, params = nnx.split(tf.Transformer(cfg, rngs=nnx.Rngs(0)))

    def loss_fn(p, batch, rng):
        tok = batch["tokens"]
        valid = jnp.ones(tok.shape, bool)
        logits, _ = nnx.merge(graphdef, p)(tok, A.positions_from_mask(valid), A.causal_mask(valid))
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tok[:, 1:, None], -1)), {}

    tx = optax.adam(1e-3)
    replicated = jax.sharding.NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        state = init_train_state(S.shard_state(params, mesh), tx, 0)
        shardings = jax.tree.map(
            lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else replicated, state)
        step = make_train_step(loss_fn, tx, state_shardings=shardings, batch_shardings=S.batch_sharding(mesh, 2),
                               donate=False)
        compiled = step.lower(state, {"tokens": jax.ShapeDtypeStruct((8, 16), jnp.int32)}).compile()
    shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
    if scan:  # the scan body gathers one layer's slice of a stacked weight
        shapes |= {tuple(x.shape[1:]) for x in jax.tree.leaves(params["layers"])}
    return compiled.as_text(), compiled.memory_analysis().temp_size_in_bytes, shapes


def _gathers(hlo: str) -> collections.Counter:
    """{(dtype, shape): count} of the all-gathers in compiled HLO text."""
    found = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(", hlo)
    return collections.Counter((dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in found)


@pytest.mark.devices(8)
def test_fsdp_step_gathers_weights_not_activations():
    """On a (1, 8, 1) mesh, with the activation constraints every float all-gather of the update step is a
    weight gathered whole (ZeRO-3) and nothing is exchanged all-to-all; without them XLA also gathers
    activations (the [8, 16, vocab] logits among them) and needs more temporaries."""
    mesh = S.make_mesh(1, 8, 1)
    hlo, temp, shapes = _compiled_ce_step(mesh, constrain=True, scan=True)
    assert "all-to-all" not in hlo
    float_gathers = {k: n for k, n in _gathers(hlo).items() if k[0] in ("f32", "bf16")}
    assert float_gathers and all(shape in shapes for _, shape in float_gathers), float_gathers
    assert {shape for _, shape in float_gathers} >= {(64, 64), (64, 128), (64, 256)}, float_gathers  # q, gate, head
    hlo_off, temp_off, _ = _compiled_ce_step(mesh, constrain=False, scan=True)
    activations = [k for k in _gathers(hlo_off) if k[0] == "f32" and k[1] not in shapes]
    assert ("f32", (8, 16, 256)) in activations
    assert temp < temp_off
