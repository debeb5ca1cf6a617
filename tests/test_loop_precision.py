"""The RL loop with bf16 compute over float32 masters, chunked and micro-batched log-prob passes, and the KL
reference sharded like the policy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_testing import digit_scorer, final_policy_params, tiny_config

from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.train import build, loop
from jaxrl_reason.train import policy as policy_lib
from jaxrl_reason.train.metrics import read_metrics


def test_bf16_compute_run_keeps_float32_masters(tmp_path, monkeypatch):
    """KL against a bf16 reference, bf16 sampler, vocabulary-streamed and micro-batched no-grad passes."""
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    config = tiny_config("grpo", model__compute_dtype="bfloat16", model__logits_chunk=64, model__vocab_chunk=16,
                         loss__kl_coef=0.05, optim__logp_micro_batch_rows=8)
    out = loop.run(config, str(tmp_path))
    assert out["iterations"] == 2
    assert {x.dtype for x in final_policy_params(str(tmp_path))} == {np.dtype(np.float32)}
    rows = [r for r in read_metrics(str(tmp_path)) if "train/loss" in r]
    assert all(np.isfinite([r["train/loss"], r["train/kl_loss"]]).all() for r in rows)


@pytest.mark.parametrize("field,value,sentence", [
    ("model__compute_dtype", "fp8", "unknown compute dtype 'fp8'"),
    ("model__param_dtype", "half", "unknown model.param_dtype 'half'"),
    ("model__vocab_chunk", -4, "vocab_chunk must be an int >= 0"),
    ("optim__logp_micro_batch_rows", 5, r"optim.logp_micro_batch_rows \(5\) must be 0 \(one pass\) or divide the 16"),
])
def test_bad_precision_settings_are_one_sentence(field, value, sentence):
    with pytest.raises(ValueError, match=sentence):
        build.validate_config(tiny_config("grpo", **{field: value}))


@pytest.mark.devices(8)
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_reference_copy_is_sharded_like_the_policy(compute_dtype):
    cfg = TransformerConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=2)
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    mesh = sharding_lib.make_mesh(1, 4, 2)
    shardings = {"policy": sharding_lib.param_shardings(params, mesh)}
    policy = jax.device_put(params, shardings["policy"])
    ref = policy_lib.reference_copy(tiny_config("grpo", model__compute_dtype=compute_dtype), policy, shardings)
    want = [np.asarray(x, jnp.dtype(compute_dtype)) for x in jax.tree.leaves(params)]
    jax.tree.map(lambda x: x.delete(), policy)  # the reference owns its buffers (the update step donates the policy)
    sharded = 0
    for r, w, s in zip(jax.tree.leaves(ref), want, jax.tree.leaves(shardings["policy"])):
        assert r.dtype == jnp.dtype(compute_dtype) and r.sharding.is_equivalent_to(s, r.ndim)
        sharded += len(r.sharding.device_set) == 8 and not r.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(r), w)
    assert sharded > 0
