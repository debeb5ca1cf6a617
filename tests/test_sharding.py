"""Sharding rules and a 2x2x2 sharded forward == unsharded (8 fake CPU devices from conftest)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl_reason.models import attention as A
from jaxrl_reason.models import sharding as S
from jaxrl_reason.models import transformer as tf

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
def test_sharded_forward_equals_unsharded():
    model = tf.Transformer(CFG, rngs=nnx.Rngs(0))
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
    q = sharded["layers"][0]["attn"]["q_proj"]
    assert q.get_value().sharding.spec == P("fsdp", "tensor") and q.logical_axes == ("embed", "heads")
    assert len(q.get_value().addressable_shards) == 8
    with jax.set_mesh(mesh):
        batch = [jax.device_put(x, S.batch_sharding(mesh, 2)) for x in (tokens, valid)]
        got = jax.jit(fwd, in_shardings=(S.param_shardings(params, mesh), S.batch_sharding(mesh, 2),
                                         S.batch_sharding(mesh, 2)))(sharded, *batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
