"""The training state: one pytree that the jitted update step consumes and returns.

Everything that must survive a preemption lives here and nowhere else, so a checkpoint of a `TrainState` plus the
host-side data position is a complete snapshot of a run. Frozen things (the reference policy for KL) are not part
of it: they are rebuilt from the same initial checkpoint on resume.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TrainState(NamedTuple):
    """Pytree of the trainable state.

    Attributes:
        step: int32 scalar, number of optimizer updates applied so far.
        params: pytree of parameter arrays (an `nnx.State` of `nnx.Param`s, or a dict of such states, e.g.
            `{"policy": ..., "value": ...}` for actor-critic methods).
        opt_state: the optax state of `params`.
        rng: a raw `uint32[2]` PRNG key (raw rather than typed so that orbax stores it as a plain array).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Builds the initial state; call it under `jax.set_mesh(mesh)` when params are sharded.

    Outside a mesh, `tx.init` puts optax's scalar `count` on one device and the sharded update step then fails
    with "incompatible devices".
    """
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )
