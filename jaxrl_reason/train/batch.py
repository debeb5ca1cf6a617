"""From collected rollout rows to the fixed-shape update batch: log-probs, values, advantages.

`compute_advantages` calls the estimator registered under `advantage.estimator` in
`core.advantages.ADVANTAGE_ESTIMATORS` with the frozen advantage section as `hp` (`train/hparams.py`). The forward
passes for old / reference log-probs and critic values are jitted once per shape (`make_forward_fns`),
micro-batched over rows and sharded like the update step. The resulting batch layout is the one documented in
`train/objectives.py`.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_reason.core import advantages as adv_lib
from jaxrl_reason.train import mismatch, multihost
from jaxrl_reason.train.contracts import Rows, UpdateBatch
from jaxrl_reason.train.logprobs import LogpSpec, ar_logps, ar_values
from jaxrl_reason.train.step import split_micro_batches


@partial(jax.jit, static_argnames=("hp",))
def compute_advantages(hp, reward_N, mask_NxR, logp_old_NxR=None, logp_ref_NxR=None, values_NxR=None,
                       greedy_reward_N=None):
    """Advantages `[N, R]`, returns for the critic (or None) and metrics: `ADVANTAGE_ESTIMATORS[hp.estimator]`."""
    if hp.estimator not in adv_lib.ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {hp.estimator!r}; use one of "
                         f"{tuple(adv_lib.ADVANTAGE_ESTIMATORS)}.")
    return adv_lib.ADVANTAGE_ESTIMATORS[hp.estimator](
        reward_N, mask_NxR.astype(jnp.float32), hp, logp_old_NxT=logp_old_NxR, logp_ref_NxT=logp_ref_NxR,
        values_NxT=values_NxR, greedy_reward_N=greedy_reward_N)


def _over_micro_batches(fn, micro_batch_rows: int):
    """`fn(params, batch)` as a `lax.map` over micro-batches of `micro_batch_rows` rows (0: one pass).

    Micro-batch m takes rows m, m + M, m + 2M, ... (the strided split of the update step), so with rows sharded
    over ('data', 'fsdp') every device keeps its own rows; outputs are put back in row order.
    """
    if micro_batch_rows < 0:
        raise ValueError(f"micro_batch_rows must be >= 0 (0: one pass), got {micro_batch_rows}.")

    def run(params, batch):
        rows = jax.tree.leaves(batch)[0].shape[0]
        if micro_batch_rows == 0 or micro_batch_rows >= rows:
            return fn(params, batch)
        if rows % micro_batch_rows:
            raise ValueError(f"{rows} rows do not split into log-prob micro-batches of {micro_batch_rows} rows.")
        out = jax.lax.map(lambda mb: fn(params, mb), split_micro_batches(batch, rows // micro_batch_rows))
        return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(rows, *x.shape[2:]), out)

    return run


def make_forward_fns(policy_graphdef, value_graphdef=None, *, spec: LogpSpec = LogpSpec(), micro_batch_rows: int = 0,
                     policy_shardings=None, value_shardings=None, rows_sharding=None):
    """Jitted no-grad forwards: `logps(params, batch) -> (logp, entropy)`, `values(params, batch)`.

    Both run over micro-batches of `micro_batch_rows` rows (0: the whole batch in one pass) and use `spec`'s
    chunked LM head and compute dtype. With `rows_sharding` (rows over ('data', 'fsdp')) and the params'
    training shardings (`policy_shardings`, `value_shardings`: pytrees of `NamedSharding`), they are jitted with
    those explicit in/out shardings; the outputs `[N, R]` come back sharded by rows.
    """
    spec.validate()

    def jit(fn, param_shardings):
        fn = _over_micro_batches(fn, micro_batch_rows)
        if rows_sharding is None:
            return jax.jit(fn)
        jitted = jax.jit(fn, in_shardings=(param_shardings, rows_sharding), out_shardings=rows_sharding)

        def under_mesh(params, batch):  # traced under the mesh, so the model's activation constraints apply
            if multihost.active():  # host rows (the same on every process) enter as global arrays
                batch = multihost.global_from_host(batch, rows_sharding)
            with jax.set_mesh(rows_sharding.mesh):
                return jitted(params, batch)

        under_mesh.lower = jitted.lower
        return under_mesh

    logps = jit(lambda p, b: ar_logps(policy_graphdef, p, b, spec), policy_shardings)
    values = None
    if value_graphdef is not None:
        values = jit(lambda p, b: ar_values(value_graphdef, p, b, spec), value_shardings)
    return logps, values


def model_inputs(rows: Rows) -> UpdateBatch:
    """Prompt+response tokens `[N, P+R]` and validity of collected rows (numpy): the forward passes' inputs."""
    return UpdateBatch(
        tokens_NxL=np.concatenate([rows.prompt_tokens_NxP, rows.tokens_NxR], axis=1).astype(np.int32),
        valid_NxL=np.concatenate([rows.prompt_mask_NxP, rows.response_mask_NxR], axis=1),
        response_mask_NxR=np.asarray(rows.response_mask_NxR).astype(np.float32),
    )


def build_update_batch(rows: Rows, adv_hp, *, policy_params, logps_fn, ref_params=None, value_params=None,
                       values_fn=None, extra_adv_NxR=None, rollout_hp=None) -> tuple[UpdateBatch, dict, np.ndarray]:
    """The full rollout batch (numpy) with logp_old, [logp_ref], [values_old, returns], adv[, is_weight].

    `extra_adv_NxR` is added to the outcome advantage (the methods' advantage terms, summed).
    `rollout_hp`: the rollout config section, whose mismatch fields ask for sampler / trainer mismatch metrics and
    importance weights (`train/mismatch.py`).
    """
    inputs = model_inputs(rows)
    mask = inputs.response_mask_NxR
    logp_old, entropy_old = logps_fn(policy_params, inputs)
    is_weight, mismatch_metrics = mismatch.batch_terms(rows, logp_old, mask, rollout_hp)
    logp_ref = logps_fn(ref_params, inputs)[0] if ref_params is not None else None
    values = values_fn(value_params, inputs) if values_fn is not None else None
    greedy = None if rows.greedy_reward_N is None else jnp.asarray(rows.greedy_reward_N)
    adv, returns, metrics = compute_advantages(adv_hp, jnp.asarray(rows.reward_N), mask, logp_old, logp_ref, values,
                                               greedy_reward_N=greedy)
    if extra_adv_NxR is not None:
        adv = adv + extra_adv_NxR * mask
    batch = inputs.replace(logp_old_NxR=logp_old, adv_NxR=adv, logp_ref_NxR=logp_ref, is_weight_NxR=is_weight,
                           returns_NxR=returns, values_old_NxR=None if returns is None else values)
    metrics = {**{k: float(v) for k, v in metrics.items()}, **mismatch_metrics}
    metrics["adv/mean"] = float(jnp.sum(adv * mask) / max(float(mask.sum()), 1.0))
    metrics["adv/abs_max"] = float(jnp.max(jnp.abs(adv)))
    metrics["policy/entropy"] = float(jnp.sum(entropy_old * mask) / max(float(mask.sum()), 1.0))
    return multihost.to_host(batch), metrics, multihost.to_host(entropy_old)


def mini_batches(batch: UpdateBatch, num_mini_batches: int, rng: np.random.Generator,
                 group_size: int) -> list[UpdateBatch]:
    """Shuffles whole groups and splits the rollout batch into mini-batches, each with its global counts."""
    n = batch.num_rows
    groups = n // group_size
    if groups % num_mini_batches:
        raise ValueError(f"{groups} groups do not split into {num_mini_batches} mini-batches.")
    order = (rng.permutation(groups)[:, None] * group_size + np.arange(group_size)).reshape(num_mini_batches, -1)
    out = []
    for rows in order:
        mb = jax.tree.map(lambda v: np.asarray(v)[rows], batch.replace(num_tokens_N=None, num_seqs_N=None))
        mask = mb.response_mask_NxR
        m = len(rows)
        out.append(mb.replace(num_tokens_N=np.full((m,), max(mask.sum(), 1.0), np.float32),
                              num_seqs_N=np.full((m,), max((mask.sum(-1) > 0).sum(), 1), np.float32)))
    return out
