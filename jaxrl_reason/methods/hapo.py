"""HAPO (arXiv 2509.16591): DAPO with four entropy-driven pieces, each a switch of the `hapo` section.

  A  adaptive temperature: the sampler's temperature per row is T_base * (1 + tau * h~), h~ the row's entropy
     normalized by the previous iteration's entropy statistics (carried between iterations, `next_state`).
  B  token-level group average: the advantage estimator "hapo" (with a GRPO fallback for outlier groups).
  C  differential advantage redistribution: A * (1 + beta * h~) inside or outside a neutral ratio zone.
  D  asymmetric adaptive clipping: per-token clip ranges from h~.
C and D act on the ppo loss inside each micro-batch (`policy_hook`), with entropy statistics of that micro-batch.
The math is in `core/hapo.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from jaxrl_reason.core import advantages as adv_lib
from jaxrl_reason.core import hapo as hapo_lib
from jaxrl_reason.methods.hooks import Method


def section(config) -> config_dict.ConfigDict:
    h = config_dict.ConfigDict()
    h.tau = 0.0  # A: adaptive temperature strength; 0 = off (released scripts 0.05, paper notes 0.1)
    h.sign_compat = False  # h~ of low-entropy tokens with the released code's sign (positive) instead of negative
    h.fallback_abs = 5.0  # B: a group whose |token-level advantage| reaches this falls back to GRPO's
    h.redistribute = False  # C
    h.adv_beta = 1.0  # C: beta
    h.adaptive_clip = False  # D
    h.clip_alpha = 1.0  # D: alpha
    h.pivot = 0.8  # entropy quantile that splits high from low entropy (h~ = 0 there)
    return h


@adv_lib.register_advantage("hapo")
def token_group_advantage(reward_N, mask_NxT, hp, **arrays):
    """B: token-level group average, GRPO fallback for groups with an advantage of `hapo.fallback_abs` or more."""
    adv, metrics = hapo_lib.hapo_token_group_advantages(reward_N, mask_NxT, hp.group_size, hp.eps,
                                                       hp.hapo.fallback_abs)
    return adv, None, metrics


def sampling(config) -> dict:
    return dict(hapo_tau=config.hapo.tau, hapo_sign_compat=config.hapo.sign_compat)


def next_state(h, entropy_NxR, mask_NxR):
    """Entropy statistics of this iteration's update batch for the next rollout (JSON-safe; None when not
    finite)."""
    stats = {k: float(v) for k, v in hapo_lib.entropy_stats(entropy_NxR, mask_NxR, h.pivot).items()}
    return stats if all(np.isfinite(list(stats.values()))) else None


def sampler_args(h, stats) -> tuple:
    """The previous iteration's statistics for the adaptive temperature (none at the first iteration or with A
    off: the sampler then uses T_base)."""
    if h.tau <= 0 or stats is None:
        return ()
    return ({k: np.float32(v) for k, v in stats.items()},)


def shape_policy_inputs(logp, entropy, batch, hp):
    """C and D on one micro-batch: (advantages, clip-range overrides of the policy loss, metrics)."""
    h_cfg, mask, adv = hp.hapo, batch.response_mask_NxR, batch.adv_NxR
    entropy = jax.lax.stop_gradient(entropy)
    stats = hapo_lib.entropy_stats(entropy, mask, h_cfg.pivot)
    h = hapo_lib.normalize_entropy(entropy, mask, stats, h_cfg.sign_compat)
    eps_low, eps_high, overrides = hp.eps_low, hp.eps_high, {}
    if h_cfg.adaptive_clip:
        eps_low, eps_high = hapo_lib.hapo_adaptive_clip_bounds(h, hp.eps_low, hp.eps_high, h_cfg.clip_alpha)
        overrides = dict(eps_low=eps_low, eps_high=eps_high)
    if h_cfg.redistribute:
        ratio = jnp.exp(jnp.clip(logp - batch.logp_old_NxR, -20.0, 20.0))
        adv = hapo_lib.hapo_redistribute_advantages(adv, h, ratio, eps_low, eps_high, h_cfg.adv_beta)
    return adv, overrides, {"hapo_h_mean": jnp.sum(h * mask) / jnp.maximum(jnp.sum(mask), 1.0)}


def policy_hook(config):
    h = config.hapo
    return shape_policy_inputs if (h.adaptive_clip or h.redistribute) else None


def validate(config) -> None:
    h = config.hapo
    if config.loss.mode != "ppo" and (h.adaptive_clip or h.redistribute):
        raise ValueError(f"HAPO's adaptive clip and advantage redistribution act on the ppo loss, not loss.mode "
                         f"{config.loss.mode!r}.")
    if not 0.0 <= h.pivot <= 1.0:
        raise ValueError(f"hapo.pivot must be in [0, 1], got {h.pivot}.")


HAPO = {  # on top of DAPO's recipe (`based_on`)
    "advantage.estimator": "hapo",  # B
    "hapo.tau": 0.05,  # A: released scripts; paper notes say 0.1
    "hapo.adaptive_clip": True,  # D
    "hapo.redistribute": True,  # C
    "loss.eps_high": 0.2,  # released scripts 0.2 / 0.2; paper notes 0.2 / 0.28
}

METHOD = Method(name="hapo", recipes={"hapo": HAPO}, based_on="dapo", section=section, validate=validate,
                sampling=sampling, next_state=next_state, sampler_args=sampler_args, legacy_meta_key="hapo_stats",
                policy_hook=policy_hook, parts=("hapo",))
