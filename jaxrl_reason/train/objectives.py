"""RL objectives assembled from `core/` pieces; the forward passes that produce their log-probs are re-exported.

DESIGN.md §3: `logps_fn(params, batch) -> (logp_NxR, entropy_NxR)` is separate from the loss, which sees only
log-probs; the forward passes themselves (chunked LM head, compute dtype) live in `train/logprobs.py`.
`rl_loss` composes, per micro-batch:

    policy term   POLICY_LOSSES[mode]: ppo (dual clip, clip-higher, HAPO adaptive bounds + redistribution), gspo,
                  cispo, sapo, gmpo, clip_cov, kl_cov, gpg, dppo_tv, dppo_kl
  + kl_coef * agg(kl_estimate(logp, logp_ref))                      (KL as a loss, algorithms.md §1.3)
  - entropy_coef * agg(H)                                            (§1.4)
  + value_coef * value_loss(v, v_old, returns)                       (PPO critic, §1.2)

Every aggregation uses the global token / sequence counts of the whole mini-batch (`batch["num_tokens"]`,
`batch["num_seqs"]`), so micro-batch losses sum to the mini-batch loss (verl 0.8 semantics, §1.5) and the generic
step in `train/step.py` can accumulate them. HAPO's entropy normalization is per micro-batch by design (§4.1).

Batch layout (rows N = prompts x group size, prompt left-padded to P, response right-padded to R, L = P + R):
  tokens_NxL int32, valid_NxL bool, response_mask_NxR f32, logp_old_NxR, adv_NxR,
  optional logp_ref_NxR (KL), values_old_NxR and returns_NxR (critic), is_weight_NxR (rollout importance weights,
  train/mismatch.py), num_tokens_N, num_seqs_N (broadcast).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrl_reason.core import hapo as hapo_lib
from jaxrl_reason.core import kl as kl_lib
from jaxrl_reason.core import policy_loss as pl
from jaxrl_reason.core import policy_loss_variants  # noqa: F401  (registers CISPO, SAPO, GMPO, ... in POLICY_LOSSES)
from jaxrl_reason.core.advantages import hapo_redistribute_advantages
from jaxrl_reason.core.aggregate import aggregate
from jaxrl_reason.train import mismatch
from jaxrl_reason.train.logprobs import ar_logps, ar_values, causal_forward_inputs, token_logps  # noqa: F401
from jaxrl_reason.train.step import SUMMED

# Metrics normalized by the mini-batch's counts: each micro-batch reports its share, the step sums the shares.
_SHARES = ("pg_loss", "kl_loss", "entropy", "vf_loss")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Static hyper-parameters of the RL loss (hashable: part of the jitted function's identity)."""

    mode: str = "ppo"  # a key of core.policy_loss.POLICY_LOSSES
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float | None = None
    agg: str = "token-mean"
    agg_const: float | None = None
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    value_coef: float = 0.0  # > 0 only with a critic in params["value"]
    value_clip: float | None = 0.5
    hapo_adaptive_clip: bool = False
    hapo_clip_alpha: float = 1.0
    hapo_redistribute: bool = False
    hapo_adv_beta: float = 1.0
    hapo_pivot: float = 0.8
    hapo_sign_compat: bool = False
    sapo_tau_pos: float = 1.0  # SAPO gate temperature for A > 0
    sapo_tau_neg: float = 1.05  # and for A <= 0
    clip_cov_ratio: float = 2e-4  # Clip-Cov: fraction of tokens whose gradient is cut
    clip_cov_lb: float = 1.0  # Clip-Cov: covariance band the cut tokens are drawn from
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4  # KL-Cov: fraction of tokens with the |log r| penalty
    kl_cov_coef: float = 1.0  # KL-Cov: weight of that penalty

    @property
    def uses_entropy_stats(self) -> bool:
        return self.hapo_adaptive_clip or self.hapo_redistribute


def _agg_kwargs(cfg: ObjectiveConfig, batch: dict) -> dict:
    return dict(agg=cfg.agg, agg_const=cfg.agg_const, num_tokens=batch["num_tokens_N"][0],
                num_seqs=batch["num_seqs_N"][0])


def policy_term(cfg: ObjectiveConfig, logp, entropy, batch: dict, rng=None) -> tuple[jax.Array, dict]:
    """The policy-gradient term registered under `cfg.mode` in `core.policy_loss.POLICY_LOSSES`, with HAPO's
    entropy-adaptive clip ranges and advantage redistribution when enabled."""
    mask, adv, logp_old = batch["response_mask_NxR"], batch["adv_NxR"], batch["logp_old_NxR"]
    overrides, metrics = {}, {}
    if cfg.uses_entropy_stats:
        stats = hapo_lib.entropy_stats(jax.lax.stop_gradient(entropy), mask, cfg.hapo_pivot)
        h = hapo_lib.normalize_entropy(jax.lax.stop_gradient(entropy), mask, stats, cfg.hapo_sign_compat)
        eps_low, eps_high = cfg.eps_low, cfg.eps_high
        if cfg.hapo_adaptive_clip:
            eps_low, eps_high = pl.hapo_adaptive_clip_bounds(h, cfg.eps_low, cfg.eps_high, cfg.hapo_clip_alpha)
            overrides = dict(eps_low=eps_low, eps_high=eps_high)
        if cfg.hapo_redistribute:
            ratio = jnp.exp(jnp.clip(logp - logp_old, -20.0, 20.0))
            adv = hapo_redistribute_advantages(adv, h, ratio, eps_low, eps_high, cfg.hapo_adv_beta)
        metrics["hapo_h_mean"] = jnp.sum(h * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    overrides.update(mismatch.loss_overrides(batch))  # rollout importance weights, when the batch has them
    loss, pg_metrics = pl.POLICY_LOSSES[cfg.mode](logp, logp_old, adv, mask, cfg, _agg_kwargs(cfg, batch), rng=rng,
                                                  **overrides)
    return loss, {**pg_metrics, **metrics}


def rl_loss(params: dict, batch: dict, rng: jax.Array, *, cfg: ObjectiveConfig, policy_graphdef,
            value_graphdef=None, logps_fn=ar_logps, values_fn=ar_values) -> tuple[jax.Array, dict]:
    """Total RL loss of one micro-batch; `params = {"policy": ..., ["value": ...]}`.

    `logps_fn(graphdef, params, batch)` / `values_fn(graphdef, params, batch)`: the forward passes
    (`train/logprobs.py`, bound to a `LogpSpec` by the caller).
    """
    logp, entropy = logps_fn(policy_graphdef, params["policy"], batch)
    loss, metrics = policy_term(cfg, logp, entropy, batch, rng)
    mask = batch["response_mask_NxR"]
    agg = _agg_kwargs(cfg, batch)
    metrics["pg_loss"] = loss
    if cfg.kl_coef > 0:
        kl_tok = kl_lib.kl_estimate(logp, batch["logp_ref_NxR"], cfg.kl_kind)
        kl = aggregate(kl_tok, mask, agg["agg"], agg["agg_const"], num_tokens=agg["num_tokens"],
                       num_seqs=agg["num_seqs"])
        loss = loss + cfg.kl_coef * kl
        metrics["kl_loss"] = kl
    ent_term, ent_metrics = pl.entropy_bonus(entropy, mask, cfg.entropy_coef, **agg)
    metrics.update(ent_metrics)
    if cfg.entropy_coef > 0:
        loss = loss + ent_term
    if cfg.value_coef > 0:
        values = values_fn(value_graphdef, params["value"], batch)
        v_loss, v_metrics = pl.value_loss(values, batch["values_old_NxR"], batch["returns_NxR"], mask,
                                          cfg.value_clip, **agg)
        loss = loss + cfg.value_coef * v_loss
        metrics.update(v_metrics, vf_loss=v_loss)
    return loss, {(SUMMED + k if k in _SHARES else k): v for k, v in metrics.items()}

