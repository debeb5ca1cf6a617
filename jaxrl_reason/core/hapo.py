"""HAPO's math: entropy statistics, normalized entropy h~, adaptive temperature, token-level group average
advantage, differential advantage redistribution and asymmetric adaptive clipping.

HAPO (arXiv 2509.16591) modulates temperature, advantages and clip ranges per token by a normalized entropy
``h~ in [-1, 1]``. This module owns the normalization (released code ``compute_entropy_h``), the sampler's
per-token temperature (released vLLM ``compute_entropy_based_temperature``), the token-level group average
(``compute_hapo_outcome_advantage``) and the two pieces that consume ``h~`` inside the loss (``ada_advantage``,
``ada_clip``). `jaxrl_reason/methods/hapo.py` wires them into a run.

Statistics are a plain dict ``{"pivot", "sigma", "h_max", "h_min"}`` of float32 scalars (a pytree), so the loss
computes them per micro-batch and the sampler receives the previous step's ones as a jit argument.
"""
import jax
import jax.numpy as jnp

from . import advantages as adv
from . import policy_loss as pl

HAPO_FALLBACK_SCOPES = ("valid", "padded")
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
    """Piecewise scaling of h: ``h / h_max`` for h > 0; for h <= 0 ``h / |h_min|`` (intended, in [-1, 0]) or
    the released code's ``h * (1 / h_min)`` (positive: low-entropy tokens look like high-entropy ones)."""
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

    As the released vLLM sampler: ``h = (log(max(H, eps)) - pivot) / (sigma + eps)``, h~ by the same piecewise
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


def _f32(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def hapo_token_group_advantages(reward_N, mask_NxT, group_size: int, eps: float = 1e-6,
                                fallback_abs: float = 5.0, norm_by_std: bool = True,
                                fallback_scope: str = "valid"):
    """HAPO token-level group average advantage `[N, T]` (HAPO Eq. 9,
    code `compute_hapo_outcome_advantage`).

    a_{i,t} = R_i on every valid token; μ_g, σ_g = mean and *population* std over all valid tokens of the group
    (length-weighted); A_{i,t} = (a_{i,t} − μ_g) / (σ_g + eps) (`norm_by_std=False`: no division).
    Fallback: when any |A| ≥ `fallback_abs` in the group, the group uses the ordinary GRPO advantage
    (`grpo_advantages`, singleton="verl"). All-equal or singleton groups give σ_g = 0 ⇒ A = 0.

    Args:
      fallback_scope: "valid" (default) checks |A| on valid tokens only; "padded" reproduces the released code,
        which also checks the padding positions, whose value there is (0 − μ_g)/(σ_g + eps). [switch; CODE quirk]

    Returns:
      (adv_NxT, metrics) with metrics["hapo_fallback_frac"] = fraction of groups that fell back. Padding is 0
      (the released code leaves (0 − μ_g)/σ_g there; every loss masks it anyway).
    """
    if fallback_scope not in HAPO_FALLBACK_SCOPES:
        raise ValueError(f"fallback_scope must be one of {HAPO_FALLBACK_SCOPES}, got {fallback_scope!r}.")
    r_BxG = adv._groups(reward_N, group_size)
    mask = adv._check_mask(mask_NxT, r_BxG.size)
    len_BxG = jnp.sum(mask, axis=1).reshape(r_BxG.shape)
    ref_B1 = r_BxG[:, :1]
    c_BxG = r_BxG - ref_B1                                   # shifted: exact zeros for ties
    mu_B1 = adv.masked_mean(c_BxG, len_BxG, axis=1)[:, None]     # length-weighted mean (weights = token counts)
    dev_BxG = c_BxG - mu_B1
    std_B1 = jnp.sqrt(adv.masked_mean(jnp.square(dev_BxG), len_BxG, axis=1))[:, None]
    scale_B1 = (std_B1 + eps) if norm_by_std else jnp.ones_like(std_B1)
    normed_BxG = dev_BxG / scale_B1
    valid_row_BxG = len_BxG > 0
    big_B = jnp.any(valid_row_BxG & (jnp.abs(normed_BxG) >= fallback_abs), axis=1)
    if fallback_scope == "padded":
        pad_value_B = (-(mu_B1 + ref_B1) / scale_B1)[:, 0]    # original-units score 0 on padding
        has_pad_B = jnp.any(len_BxG < mask.shape[1], axis=1)
        big_B = big_B | (has_pad_B & (jnp.abs(pad_value_B) >= fallback_abs))
    grpo_BxG = adv.grpo_advantages(reward_N, group_size, eps=eps, norm_by_std=norm_by_std,
                               singleton="verl").reshape(r_BxG.shape)
    adv_N = jnp.where(big_B[:, None], grpo_BxG, normed_BxG).reshape(-1)
    adv_NxT = jnp.where(mask > 0, adv_N[:, None] * mask, 0.0)
    return adv_NxT, {"hapo_fallback_frac": jnp.mean(big_B.astype(jnp.float32))}


def hapo_redistribute_advantages(adv_NxT, h_NxT, ratio_NxT, eps_low_NxT, eps_high_NxT, beta: float = 1.0):
    """HAPO differential advantage redistribution `[N, T]` (HAPO Eq. 10-11, code
    `ada_advantage`).

    Neutral zone (γ_L, γ_U) = (1 − ε_L/2, 1 + ε_R/2) (strict, with the already-adapted clip ranges);
    A_ent = A·(1 + β·h̃).  h̃ > 0: Â = A_ent outside the zone, A inside (amplify tokens already moving).
    h̃ ≤ 0: Â = A_ent inside the zone, A outside (damp near-on-policy low-entropy tokens).

    Args:
      adv_NxT: advantages; h_NxT: normalized entropy h̃ ∈ [−1, 1];
      ratio_NxT: live importance ratio π_θ/π_old; eps_low_NxT / eps_high_NxT: clip ranges (scalars or `[N, T]`).
    Everything is under stop-gradient (the code runs it in `torch.no_grad`).
    """
    adv, h, ratio, eps_low, eps_high = jax.lax.stop_gradient(
        (_f32(adv_NxT), _f32(h_NxT), _f32(ratio_NxT), _f32(eps_low_NxT), _f32(eps_high_NxT)))
    adv_ent = adv * (1.0 + beta * h)
    inside = (ratio > 1.0 - eps_low / 2.0) & (ratio < 1.0 + eps_high / 2.0)
    return jnp.where(h > 0, jnp.where(inside, adv, adv_ent), jnp.where(inside, adv_ent, adv))


def hapo_adaptive_clip_bounds(h_NxT, eps_low, eps_high, alpha: float = 1.0):
    """HAPO asymmetric adaptive clipping ranges (HAPO Eq. 12-13, code `ada_clip`).

    ε_L(i,t) = ε_L·(1 − α·h̃) if h̃ ≤ 0 else ε_L;   ε_R(i,t) = ε_R·(1 + α·h̃) if h̃ > 0 else ε_R.
    With α = 1 and h̃ ∈ [−1, 1] the clip range spans [1 − 2ε_L, 1 + 2ε_R]. Stop-gradient (code: no_grad).

    Args:
      h_NxT: normalized entropy h̃ ∈ [−1, 1]. eps_low / eps_high: base ranges (scalars).
    Returns:
      (eps_low_NxT, eps_high_NxT).
    """
    pl._check_eps(eps_low, "eps_low")
    pl._check_eps(eps_high, "eps_high")
    h = jax.lax.stop_gradient(_f32(h_NxT))
    eps_low_NxT = jnp.where(h <= 0, eps_low * (1.0 - alpha * h), eps_low)
    eps_high_NxT = jnp.where(h > 0, eps_high * (1.0 + alpha * h), eps_high)
    return eps_low_NxT, eps_high_NxT
