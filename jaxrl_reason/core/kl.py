"""KL estimators and the adaptive KL controller (verl `kl_penalty`, Schulman 2020).

With `d = logp - logp_ref` per token:
  k1 / kl          d                                       unbiased value, biased gradient
  abs              |d|
  k2 / mse         0.5 d²                                  gradient = reverse-KL gradient in expectation
  k3 / low_var_kl  exp(-d) + d - 1, inner -d clamped to [-20, 20], result clamped to [-10, 10]
  <kind>+          forward value of <kind>, gradient of k2 (straight-through: k2 - sg[k2] + sg[k_kind])

Estimators register under their names in `KL_ESTIMATORS` (name -> forward value of `d`); `loss.kl_kind` is one of
its keys, optionally with the `+` suffix.
"""
from typing import Callable

import jax
import jax.numpy as jnp


def _k1(d):
    return d


def _k2(d):
    return 0.5 * jnp.square(d)


def _k3(d):
    # log(pi_ref/pi) clamped, then the estimate clamped (verl numerical guards).
    neg_d = jnp.clip(-d, -20.0, 20.0)
    return jnp.clip(jnp.exp(neg_d) - neg_d - 1.0, -10.0, 10.0)


KL_ESTIMATORS: dict[str, Callable] = {"k1": _k1, "kl": _k1, "abs": jnp.abs, "k2": _k2, "mse": _k2, "k3": _k3,
                                      "low_var_kl": _k3}
KL_KINDS = tuple(KL_ESTIMATORS)


def kl_kinds() -> tuple[str, ...]:
    """Every accepted `kind`: the registered names and each with the straight-through `+` suffix."""
    return tuple(KL_ESTIMATORS) + tuple(f"{k}+" for k in KL_ESTIMATORS)


def kl_estimate(logp_NxT, logp_ref_NxT, kind: str = "low_var_kl"):
    """Per-token KL(π_θ || π_ref) estimate `[N, T]`.

    Args:
      logp_NxT: log-probs of the sampled tokens under the live (or old, for KL-in-reward) policy.
      logp_ref_NxT: log-probs of the same tokens under the reference policy.
      kind: one of `KL_KINDS`, optionally with a `+` suffix (straight-through k2 gradient).

    Returns:
      `[N, T]` float32 (or wider) estimate; padding is not masked here, aggregate with `aggregate`.
    """
    straight_through = kind.endswith("+")
    base = kind[:-1] if straight_through else kind
    if base not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {kind!r}; expected one of {tuple(KL_ESTIMATORS)}, optionally with a "
                         f"'+' suffix.")
    dtype = jnp.promote_types(jnp.result_type(logp_NxT), jnp.float32)
    d = jnp.asarray(logp_NxT, dtype) - jnp.asarray(logp_ref_NxT, dtype)
    forward = KL_ESTIMATORS[base](d)
    if not straight_through or KL_ESTIMATORS[base] is _k2:
        return forward
    k2 = 0.5 * jnp.square(d)
    return k2 - jax.lax.stop_gradient(k2) + jax.lax.stop_gradient(forward)


def adaptive_kl_coef(beta, kl, target: float = 0.1, horizon: float = 10000.0, n=1):
    """One step of the adaptive KL controller (Ziegler et al. 2019).

    β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n / horizon), with `n` the number of responses in the batch.

    Returns:
      The new coefficient (scalar array).
    """
    if isinstance(target, (int, float)) and target <= 0:
        raise ValueError(f"adaptive_kl_coef target must be positive, got {target}.")
    if isinstance(horizon, (int, float)) and horizon <= 0:
        raise ValueError(f"adaptive_kl_coef horizon must be positive, got {horizon}.")
    err = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(beta, jnp.float32) * (1.0 + err * n / horizon)
