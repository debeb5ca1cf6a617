"""The generic update step: micro-batching, sharding, non-finite skipping, optimizer schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl_reason.train import optimizer as optim_lib
from jaxrl_reason.train import step as step_lib
from jaxrl_reason.train.contracts import UpdateBatch
from jaxrl_reason.train.state import init_train_state


def _params(key):
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (6, 3)), "b": jax.random.normal(k2, (3,))}


def _token_mean_loss(params, batch, rng):
    """Squared error, token-mean over a mask, normalized by the GLOBAL token count carried in the batch."""
    del rng
    pred = batch["x"] @ params["w"] + params["b"]
    err = jnp.sum((pred - batch["y"]) ** 2, -1) * batch["mask"]
    loss = jnp.sum(err) / batch["denom"][0]
    return loss, {"err_max": jnp.max(err)}


def _batch(n=8, nan=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    if nan:
        x[3, 2] = np.nan
    mask = (rng.random(n) > 0.3).astype(np.float32)
    return {
        "x": jnp.asarray(x),
        "y": jnp.asarray(rng.normal(size=(n, 3)).astype(np.float32)),
        "mask": jnp.asarray(mask),
        "denom": jnp.full((n,), max(mask.sum(), 1.0), jnp.float32),
    }


def _tx():
    return optim_lib.make_optimizer(1e-2, warmup_steps=1, total_steps=10, weight_decay=0.01)


def _run(num_micro, steps=3, batch=None, shardings=None):
    tx = _tx()
    state = init_train_state(_params(jax.random.PRNGKey(1)), tx, seed=0)
    fn = step_lib.make_train_step(_token_mean_loss, tx, num_micro_batches=num_micro, donate=False, **(shardings or {}))
    batch = batch or _batch()
    history = []
    for _ in range(steps):
        state, metrics = fn(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def test_micro_batched_equals_full_batch():
    full, hist_full = _run(1)
    for m in (2, 4):
        micro, hist_micro = _run(m)
        for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(micro.params)):
            np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_allclose(hist_full[-1]["loss"], hist_micro[-1]["loss"], rtol=1e-6)
        # AdamW and clipping hide a constant gradient factor from the params; the logged norm shows it
        np.testing.assert_allclose([h["grad_norm"] for h in hist_micro], [h["grad_norm"] for h in hist_full],
                                   rtol=1e-5)
        assert int(micro.step) == 3


def test_update_batch_splits_strided_and_keeps_unset_fields():
    """The typed update batch is a pytree: micro-batch m takes rows m, m + M, ...; fields a run does not use (None)
    stay None in every micro-batch."""
    n, r = 6, 2
    batch = UpdateBatch(tokens_NxL=np.arange(n * 5).reshape(n, 5), valid_NxL=np.ones((n, 5), bool),
                        response_mask_NxR=np.ones((n, r), np.float32), logp_old_NxR=np.zeros((n, r), np.float32),
                        adv_NxR=np.arange(n * r, dtype=np.float32).reshape(n, r))
    micro = step_lib.split_micro_batches(batch, 3)
    assert isinstance(micro, UpdateBatch) and micro.logp_ref_NxR is None and micro.num_tokens_N is None
    assert micro.tokens_NxL.shape == (3, 2, 5)
    np.testing.assert_array_equal(micro.adv_NxR[1], batch.adv_NxR[[1, 4]])


def test_indivisible_micro_batches_raise_one_sentence():
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        _run(3)


def test_nonfinite_update_is_skipped():
    tx = optim_lib.make_optimizer(1e-2)
    state = init_train_state(_params(jax.random.PRNGKey(1)), tx, seed=0)
    before = jax.device_get(state.params)
    fn = step_lib.make_train_step(_token_mean_loss, tx, donate=False)
    new_state, metrics = fn(state, _batch(nan=True))
    assert float(metrics["skipped"]) == 1.0
    assert int(new_state.step) == 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(new_state.params)):
        np.testing.assert_array_equal(a, b)
    ok_state, ok_metrics = fn(new_state, _batch())
    assert float(ok_metrics["skipped"]) == 0.0 and int(ok_state.step) == 1


@pytest.mark.devices(8)
def test_sharded_step_equals_unsharded():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    tx = _tx()
    with jax.set_mesh(mesh):
        state = init_train_state(_params(jax.random.PRNGKey(1)), tx, seed=0)
        repl = jax.sharding.NamedSharding(mesh, jax.P())
        state_sh = jax.tree.map(lambda _: repl, state)
        rows = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))
        batch_sh = {k: rows for k in _batch()}
        state = jax.device_put(state, state_sh)
        fn = step_lib.make_train_step(_token_mean_loss, tx, num_micro_batches=2, state_shardings=state_sh,
                                      batch_shardings=batch_sh, donate=True)
        batch = jax.device_put(_batch(), batch_sh)
        for _ in range(3):
            state, _ = fn(state, batch)
    ref, _ = _run(1)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_schedule_warmup_then_constant_and_cosine():
    s = optim_lib.learning_rate_schedule(1.0, 4, 12, "constant")
    np.testing.assert_allclose([float(s(i)) for i in (0, 2, 4, 11)], [0.0, 0.5, 1.0, 1.0])
    c = optim_lib.learning_rate_schedule(1.0, 2, 12, "cosine")
    # cosine after warm-up: 0.5 * (1 + cos(pi * k / 10)) at k = step - 2
    np.testing.assert_allclose(float(c(7)), 0.5 * (1 + np.cos(np.pi * 5 / 10)), atol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        optim_lib.learning_rate_schedule(1.0, 0, 1, "linear")


def test_a_device_shortfall_fails_on_the_cpu_and_skips_elsewhere():
    """The CPU suite fakes 8 devices, so fewer there is a lost XLA flag, not a small machine: fail, never skip."""
    from conftest import device_shortfall

    assert device_shortfall(8, 8, "cpu") is None and device_shortfall(8, 16, "gpu") is None
    action, reason = device_shortfall(8, 1, "cpu")
    assert action == "fail" and "xla_force_host_platform_device_count" in reason
    assert device_shortfall(8, 1, "gpu")[0] == "skip"
