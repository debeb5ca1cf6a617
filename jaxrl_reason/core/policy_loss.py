"""Policy, value and entropy losses on log-probabilities.

Losses take per-token log-probs `[N, T]` (never a model) and return `(loss, metrics)`; metrics are
stop-gradient scalars. Log-probs are upcast to float32 (or wider) before any exp.

Policy terms register under a name in `POLICY_LOSSES` (`@register_policy_loss`); the training stage calls
`POLICY_LOSSES[name](logp, logp_old, adv, mask, hp, agg, rng=key)` whatever the loss. The losses that verl ships
beyond PPO and GSPO (CISPO, SAPO, GMPO, Clip-Cov, KL-Cov, GPG, DPPO) live in `policy_loss_variants.py`, which
registers them when imported (`train/objectives.py` imports it, so every stage sees the whole registry).
"""
import inspect
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from .aggregate import aggregate, check_agg_mode, masked_mean

POLICY_LOSSES: dict[str, Callable] = {}


def register_policy_loss(name: str, hparams: Callable):
    """Decorator: registers a policy loss under `name` (its key is then a valid `loss.mode`).

    The registry entry has one signature for every loss,
      `entry(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, hp, agg, rng=None, **overrides) -> (loss, metrics)`:
    `hparams(hp)` picks the keywords the loss reads from the frozen hyper-parameters `hp`; `agg` holds the
    aggregation keywords (`agg`, `agg_const`, `num_tokens`, `num_seqs`); `overrides` replace hp-derived keywords
    with arrays (HAPO's per-token clip ranges); `rng` reaches the losses whose signature takes one. The decorated
    function itself is returned unchanged, so it stays callable with plain arguments.
    """
    def deco(fn):
        takes_rng = "rng" in inspect.signature(fn).parameters

        def entry(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, hp, agg, rng=None, **overrides):
            kwargs = {**hparams(hp), **agg, **overrides}
            if takes_rng:
                kwargs["rng"] = rng
            return entry.loss_fn(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, **kwargs)  # looked up per call

        entry.__name__, entry.__doc__, entry.loss_fn = f"{name}_entry", fn.__doc__, fn
        POLICY_LOSSES[name] = entry
        return fn
    return deco


def _clip_hparams(hp):
    return dict(eps_low=hp.eps_low, eps_high=hp.eps_high)


LOG_RATIO_CLAMP = 20.0   # verl's numerical guard on log π/π_old
GSPO_LOG_RATIO_MAX = 10.0  # verl's clamp on log s_{i,t}


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _loss_inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT):
    """What every policy loss starts from: float32 log-probs, the old log-probs and advantages as constants
    (stop-gradient), and a float32 mask."""
    return (_float(logp_NxT), jax.lax.stop_gradient(_float(logp_old_NxT)), jax.lax.stop_gradient(_float(adv_NxT)),
            jnp.asarray(mask_NxT, jnp.float32))


def weighted(per_token_NxT, token_weights_NxT=None):
    """The per-token loss times constant per-token weights (the rollout importance correction of
    `core/importance.py`, applied before aggregation as verl does), or unchanged when there are none."""
    if token_weights_NxT is None:
        return per_token_NxT
    return per_token_NxT * jax.lax.stop_gradient(_float(token_weights_NxT))


def _check_eps(eps, name: str):
    if isinstance(eps, (int, float)) and not 0.0 <= eps < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {eps}.")


def _ratio_metrics(log_ratio, ratio, mask):
    """ppo_kl = masked mean of logp_old − logp (clamped); ratio mean / max over valid tokens."""
    return {
        "ppo_kl": masked_mean(-log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": jnp.max(jnp.where(mask > 0, ratio, 0.0)),
    }


@register_policy_loss("ppo", lambda hp: dict(eps_low=hp.eps_low, eps_high=hp.eps_high, dual_clip_c=hp.dual_clip_c))
def ppo_clip_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low=0.2, eps_high=0.2,
                  dual_clip_c: Optional[float] = 3.0, agg: str = "token-mean", agg_const=None,
                  token_weights_NxT=None, **agg_kwargs):
    """PPO clipped surrogate with asymmetric (clip-higher) ranges and dual clip (verl
    `compute_policy_loss_vanilla`; DAPO's clip-higher; HAPO's per-token adaptive ranges).

      log r = clamp(logp − logp_old, −20, 20);  L1 = −A·r;  L2 = −A·clip(r, 1−ε_low, 1+ε_high)
      Lc = max(L1, L2);  Lpg = where(A < 0, min(Lc, −A·c), Lc)   (dual clip only when `dual_clip_c` is set)
      loss = aggregate(Lpg · weights, mask, agg)

    Args:
      logp_NxT, logp_old_NxT: current / behaviour log-probs `[N, T]` (logp_old is treated as a constant).
      adv_NxT: advantages `[N, T]` (constant). eps_low, eps_high: scalars or `[N, T]` arrays.
      dual_clip_c: dual-clip constant c > 1 (verl default 3.0, DAPO/DLER/HAPO 10.0); None disables it.
      agg, agg_const, **agg_kwargs: see `aggregate`. token_weights_NxT: optional per-token multiplicative weights
        (rollout/training mismatch correction), treated as constants.

    Returns:
      (loss, metrics): pg_clipfrac (L2 > L1), pg_clipfrac_lower (A < 0 and Lc > −A·c), ppo_kl, ratio_mean,
      ratio_max.
    """
    check_agg_mode(agg)
    _check_eps(eps_low, "eps_low")
    _check_eps(eps_high, "eps_high")
    if dual_clip_c is not None and isinstance(dual_clip_c, (int, float)) and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be greater than 1, got {dual_clip_c}.")
    logp, logp_old, adv, mask = _loss_inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT)
    eps_low, eps_high = jax.lax.stop_gradient((eps_low, eps_high))
    log_ratio = jnp.clip(logp - logp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    lc = jnp.maximum(l1, l2)
    if dual_clip_c is None:
        lpg = lc
        clipfrac_lower = jnp.zeros((), jnp.float32)
    else:
        l3 = -adv * dual_clip_c
        lpg = jnp.where(adv < 0, jnp.minimum(lc, l3), lc)
        clipfrac_lower = masked_mean(((lc > l3) & (adv < 0)).astype(jnp.float32), mask)
    loss = aggregate(weighted(lpg, token_weights_NxT), mask, agg, agg_const, **agg_kwargs)
    metrics = {"pg_clipfrac": masked_mean((l2 > l1).astype(jnp.float32), mask),
               "pg_clipfrac_lower": clipfrac_lower, **_ratio_metrics(log_ratio, ratio, mask)}
    return loss, jax.lax.stop_gradient(metrics)


@register_policy_loss("gspo", _clip_hparams)
def gspo_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low=3e-4, eps_high=4e-4, agg=None, agg_const=None,
              token_weights_NxT=None, **agg_kwargs):
    """GSPO-token loss with the sequence-level ratio (GSPO paper, verl
    `compute_policy_loss_gspo`).

      log s_i = Σ_t m·(logp − logp_old) / max(|o_i|, 1)
      log s_{i,t} = min(logp_{i,t} − sg[logp_{i,t}] + sg[log s_i], 10)   (value s_i, gradient through each token)
      L = max(−A·s, −A·clip(s, 1−ε_low, 1+ε_high)),  aggregated with seq-mean-token-mean (forced).
    No dual clip. With per-row constant advantages the gradient equals that of the sequence-level objective.
    `agg` and `agg_const` are accepted and ignored: GSPO fixes its aggregation (verl does the same).
    `token_weights_NxT`: optional constant per-token weights on the per-token loss (rollout importance correction).

    Returns:
      (loss, metrics): pg_clipfrac, pg_clipfrac_lower (always 0), ppo_kl, ratio_mean / ratio_max (of s).
    """
    _check_eps(eps_low, "eps_low")
    _check_eps(eps_high, "eps_high")
    logp, logp_old, adv, mask = _loss_inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT)
    log_ratio = logp - logp_old
    seq_len_N1 = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
    seq_log_ratio_N1 = jnp.sum(jnp.where(mask > 0, log_ratio * mask, 0.0), axis=-1, keepdims=True) / seq_len_N1
    log_s = logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(seq_log_ratio_N1)
    s = jnp.exp(jnp.minimum(log_s, GSPO_LOG_RATIO_MAX))
    l1 = -adv * s
    l2 = -adv * jnp.clip(s, 1.0 - eps_low, 1.0 + eps_high)
    loss = aggregate(weighted(jnp.maximum(l1, l2), token_weights_NxT), mask, "seq-mean-token-mean", **agg_kwargs)
    metrics = {"pg_clipfrac": masked_mean((l2 > l1).astype(jnp.float32), mask),
               "pg_clipfrac_lower": jnp.zeros((), jnp.float32), **_ratio_metrics(log_ratio, s, mask)}
    return loss, jax.lax.stop_gradient(metrics)


def value_loss(v_pred_NxT, v_old_NxT, returns_NxT, mask_NxT, clip: Optional[float] = 0.5,
               agg: str = "token-mean", agg_const=None, **agg_kwargs):
    """Clipped value loss (verl `compute_value_loss`).

      v_clip = clip(v_pred, V_old − c, V_old + c);  loss = 0.5·agg(max((v_pred−R)², (v_clip−R)²), m)
    `clip=None` disables clipping. Returns (loss, {"vf_clipfrac", "vpred_mean"}).
    """
    check_agg_mode(agg)
    if clip is not None and isinstance(clip, (int, float)) and clip < 0:
        raise ValueError(f"value clip must be non-negative, got {clip}.")
    v_pred = _float(v_pred_NxT)
    v_old = jax.lax.stop_gradient(_float(v_old_NxT))
    ret = jax.lax.stop_gradient(_float(returns_NxT))
    mask = jnp.asarray(mask_NxT, jnp.float32)
    l1 = jnp.square(v_pred - ret)
    if clip is None:
        l2 = l1
    else:
        l2 = jnp.square(jnp.clip(v_pred, v_old - clip, v_old + clip) - ret)
    loss = 0.5 * aggregate(jnp.maximum(l1, l2), mask, agg, agg_const, **agg_kwargs)
    metrics = {"vf_clipfrac": masked_mean((l2 > l1).astype(jnp.float32), mask),
               "vpred_mean": masked_mean(v_pred, mask)}
    return loss, jax.lax.stop_gradient(metrics)


def entropy_bonus(entropy_NxT, mask_NxT, coef: float, agg: str = "token-mean", agg_const=None,
                  **agg_kwargs):
    """Entropy bonus term to *add* to the loss: −coef·agg(H, m) (verl default coef 0).

    Returns (loss_term, {"entropy": agg(H, m)}).
    """
    check_agg_mode(agg)
    ent = aggregate(_float(entropy_NxT), mask_NxT, agg, agg_const, **agg_kwargs)
    return -coef * ent, {"entropy": jax.lax.stop_gradient(ent)}
