"""Tests for jaxrl_reason.train.checkpoint: round trips, sharded restore, atomicity under SIGKILL, refusals, errors."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_reason.train.checkpoint import Checkpointer, abstract_like, catch_preemption
from jaxrl_reason.train.state import TrainState, init_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _linear(partitioned=False):
    if not partitioned:
        return nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    return nnx.Linear(4, 8, rngs=nnx.Rngs(0),
                      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("fsdp", "tensor")),
                      bias_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("tensor",)))


@jax.jit
def _init_and_two_adamw_updates() -> TrainState:
    tx = optax.adamw(1e-2)
    state = init_train_state(nnx.state(_linear(), nnx.Param), tx, 7)
    params, opt_state = state.params, state.opt_state
    for i in range(2):
        grads = jax.tree.map(lambda p: (0.5 + i) * jnp.arange(p.size, dtype=p.dtype).reshape(p.shape), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return TrainState(jnp.int32(2), params, opt_state, jax.random.split(state.rng)[0])


@pytest.fixture(scope="module")
def state() -> TrainState:
    """Linear(4, 8) + adamw state after two updates with fixed gradients, so every leaf is non-trivial."""
    return _init_and_two_adamw_updates()


def _mesh():
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _meta():
    host_rng = np.random.default_rng(123)
    host_rng.random(5)
    return {"data": {"epoch": 1, "index": 17}, "host_rng": host_rng.bit_generator.state,
            "config": {"lr": 1e-3, "algo": "grpo", "mesh": [2, 2, 2]},
            "history": [{"step": 1, "reward": 0.25}, {"step": 2, "reward": None}]}


def test_round_trip_train_state_and_meta(tmp_path, state):
    expected = jax.tree.map(np.array, state)
    own = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), state)
    meta = _meta()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert not (tmp_path / "ckpt").exists()  # nothing is created before the first save
        assert ckpt.save(2, own, meta)
        # the async save copied to host: the caller may donate / delete its arrays right away
        for x in jax.tree.leaves(own):
            x.delete()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() == 2
        restored, meta_r = ckpt.restore(abstract_like(state))
    assert isinstance(restored, TrainState) and isinstance(restored.params, nnx.State)
    _assert_same(restored, expected)
    assert int(restored.step) == 2 and restored.rng.dtype == jnp.uint32
    assert meta_r == meta
    # the restored host RNG continues exactly like the original one
    ref = np.random.default_rng(123)
    ref.random(5)
    bitgen = np.random.PCG64()
    bitgen.state = meta_r["host_rng"]
    np.testing.assert_array_equal(np.random.Generator(bitgen).random(3), ref.random(3))


def test_relative_directory_saves_and_restores(tmp_path, state, monkeypatch):
    """orbax rejects relative paths at the async commit; `experiments/train.py`'s default workdir is relative."""
    monkeypatch.chdir(tmp_path)
    with Checkpointer("runs/x/checkpoints") as ckpt:
        assert ckpt.save(1, state, _meta(), force=True)
        ckpt.wait()
    monkeypatch.chdir("/")
    with Checkpointer(tmp_path / "runs/x/checkpoints") as ckpt:
        assert ckpt.latest_step() == 1
        restored, _ = ckpt.restore(abstract_like(state))
    _assert_same(restored, jax.tree.map(np.array, state))


def test_restore_into_pure_dict_params_and_concrete_target(tmp_path, state):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, {})
        pure = nnx.to_pure_dict(state.params)
        zeros = lambda t: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), t)  # noqa: E731
        target = TrainState(np.int32(0), zeros(pure), optax.adamw(1e-2).init(zeros(pure)), np.zeros(2, np.uint32))
        restored, _ = ckpt.restore(target)  # concrete arrays as target
    np.testing.assert_array_equal(restored.params["kernel"], state.params["kernel"][...])
    np.testing.assert_array_equal(restored.opt_state[0].nu["bias"], state.opt_state[0].nu["bias"][...])
    np.testing.assert_array_equal(restored.rng, state.rng)


@pytest.mark.devices(8)
def test_restore_into_sharded_target_on_2x2x2_mesh(tmp_path, state):
    mesh = _mesh()
    with jax.set_mesh(mesh):
        abstract_params = nnx.state(nnx.eval_shape(lambda: _linear(partitioned=True)), nnx.Param)
    # a jax trap: eval_shape under set_mesh gives AbstractMesh shardings
    assert isinstance(abstract_params["kernel"].sharding.mesh, jax.sharding.AbstractMesh)
    with pytest.raises(ValueError, match="AbstractMesh"):
        abstract_like(abstract_params)
    params = abstract_like(abstract_params, mesh)
    kernel_sh, bias_sh = NamedSharding(mesh, P("fsdp", "tensor")), NamedSharding(mesh, P("tensor"))
    assert params["kernel"].sharding == kernel_sh and params["bias"].sharding == bias_sh
    replicated = abstract_like(state, mesh)
    adam = replicated.opt_state[0]._replace(mu=params, nu=params)
    target = replicated._replace(params=params, opt_state=(adam,) + replicated.opt_state[1:])
    assert replicated.step.sharding == NamedSharding(mesh, P())
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, {"k": 1})  # saved unsharded, from one device
        restored, _ = ckpt.restore(target)
    for got, want, value in zip(jax.tree.leaves(restored), jax.tree.leaves(target), jax.tree.leaves(state)):
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(value))
    assert restored.opt_state[0].mu["kernel"].sharding == kernel_sh
    assert len({s.device for s in restored.params["kernel"].addressable_shards}) == 8
    # and back: the sharded state is itself a valid (concrete) target
    with Checkpointer(tmp_path) as ckpt:
        again, _ = ckpt.restore(restored)
    assert again.params["bias"].sharding == bias_sh


_KILLED_CHILD = textwrap.dedent("""
    import asyncio, sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from jaxrl_reason.train.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1])
    ckpt.save(1, {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(1)}, {"pos": 1})
    ckpt.wait()
    async def blocked_finalize(self):  # every file of step 2 is written; block just before the commit
        print("FINALIZING", flush=True)
        await asyncio.sleep(3600)
    atomicity.AtomicRenameTemporaryPath.finalize = blocked_finalize
    atomicity.CommitFileTemporaryPath.finalize = blocked_finalize
    ckpt.save(2, {"w": jnp.ones((2, 3)), "step": jnp.int32(2)}, {"pos": 2})
    time.sleep(3600)
""")


def test_sigkill_during_save_keeps_previous_step(tmp_path):
    directory = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(directory)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "FINALIZING"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert (directory / "2.orbax-checkpoint-tmp").is_dir() and not (directory / "2").exists()
    target = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 1
        with pytest.raises(ValueError, match=r"No finalized checkpoint for step 2 .*available: \[1\]"):
            ckpt.restore(abstract_like(target), step=2)
        restored, meta = ckpt.restore(abstract_like(target))
        np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3))
        assert int(restored["step"]) == 1 and meta == {"pos": 1}
        # the run can go on: step 2 is written again and the leftover temporary directory is gone
        assert ckpt.save(2, {"w": jnp.full((2, 3), 2.0), "step": jnp.int32(2)}, {"pos": 2})
        assert ckpt.latest_step() == 2
    assert not (directory / "2.orbax-checkpoint-tmp").exists()


def test_failed_commit_is_reported_and_run_continues(tmp_path, monkeypatch):
    from orbax.checkpoint._src.path import atomicity

    async def disk_full(self):
        raise OSError("disk full")

    target = abstract_like({"w": jnp.zeros(3)})
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(1, {"w": jnp.ones(3)}, {"s": 1})
        ckpt.wait()
        with monkeypatch.context() as m:
            m.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
            assert ckpt.save(2, {"w": jnp.full(3, 2.0)}, {"s": 2})
            with pytest.raises(RuntimeError, match=r"Saving step 2 to .* failed \(disk full\)\."):
                ckpt.wait()
        assert ckpt.latest_step() == 1
        assert ckpt.save(3, {"w": jnp.full(3, 3.0)}, {"s": 3})
        assert ckpt.all_steps() == [1, 3]
        restored, meta = ckpt.restore(target)
    np.testing.assert_array_equal(restored["w"], np.full(3, 3.0))
    assert meta == {"s": 3}


@pytest.mark.devices(8)
def test_refuses_nonfinite_state(tmp_path, state):
    with Checkpointer(tmp_path / "c") as ckpt:
        bad = state._replace(params=jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 1 else x, state.params))
        with pytest.raises(ValueError, match=r"Refusing to save step 3 to .*/c: 'params/bias' contains NaN or inf\."):
            ckpt.save(3, bad, {})
        mu = state.opt_state[0].mu
        bad_opt = (state.opt_state[0]._replace(mu=jax.tree.map(lambda x: x * jnp.inf, mu)),) + state.opt_state[1:]
        with pytest.raises(ValueError, match="'opt_state/0/mu/bias'"):
            ckpt.save(4, state._replace(opt_state=bad_opt), {})
        # leaves on different devices, a bfloat16 leaf and a host numpy leaf are all checked
        mixed = state._replace(step=jax.device_put(state.step, jax.devices()[3]),
                               rng=np.array([0.0, np.inf], jnp.bfloat16))
        with pytest.raises(ValueError, match="'rng' contains NaN or inf"):
            ckpt.save(5, mixed, {})
        on_other = state._replace(rng=jax.device_put(jnp.array([1.0, jnp.nan], jnp.bfloat16), jax.devices()[5]))
        with pytest.raises(ValueError, match="'rng' contains NaN or inf"):
            ckpt.save(5, on_other, {})
        assert ckpt.latest_step() is None
        with pytest.raises(ValueError, match="not strict JSON"):
            ckpt.save(5, state, {"x": float("nan")})
        with pytest.raises(ValueError, match="must be a dict"):
            ckpt.save(5, state, [1])
        finite_on_other = state._replace(rng=jax.device_put(jnp.array([1.0, 2.0], jnp.bfloat16), jax.devices()[5]))
        assert ckpt.save(6, finite_on_other, {})
        assert ckpt.latest_step() == 6


def test_clear_errors(tmp_path, state):
    target = abstract_like(state)
    with pytest.raises(FileNotFoundError, match=r"Checkpoint directory .*missing does not exist\."):
        Checkpointer(tmp_path / "missing").restore(target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no finalized checkpoint"):
        Checkpointer(tmp_path / "empty").restore(target)
    with pytest.raises(ValueError, match="at least 1"):
        Checkpointer(tmp_path, max_to_keep=0)
    with Checkpointer(tmp_path / "c") as ckpt:
        ckpt.save(1, state, {})
        wrong_shape = target._replace(params=jax.tree.map(lambda s: s.update(shape=s.shape[:-1] + (5,)),
                                                          target.params))
        with pytest.raises(ValueError, match=r"stores 'params/bias' with shape \(8,\) but the restore target "
                                             r"expects \(5,\)\."):
            ckpt.restore(wrong_shape)
        extra = target._replace(params={"policy": target.params})
        with pytest.raises(ValueError, match="has no entry 'params/policy/bias' that the restore target expects"):
            ckpt.restore(extra)
        fewer = target._replace(rng={})
        with pytest.raises(ValueError, match="has an entry 'rng' that the restore target lacks"):
            ckpt.restore(fewer)
        as_f16 = target._replace(params=jax.tree.map(lambda s: s.update(dtype=jnp.float16), target.params))
        with pytest.raises(ValueError, match="stores 'params/bias' as float32 but the restore target expects float16"):
            ckpt.restore(as_f16)
        cast, _ = ckpt.restore(as_f16, strict_dtypes=False)
        assert cast.params["kernel"].dtype == jnp.float16
        np.testing.assert_allclose(cast.params["kernel"], state.params["kernel"][...], rtol=1e-3)


def test_save_interval_force_and_max_to_keep(tmp_path, state):
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        assert ckpt.save(1, state, {})  # orbax always takes the first save of a run
        assert ckpt.save(2, state, {"s": 2})
        assert not ckpt.save(3, state, {})  # off the interval
        assert ckpt.save(3, state, {"s": 3}, force=True)
        assert not ckpt.save(3, state, {})  # not after the latest step
        assert not ckpt.save(3, state, {"s": "other"}, force=True)  # an existing step is never overwritten
        assert ckpt.save(4, state, {"s": 4})
        assert ckpt.all_steps() == [3, 4]
        _, meta = ckpt.restore(abstract_like(state), step=3)
        assert meta == {"s": 3}


def test_preemption_flag_on_sigterm_and_handler_restore():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        flag = catch_preemption()
        assert not flag.requested and signal.getsignal(signal.SIGINT) is previous_int
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested and calls == []
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat goes to the previous handler
        assert calls == [signal.SIGTERM]
        flag.close()
        with catch_preemption(sigint=True, force_on_repeat=False) as flag2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert flag2.requested
        assert signal.getsignal(signal.SIGINT) is previous_int
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _model_state(scan: bool) -> TrainState:
    """A tiny 2-layer Transformer's params + adam state (moments filled with distinct values) in one layout."""
    from jaxrl_reason.models import transformer as tf
    cfg = tf.TransformerConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
                               num_kv_heads=1, scan_layers=scan)
    params = {"policy": nnx.state(tf.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)}
    state = init_train_state(params, optax.adam(1e-3), 0)
    fill = lambda t, c: jax.tree.map(lambda x: x + c, t)  # noqa: E731
    adam = state.opt_state[0]._replace(mu=fill(params, 1.0), nu=fill(params, 2.0))
    return state._replace(opt_state=(adam,) + tuple(state.opt_state[1:]))


def _as_stacked(pure_unrolled: dict) -> dict:
    out = dict(pure_unrolled)
    out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[pure_unrolled["layers"][i] for i in range(2)])
    return out


@pytest.mark.devices(8)
@pytest.mark.parametrize("saved_scan", [False, True])
def test_checkpoint_of_the_other_layer_layout_is_converted(tmp_path, saved_scan):
    """A state saved with unrolled layers (`layers/<i>/...`) restores into a scanned target (`layers/...`,
    leading layer axis), sharded on a 2x2x2 mesh, and the other way round, with equal values everywhere."""
    saved, target_state = _model_state(saved_scan), _model_state(not saved_scan)
    mesh = _mesh()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, saved, {})
        restored, _ = ckpt.restore(abstract_like(target_state, mesh))
    for tree in ("params", "mu", "nu"):
        pick = (lambda s: s.params["policy"]) if tree == "params" else \
            (lambda s, f=tree: getattr(s.opt_state[0], f)["policy"])
        got = jax.tree.map(np.asarray, nnx.to_pure_dict(pick(restored)))
        src = jax.tree.map(np.asarray, nnx.to_pure_dict(pick(saved)))
        want = _as_stacked(src) if not saved_scan else src
        if saved_scan:  # compare in the stacked layout
            got = _as_stacked(got)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    q = restored.params["policy"]["layers"]
    q = (q[0] if saved_scan else q)["attn"]["q_proj"].get_value()
    assert isinstance(q.sharding, NamedSharding) and q.sharding.mesh == mesh
