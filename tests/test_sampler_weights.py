"""The sampler's own layout (sampling/weights.py, train/sampler_layout.py) on 8 fake CPU devices: the reshard of
the trainer's weights keeps their values, lands on the decode layout, runs on device only, and the sampler decodes
the same tokens from it as from the training layout while gathering nothing."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rl_testing import tiny_config

from jaxrl_reason.models import sharding as S
from jaxrl_reason.models import transformer as tf
from jaxrl_reason.sampling import autoregressive as ar
from jaxrl_reason.sampling import processors as pr
from jaxrl_reason.sampling import weights as W
from jaxrl_reason.train import build, sampler_layout

CFG = tf.TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2)
# The decode layout of each parameter, by hand from the model's logical axes: heads / kv heads / MLP columns /
# vocabulary over 'tensor', the embedding dimension whole.
DECODE_SPECS = {"embed": P("tensor", None), "lm_head": P(None, "tensor"), "q_proj": P(None, "tensor"),
                "k_proj": P(None, "tensor"), "v_proj": P(None, "tensor"), "o_proj": P("tensor", None),
                "gate_proj": P(None, "tensor"), "up_proj": P(None, "tensor"), "down_proj": P("tensor", None),
                "input_norm": P(None), "post_attn_norm": P(None), "final_norm": P(None)}
HOST_OPS = re.compile(r"custom-call|\bsend\(|\brecv\(|infeed|outfeed|S\(5\)|pinned_host|callback")
PAD, PROMPT, NEW = 0, 6, 8


@pytest.fixture(scope="module")
def train_params():
    """A tiny model's float32 params with peaked logits (weights x 3), in an FSDP training layout (1, 8, 1)."""
    graphdef, state = nnx.split(tf.Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    state = jax.tree.map(lambda x: 3.0 * x, state)
    return graphdef, S.shard_state(state, S.make_mesh(1, 8, 1))


def _named(tree):
    """[(name of the parameter, leaf)] of an nnx.State: the last string key of each leaf's path."""
    return [([k.key for k in path if isinstance(getattr(k, "key", None), str)][-1], leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_decode_mesh_and_rules():
    mesh = W.decode_mesh(2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert list(mesh.devices.flat) == jax.devices()
    assert dict(W.decode_mesh(1).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(W.DECODE_RULES)["embed"] is None
    assert {k: v for k, v in W.DECODE_RULES if k != "embed"} == {k: v for k, v in S.DEFAULT_RULES if k != "embed"}
    with pytest.raises(ValueError, match="dividing the 8 devices"):
        W.decode_mesh(3)


@pytest.mark.devices(8)
def test_reshard_keeps_values_lands_on_the_decode_layout_and_stays_on_device(train_params):
    _, params = train_params
    before = [np.asarray(x) for x in jax.tree.leaves(params)]
    mesh = W.decode_mesh(2)
    shardings = W.sampler_shardings(params, mesh)
    out = W.sampler_params(params, shardings, jnp.bfloat16)
    names = _named(out)
    assert {n for n, _ in names} == set(DECODE_SPECS)
    for (name, got), want in zip(names, before, strict=True):
        assert got.dtype == jnp.bfloat16 and got.sharding == NamedSharding(mesh, DECODE_SPECS[name]), name
        assert got.sharding.memory_kind == "device" and got.is_fully_addressable
        np.testing.assert_array_equal(np.asarray(got), want.astype(jnp.bfloat16), err_msg=name)
    for x, want in zip(jax.tree.leaves(params), before):  # the trainer's arrays: kept, unchanged, in their layout
        assert not x.is_deleted() and x.sharding.mesh.shape["fsdp"] == 8
        np.testing.assert_array_equal(np.asarray(x), want)

    fn = W.reshard_fn(params, shardings, jnp.bfloat16)
    assert fn is W.reshard_fn(params, W.sampler_shardings(params, W.decode_mesh(2)), "bfloat16")  # compiled once
    prims = {e.primitive.name for e in jax.make_jaxpr(fn)(params).eqns[0].params["jaxpr"].eqns}
    assert prims == {"convert_element_type", "sharding_constraint"}, prims  # casts and layouts, nothing else
    hlo = fn.lower(params).compile().as_text()
    assert not HOST_OPS.search(hlo), HOST_OPS.search(hlo)
    assert re.search(r"all-gather|all-to-all|collective-permute", hlo)  # shards move device to device

    host = jax.jit(lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x))
    assert HOST_OPS.search(host.lower(jnp.ones(4)).compile().as_text())  # the check sees a host round trip


def test_reshard_rejects_a_layout_that_does_not_match(train_params):
    _, params = train_params
    with pytest.raises(ValueError, match="one per parameter"):
        W.sampler_params(params, [NamedSharding(W.decode_mesh(2), P())], jnp.bfloat16)
    few = S.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="do not include every device"):
        W.sampler_params(params, W.sampler_shardings(params, few), jnp.bfloat16)


def _collectives(fn, params, *args) -> set:
    """The kinds of cross-device collectives in the compiled sampler."""
    hlo = fn.lower(params, *args).compile().as_text()
    return set(re.findall(r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo))


@pytest.mark.devices(8)
def test_sampler_decodes_the_same_tokens_in_its_own_layout(train_params):
    """Greedy and sampled (same key: the random draws do not depend on the layout) rollouts from the training
    layout and from the decode layout (float32, so that only the order of float sums differs) are equal; the
    decode layout's rows are over its data axis and its program gathers nothing."""
    graphdef, params = train_params
    mesh = W.decode_mesh(2)
    decode = W.sampler_params(params, W.sampler_shardings(params, mesh), jnp.float32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, (8, PROMPT)).astype(np.int32)
    mask = np.arange(PROMPT)[None] >= rng.integers(0, PROMPT - 1, 8)[:, None]
    key = jax.random.key(3)
    for sampling in (pr.SamplingParams(greedy=True), pr.SamplingParams(temperature=1.0)):
        fn = ar.make_generate_fn(graphdef, max_prompt_len=PROMPT, max_new_tokens=NEW, eos_ids=(5, 6), pad_id=PAD,
                                 params=sampling)
        want, got = fn(params, tokens, mask, key), fn(decode, tokens, mask, key)
        np.testing.assert_array_equal(np.asarray(got.tokens_BxR), np.asarray(want.tokens_BxR))
        # float32 sums in another order over logits of tens (the x3 weights): differences of a few 1e-5
        np.testing.assert_allclose(np.asarray(got.logp_BxR), np.asarray(want.logp_BxR), rtol=1e-4, atol=1e-4)
        assert got.tokens_BxR.sharding == NamedSharding(mesh, P(("data", "fsdp"), None))
    assert len(set(np.asarray(want.length_B))) > 1  # some rows stopped early
    # Tensor-parallel decode exchanges partial sums only; from the FSDP layout every step gathers (rows or weights).
    assert _collectives(fn, decode, tokens, mask, key) == {"all-reduce"}
    assert "all-gather" in _collectives(fn, params, tokens, mask, key)


def test_config_validation():
    for overrides, match in (({"rollout__layout": "fsdp"}, "rollout.layout must be one of"),
                             ({"rollout__layout": "decode", "rollout__decode_tensor": 3}, "dividing the 8 devices")):
        with pytest.raises(ValueError, match=match):
            build.validate_config(tiny_config("grpo", **overrides))
    rollout = ml_collections.ConfigDict({"layout": "decode", "decode_tensor": 2})
    with pytest.raises(ValueError, match="autoregressive"):
        sampler_layout.validate(rollout, "bidirectional", 8)
    sampler_layout.validate(rollout, "causal", 8)


@pytest.mark.devices(8)
def test_sampler_copy_by_layout(train_params):
    """"train": the compute-dtype cast of the trainer's arrays in their layout; "decode": the decode layout."""
    _, params = train_params
    config = tiny_config("grpo", model__compute_dtype="bfloat16")
    same = sampler_layout.sampler_copy(config, params)
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(params)):
        assert x.dtype == jnp.bfloat16 and x.sharding == y.sharding
    config.rollout.layout, config.rollout.decode_tensor = "decode", 2
    moved = sampler_layout.sampler_copy(config, params)
    for (name, x), y in zip(_named(moved), jax.tree.leaves(same)):
        assert x.sharding == NamedSharding(W.decode_mesh(2), DECODE_SPECS[name]), name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
