"""The sampler / trainer log-prob contract in the RL loop: mismatch metrics, importance correction, exact mode.

The sampler returns, per response token, the log-prob under the distribution it sampled from (after temperature,
top-k / top-p / min-p, HAPO's temperature) and the raw policy log-prob (temperature 1, no truncation); the rollout
rows carry the raw one as `logp_sampler_raw_NxR`. The trainer recomputes the old log-probs with its own forward pass,
also at temperature 1 with no truncation, so the raw sampler log-prob is the comparable one: their difference is
the numerical mismatch of the two implementations (kernels, dtype, cache, reduction shapes), not the sampling
processors. `build_update_batch` then

  - logs `rollout/mismatch_*` metrics (`core.importance.mismatch_metrics`) when `rollout.log_mismatch`, an
    importance correction or the exact mode is on;
  - with `rollout.is_correction` != "none" adds the detached weights `is_weight_NxR` (token / sequence, truncated
    or masked, cap `rollout.is_cap`) to the batch; the policy loss multiplies its per-token loss by them before
    aggregation (verl's rollout correction), for every loss that takes per-token weights (`weighted_losses`).

A masked-diffusion policy (TraceRL) logs the same metrics with `rollout.log_mismatch`: the diffusion sampler's raw
log-prob of each token it unmasked against the trainer's old log-prob of that token in the replayed state of the
same step (`methods/tracerl.replay_mismatch`); the correction and the exact mode are for causal policies.

`rollout.exact_logprobs` samples with `train/exact_sampler.py`, whose raw log-probs equal the trainer's bit for
bit when both passes run the same number of rows (checked here at start-up).
"""
from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np

from jaxrl_reason.core import importance
from jaxrl_reason.core.policy_loss import POLICY_LOSSES


METRIC_NAMES = {"kl_k1": "rollout/mismatch_kl", "kl_k3": "rollout/mismatch_k3_kl",
                "max_abs": "rollout/mismatch_max_abs", "max_ratio": "rollout/max_ratio", "min_ratio": "rollout/min_ratio",
                "seq_max_ratio": "rollout/seq_max_ratio", "frac_over_cap": "rollout/frac_over_cap",
                "seq_frac_over_cap": "rollout/seq_frac_over_cap"}


def _logged(rollout) -> bool:
    """Whether the `rollout` section asks for the mismatch metrics (asked for, implied by a correction or exact mode)."""
    return rollout.log_mismatch or rollout.exact_logprobs or rollout.is_correction != "none"


def validate(config) -> None:
    """One ValueError sentence for an impossible correction or exact-mode setting."""
    r = config.rollout
    importance.check_kind(r.is_correction, r.is_cap)
    if r.is_correction != "none":
        if config.loss.mode not in weighted_losses():
            raise ValueError(f"rollout.is_correction needs a loss that takes per-token weights "
                             f"({', '.join(weighted_losses())}), not loss.mode {config.loss.mode!r}.")
        if config.model.attention != "causal":
            raise ValueError("rollout.is_correction is for autoregressive (causal) policies.")
    if not r.exact_logprobs:
        return
    rows = r.prompts_per_step * r.group_size
    sample_rows = r.sample_batch_rows or rows
    logp_rows = config.optim.logp_micro_batch_rows or rows
    if config.model.attention != "causal" or r.compact_rows or r.lanes != 1:
        raise ValueError("rollout.exact_logprobs samples with the trainer's forward pass: it needs a causal policy, "
                         "rollout.compact_rows False and rollout.lanes 1.")
    if sample_rows != logp_rows:
        raise ValueError(f"rollout.exact_logprobs needs the sampler and the old log-prob pass to run the same "
                         f"number of rows (XLA's results depend on it): rollout.sample_batch_rows gives "
                         f"{sample_rows}, optim.logp_micro_batch_rows {logp_rows}.")


def weighted_losses() -> tuple[str, ...]:
    """The registered policy losses that multiply their per-token loss by `token_weights_NxT`."""
    return tuple(name for name, entry in POLICY_LOSSES.items()
                 if "token_weights_NxT" in inspect.signature(entry.loss_fn).parameters)


def batch_terms(rows, logp_old_NxR, mask_NxR, rollout) -> tuple[object, dict]:
    """(is_weight_NxR or None, metrics) of the old log-probs against the rows' raw sampler log-probs (`Rows`), as
    the `rollout` config section asks (`is_correction`, `is_cap`, `is_mis_lower`, `log_mismatch`,
    `exact_logprobs`); (None, {}) when off or `rollout` is None."""
    if rollout is None or not _logged(rollout) or rows.logp_sampler_raw_NxR is None:
        return None, {}
    sampler = jnp.asarray(rows.logp_sampler_raw_NxR, jnp.float32)
    correction = rollout.is_correction
    cap = rollout.is_cap if correction != "none" else None
    metrics = {METRIC_NAMES[k]: float(v)
               for k, v in importance.mismatch_metrics(logp_old_NxR, sampler, mask_NxR, cap).items()}
    if correction == "none":
        return None, metrics
    lower = None if rollout.is_mis_lower < 0 else rollout.is_mis_lower
    w = importance.importance_weights(correction, logp_old_NxR, sampler, mask_NxR, rollout.is_cap, lower)
    mask = np.asarray(mask_NxR, np.float32)
    n = max(float(mask.sum()), 1.0)
    metrics["rollout/is_weight_mean"] = float(jnp.sum(w * mask) / n)
    metrics["rollout/is_zeroed_frac"] = float(jnp.sum((w == 0) * mask) / n)
    return w, metrics


def loss_overrides(batch) -> dict:
    """The per-token weights the policy loss multiplies its per-token loss by, when the batch (`UpdateBatch`)
    carries them."""
    return {} if batch.is_weight_NxR is None else {"token_weights_NxT": batch.is_weight_NxR}
