"""THE update step: `(state, batch) -> (state, metrics)`, one pure function, jitted once.

The step knows nothing about RL or SFT. It takes a `loss_fn(params, micro_batch, rng) -> (loss, metrics)` whose
losses over the micro-batches SUM to the mini-batch loss (the objectives in `train/objectives.py` and
`train/sft.py` scale each micro-batch by its share of the mini-batch normalizer), accumulates gradients over
`num_micro_batches` with `lax.scan`, applies one optax update, and returns the new state.

Micro-batch `m` takes rows `m, m + M, m + 2M, ...` of the mini-batch (a strided split): with the batch sharded
over ('data', 'fsdp') on its leading axis, every device then works on its local rows and no data moves. Because the
losses sum, the result equals the full-batch step up to float rounding (tested).

Non-finite guard: when the loss or any gradient is NaN/inf the update is skipped (params, optimizer state
unchanged), `metrics["skipped"] = 1` and `state.step` does not advance; the host loop counts consecutive skips
and stops the run with a clear message (`train/loop.py`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxrl_reason.train.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]  # (params, micro-batch pytree, rng)

# Metric-name prefix of a micro-batch's share of a mini-batch value (a loss term normalized by the mini-batch's
# counts): such metrics are summed over micro-batches, the others averaged; the prefix is dropped from the name.
SUMMED = "sum/"


def mark_shares(metrics: dict, shares) -> dict:
    """`metrics` with the names in `shares` (a loss's micro-batch shares) prefixed by `SUMMED`."""
    return {(SUMMED + k if k in shares else k): v for k, v in metrics.items()}


def split_micro_batches(batch, num_micro_batches: int):
    """[N, ...] -> [M, N/M, ...] on every leaf of a batch pytree (None fields stay None), micro-batch m = rows
    m, m+M, ... (strided: keeps per-device rows local)."""

    def split(x):
        n = x.shape[0]
        if n % num_micro_batches:
            raise ValueError(f"batch of {n} rows does not split into {num_micro_batches} micro-batches.")
        x = x.reshape(n // num_micro_batches, num_micro_batches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _reduce_metrics(metrics: dict, axis=None) -> dict:
    """`SUMMED`-prefixed metrics summed over the micro-batch axis, the others averaged (axis None: one batch)."""
    if axis is None:
        return {k.removeprefix(SUMMED): v for k, v in metrics.items()}
    return {k.removeprefix(SUMMED): (jnp.sum(v, axis) if k.startswith(SUMMED) else jnp.mean(v, axis))
            for k, v in metrics.items()}


def _accumulate_grads(loss_fn: LossFn, params, batch, rng: jax.Array, num_micro_batches: int):
    """Sums loss, gradients and `SUMMED` metrics over micro-batches; averages the other metrics."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro_batches == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng)
        return loss, grads, _reduce_metrics(metrics)
    micro = split_micro_batches(batch, num_micro_batches)
    keys = jax.random.split(rng, num_micro_batches)
    zero_grads = jax.tree.map(jnp.zeros_like, params)

    def body(acc, xs):
        loss_acc, grads_acc = acc
        mb, key = xs
        (loss, metrics), grads = grad_fn(params, mb, key)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        return (loss_acc + loss, grads_acc), metrics

    (loss, grads), metrics = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zero_grads), (micro, keys))
    return loss, grads, _reduce_metrics(metrics, axis=0)


def train_step(
    state: TrainState,
    batch,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    num_micro_batches: int = 1,
) -> tuple[TrainState, dict]:
    """One optimizer update on one mini-batch (pure; wrap with `make_train_step` to jit and shard it)."""
    rng, step_rng = jax.random.split(state.rng)
    loss, grads, metrics = _accumulate_grads(loss_fn, state.params, batch, step_rng, num_micro_batches)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + finite.astype(jnp.int32),
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        rng=rng,
    )
    metrics = dict(metrics)
    metrics["loss"] = loss
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    num_micro_batches: int = 1,
    state_shardings: Any = None,
    batch_shardings: Any = None,
    donate: bool = True,
):
    """Jits `train_step` once with explicit in/out shardings and the state buffers donated.

    Args:
      loss_fn: `(params, micro_batch, rng) -> (loss, metrics)`; micro-batch losses must sum to the batch loss.
      tx: the optax transformation (grad-norm clipping and the schedule live inside it).
      num_micro_batches: gradient-accumulation factor; must divide the batch rows.
      state_shardings: pytree of `NamedSharding` matching `TrainState` (None: let jit infer, single device).
      batch_shardings: pytree (or prefix) of `NamedSharding` for the batch, rows over ('data', 'fsdp').
      donate: donate the input state buffers (the caller must not reuse the old state).
    """

    def step(state, batch):
        return train_step(state, batch, loss_fn=loss_fn, tx=tx, num_micro_batches=num_micro_batches)

    kwargs = {}
    if state_shardings is not None:
        replicated = jax.tree.leaves(state_shardings)[0]
        replicated = jax.sharding.NamedSharding(replicated.mesh, jax.P())
        kwargs["in_shardings"] = (state_shardings, batch_shardings)
        kwargs["out_shardings"] = (state_shardings, replicated)
    return jax.jit(step, donate_argnums=(0,) if donate else (), **kwargs)
