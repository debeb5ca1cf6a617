"""HAPO entropy statistics, normalized entropy h~ and adaptive temperature.

HAPO (arXiv 2509.16591) modulates temperature, advantages and clip ranges per token by a normalized entropy
``h~ in [-1, 1]``. This module owns the normalization (released code ``compute_entropy_h``) and the sampler's
per-token temperature (released vLLM ``compute_entropy_based_temperature``); the advantage redistribution and
adaptive clipping that consume ``h~`` live in ``core/advantages.py`` and ``core/policy_loss.py``.

Statistics are a plain dict ``{"pivot", "sigma", "h_max", "h_min"}`` of float32 scalars (a pytree), so the loss
computes them per micro-batch and the sampler receives the previous step's ones as a jit argument.
"""
import jax
import jax.numpy as jnp

_LOG_FLOOR = 1e-8  # `entropy.clamp_min(eps)` and the variance / h_max / h_min floors of `compute_entropy_h`


def _masked_nearest_quantile(x_M, valid_M, q: float):
    """Nearest-interpolation quantile of ``x_M[valid_M]`` with static shapes (torch ``torch_quantile`` 'nearest').

    Invalid entries are set to +inf and sorted to the end; the index ``round(q * (n - 1))`` (round half to even,
    as Python's ``round``) is taken among the ``n`` valid ones. No valid entry -> 0 (``nan_to_num(0)``).
    """
    n = jnp.sum(valid_M.astype(jnp.int32))
    sorted_M = jnp.sort(jnp.where(valid_M, x_M, jnp.inf))
    idx = jnp.round(q * (n - 1).astype(jnp.float32)).astype(jnp.int32)
    value = sorted_M[jnp.clip(idx, 0, x_M.shape[0] - 1)]
    return jnp.where(n > 0, value, 0.0)


def entropy_stats(entropy_NxT, mask_NxT, pivot_quantile: float = 0.8):
    """Entropy statistics over the VALID tokens of a batch (code ``compute_entropy_h``).

    ``l = log(max(H, 1e-8))``; ``pivot`` = nearest-interpolation ``pivot_quantile`` of ``l`` (ρ = 0.8: the top
    20% are "high entropy"); ``sigma = sqrt(max(mean_valid((l - pivot)^2), 1e-8))`` (RMS around the pivot, not the
    std around the mean); with ``h = (l - pivot) / sigma``: ``h_max = max(max of positive valid h, 1e-8)`` and
    ``h_min = min(min of negative valid h, -1e-8)``. Entropies are treated as constants (stop-gradient).

    Args:
      entropy_NxT: [..., T] token entropies (nats), any float dtype (computed in float32).
      mask_NxT: [..., T] 1 for valid response tokens.
      pivot_quantile: ρ in [0, 1].
    Returns:
      dict(pivot, sigma, h_max, h_min) of float32 scalars. No valid token -> pivot 0, sigma 1e-4, h_max 1e-8,
      h_min -1e-8.
    """
    if not 0.0 <= pivot_quantile <= 1.0:
        raise ValueError(f"pivot_quantile must be in [0, 1], got {pivot_quantile}.")
    ell = jnp.log(jnp.maximum(jax.lax.stop_gradient(entropy_NxT).astype(jnp.float32), _LOG_FLOOR)).reshape(-1)
    valid = (mask_NxT > 0).reshape(-1)
    pivot = _masked_nearest_quantile(ell, valid, pivot_quantile)
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    var = jnp.sum(jnp.where(valid, jnp.square(ell - pivot), 0.0)) / count
    sigma = jnp.sqrt(jnp.maximum(var, _LOG_FLOOR))
    h = (ell - pivot) / sigma
    h_max = jnp.maximum(jnp.max(jnp.where(valid & (h > 0), h, 0.0)), _LOG_FLOOR)
    h_min = jnp.minimum(jnp.min(jnp.where(valid & (h < 0), h, 0.0)), -_LOG_FLOOR)
    return {"pivot": pivot, "sigma": sigma, "h_max": h_max, "h_min": h_min}


def _scale_h(h, stats, sign_compat: bool):
    """Piecewise scaling of the normalized entropy: ``h / h_max`` for h > 0; for h <= 0 ``h / |h_min|`` (intended,
    in [-1, 0]) or the released code's ``h * (1 / h_min)`` (positive: low-entropy tokens look like high-entropy
    ones)."""
    neg_scale = 1.0 / stats["h_min"] if sign_compat else 1.0 / jnp.abs(stats["h_min"])
    return jnp.where(h > 0, h / stats["h_max"], h * neg_scale)


def normalize_entropy(entropy_NxT, mask_NxT, stats, sign_compat: bool = False):
    """Normalized entropy ``h~`` in [-1, 1] (NOTES Eq. 5–7 + code ``compute_entropy_h``).

    ``h = (log(max(H, 1e-8)) - pivot) / sigma`` then ``h~ = h / h_max`` if h > 0, else ``h / |h_min|`` (default,
    the paper's intent: negative for low-entropy tokens). ``sign_compat=True`` [CODE] reproduces the released code,
    ``h * (1 / h_min)``, which is POSITIVE for low-entropy tokens (a switch because the intent is [INFERRED]).
    The result is clipped to [-1, 1] (a no-op when ``stats`` come from the same tokens) and is 0 on masked
    tokens. Stop-gradient: h~ is a modulation signal, not a differentiated quantity [INFERRED].

    Args:
      entropy_NxT: [..., T] token entropies. mask_NxT: [..., T]. stats: from ``entropy_stats``.
    Returns:
      h_NxT: [..., T] float32.
    """
    ell = jnp.log(jnp.maximum(jax.lax.stop_gradient(entropy_NxT).astype(jnp.float32), _LOG_FLOOR))
    h = (ell - stats["pivot"]) / stats["sigma"]
    h_tilde = jnp.clip(_scale_h(h, stats, sign_compat), -1.0, 1.0)
    return jnp.where(mask_NxT > 0, h_tilde, 0.0)


def adaptive_temperature(entropy, stats, t_base: float, tau: float, sign_compat: bool = False,
                         eps: float = 1e-6):
    """Per-row sampling temperature ``T = T_base * (1 + tau * h~)`` (NOTES Eq. 8 + code).

    As the released vLLM sampler: ``h = (log(max(H, eps)) - pivot) / (sigma + eps)``, h~ by the piecewise
    scaling (``sign_compat`` as in ``normalize_entropy``), clamped to [-1, 1]. ``stats`` are the previous training
    step's; ``stats=None`` (step 1) returns ``T_base``. ``H`` is the entropy of the base-temperature distribution.

    Args:
      entropy: [...] entropy of the current decoding distribution per row (e.g. [B]), nats.
      stats: dict from ``entropy_stats`` or None. t_base: T_base (released 1.0). tau: τ (released 0.05, paper 0.1).
    Returns:
      temperature: [...] float32, in [T_base (1 - tau), T_base (1 + tau)].
    """
    entropy = jnp.asarray(entropy, jnp.float32)
    if stats is None:
        return jnp.full(entropy.shape, t_base, jnp.float32)
    h = (jnp.log(jnp.maximum(entropy, eps)) - stats["pivot"]) / (stats["sigma"] + eps)
    h_tilde = jnp.clip(_scale_h(h, stats, sign_compat), -1.0, 1.0)
    return (t_base * (1.0 + tau * h_tilde)).astype(jnp.float32)
