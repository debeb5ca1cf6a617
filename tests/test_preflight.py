"""The preflight: memory of a compiled program, the one-sentence stop before any rollout, the reused executable."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rl_testing import digit_scorer, tiny_config

from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.train import build, loop, preflight
from jaxrl_reason.train import rollout as rollout_lib


def test_memory_report_counts_arguments_outputs_and_donation():
    f = jax.jit(lambda a, b: (a * 2.0, jnp.sum(b)), donate_argnums=(0,))
    compiled = f.lower(jax.ShapeDtypeStruct((256, 128), jnp.float32),
                       jax.ShapeDtypeStruct((64,), jnp.float32)).compile()
    mem = preflight.memory_report(compiled)
    assert mem.argument == 256 * 128 * 4 + 64 * 4
    assert mem.alias == 256 * 128 * 4  # the donated input holds the output
    assert 4 <= mem.output - mem.alias <= 64  # the scalar (and the output tuple's index table)
    assert mem.peak >= mem.argument + mem.output - mem.alias + mem.temp


def test_check_fits_says_need_capacity_and_knobs_in_one_sentence():
    mem = preflight.MemoryReport(argument=3 * 2**30, output=2**30, alias=2**30, temp=5 * 2**30)
    preflight.check_fits(mem, None)  # a backend that does not report its memory: no check
    preflight.check_fits(mem, 8 * 2**30)
    with pytest.raises(preflight.InsufficientMemory) as e:
        preflight.check_fits(mem, 7 * 2**30, resident_bytes=2**29)
    msg = str(e.value)
    assert msg.startswith("the update step needs 8.50 GiB per device but the device has 7.00 GiB;")
    for knob in ("optim.micro_batches", "mesh.fsdp", "model.remat", "rollout.max_prompt_len",
                 "rollout.max_new_tokens"):
        assert knob in msg
    assert msg.count(". ") == 0 and msg.endswith(").")


def test_per_device_bytes_counts_shards():
    mesh = sharding_lib.make_mesh(8, 1, 1)
    rows = jax.sharding.NamedSharding(mesh, jax.P("data"))
    tree = {"x": jax.ShapeDtypeStruct((64, 10), jnp.float32, sharding=rows), "y": jnp.zeros((3,), jnp.bfloat16)}
    assert preflight.per_device_bytes(tree) == 8 * 10 * 4 + 3 * 2


def test_abstract_state_has_the_loop_state_shardings():
    """The compile check's abstract state (no weights) is sharded exactly as `_initial_state` shards the real one."""
    config = tiny_config("ppo", "tiny", mesh__fsdp=2, mesh__tensor=2)
    cfg = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                            num_kv_heads=2)
    mesh = loop._mesh(config)
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    real_state, _, real_sh = loop._initial_state(config, mesh, {"policy": params}, 10)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    spec, _, spec_sh = loop.abstract_state(config, mesh, {"policy": nnx.split(abstract, nnx.Param)[1]}, 10)
    assert jax.tree.structure(spec) == jax.tree.structure(real_state)
    same = jax.tree.map(lambda a, b: a.spec == b.spec, real_sh, spec_sh)
    assert all(jax.tree.leaves(same))
    assert any(s.spec != jax.P() for s in jax.tree.leaves(spec_sh))  # something is sharded at all
    assert all(a.shape == b.shape and a.dtype == b.dtype
               for a, b in zip(jax.tree.leaves(spec), jax.tree.leaves(real_state)))


def test_run_stops_with_the_sentence_before_any_rollout(tmp_path, monkeypatch):
    config = tiny_config("grpo", "tiny")
    calls = []
    monkeypatch.setattr(preflight, "device_capacity", lambda device: 2**10)  # a 1 KiB device
    monkeypatch.setattr(rollout_lib, "collect_batch", lambda *a, **k: calls.append("rollout"))
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: calls.append("evaluate"))
    with pytest.raises(preflight.InsufficientMemory, match=r"^the update step needs [\d.]+ GiB per device but the "
                                                           r"device has 0.00 GiB; lower it with optim.micro_batches"):
        loop.run(config, str(tmp_path))
    assert calls == []


def test_loop_runs_the_preflight_program(tmp_path, monkeypatch):
    """Every update of the run goes through the executable compiled before the first rollout (no second compile),
    for the batch layout with a reference (KL) and a critic (GAE)."""
    config = tiny_config("ppo", "tiny")
    config.train.num_steps, config.loss.kl_coef = 1, 0.01
    counts = {"compiled": 0, "jitted": 0}
    real_compile, real_make = loop.compile_update, loop.make_train_step

    class Counted:
        def __init__(self, fn, key):
            self.fn, self.key = fn, key

        def __call__(self, *args):
            counts[self.key] += 1
            return self.fn(*args)

        def lower(self, *args):
            return self.fn.lower(*args)

        def memory_analysis(self):
            return self.fn.memory_analysis()

    monkeypatch.setattr(loop, "compile_update", lambda *a: Counted(real_compile(*a), "compiled"))
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: Counted(real_make(*a, **k), "jitted"))
    monkeypatch.setattr(preflight, "device_capacity", lambda device: 2**40)
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    out = loop.run(config, str(tmp_path))
    assert np.isfinite(out["train/loss"])
    assert counts == {"compiled": config.optim.mini_batches * config.optim.ppo_epochs, "jitted": 0}
