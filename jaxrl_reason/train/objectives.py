"""RL objectives assembled from `core/` pieces; the forward passes that produce their log-probs are re-exported.

Losses see only log-probs: `logps_fn(params, batch) -> (logp_NxR, entropy_NxR)` is separate from the loss; the
forward passes themselves (chunked LM head, compute dtype) live in `train/logprobs.py`. `rl_loss` composes, per
micro-batch, with `hp` the frozen loss section (`train/hparams.py`):

    policy term   POLICY_LOSSES[hp.mode]: ppo (dual clip, clip-higher), gspo, cispo, sapo, gmpo, clip_cov, kl_cov,
                  gpg, dppo_tv, dppo_kl; a method's policy hook may first reshape the advantages and the loss's
                  clip ranges (HAPO)
  + kl_coef * agg(kl_estimate(logp, logp_ref))                      (KL as a loss)
  - entropy_coef * agg(H)
  + value_coef * value_loss(v, v_old, returns)                       (PPO critic)

Every aggregation uses the global token / sequence counts of the whole mini-batch (`batch.num_tokens_N`,
`batch.num_seqs_N`), so micro-batch losses sum to the mini-batch loss (verl 0.8 semantics) and the generic step
in `train/step.py` can accumulate them.

The batch is a `train.contracts.UpdateBatch` (rows N = prompts x group size, prompt left-padded to P, response
right-padded to R, L = P + R): tokens_NxL int32, valid_NxL bool, response_mask_NxR f32, logp_old_NxR, adv_NxR,
optional logp_ref_NxR (KL), values_old_NxR and returns_NxR (critic), is_weight_NxR (rollout importance weights,
train/mismatch.py), num_tokens_N, num_seqs_N (broadcast).
"""
from __future__ import annotations

import jax

from jaxrl_reason.core import kl as kl_lib
from jaxrl_reason.core import policy_loss as pl
from jaxrl_reason.core import policy_loss_variants  # noqa: F401  (registers CISPO, SAPO, GMPO, ... in POLICY_LOSSES)
from jaxrl_reason.core.aggregate import aggregate
from jaxrl_reason.train import mismatch
from jaxrl_reason.train.contracts import UpdateBatch
from jaxrl_reason.train.logprobs import ar_logps, ar_values, causal_forward_inputs, token_logps  # noqa: F401
from jaxrl_reason.train.step import mark_shares

# Metrics normalized by the mini-batch's counts: each micro-batch reports its share, the step sums the shares.
_SHARES = ("pg_loss", "kl_loss", "entropy", "vf_loss")


def _agg_kwargs(hp, batch: UpdateBatch) -> dict:
    return dict(agg=hp.agg, agg_const=hp.agg_const, num_tokens=batch.num_tokens_N[0], num_seqs=batch.num_seqs_N[0])


def policy_term(hp, logp, entropy, batch: UpdateBatch, rng=None, hooks: tuple = ()) -> tuple[jax.Array, dict]:
    """The policy-gradient term registered under `hp.mode` in `core.policy_loss.POLICY_LOSSES`.

    `hooks`: the active methods' policy hooks, `hook(logp, entropy, batch, hp) -> (adv_NxR, overrides, metrics)`,
    applied in order; the last advantages and the merged overrides go into the loss.
    """
    mask, adv, overrides, metrics = batch.response_mask_NxR, batch.adv_NxR, {}, {}
    for hook in hooks:
        adv, more, hook_metrics = hook(logp, entropy, batch.replace(adv_NxR=adv), hp)
        overrides.update(more)
        metrics.update(hook_metrics)
    overrides.update(mismatch.loss_overrides(batch))  # rollout importance weights, when the batch has them
    loss, pg_metrics = pl.POLICY_LOSSES[hp.mode](logp, batch.logp_old_NxR, adv, mask, hp, _agg_kwargs(hp, batch),
                                                 rng=rng, **overrides)
    return loss, {**pg_metrics, **metrics}


def rl_loss(params: dict, batch: UpdateBatch, rng: jax.Array, *, hp, policy_graphdef, value_graphdef=None,
            logps_fn=ar_logps, values_fn=ar_values, hooks: tuple = ()) -> tuple[jax.Array, dict]:
    """Total RL loss of one micro-batch; `params = {"policy": ..., ["value": ...]}`; `hp` the frozen loss section.

    `logps_fn(graphdef, params, batch)` / `values_fn(graphdef, params, batch)`: the forward passes
    (`train/logprobs.py`, bound to a `LogpSpec` by the caller). `hooks`: the methods' policy hooks (`policy_term`).
    """
    logp, entropy = logps_fn(policy_graphdef, params["policy"], batch)
    loss, metrics = policy_term(hp, logp, entropy, batch, rng, hooks)
    mask = batch.response_mask_NxR
    agg = _agg_kwargs(hp, batch)
    metrics["pg_loss"] = loss
    if hp.kl_coef > 0:
        kl_tok = kl_lib.kl_estimate(logp, batch.logp_ref_NxR, hp.kl_kind)
        kl = aggregate(kl_tok, mask, agg["agg"], agg["agg_const"], num_tokens=agg["num_tokens"],
                       num_seqs=agg["num_seqs"])
        loss = loss + hp.kl_coef * kl
        metrics["kl_loss"] = kl
    ent_term, ent_metrics = pl.entropy_bonus(entropy, mask, hp.entropy_coef, **agg)
    metrics.update(ent_metrics)
    if hp.entropy_coef > 0:
        loss = loss + ent_term
    if hp.value_coef > 0:
        values = values_fn(value_graphdef, params["value"], batch)
        v_loss, v_metrics = pl.value_loss(values, batch.values_old_NxR, batch.returns_NxR, mask,
                                          hp.value_clip, **agg)
        loss = loss + hp.value_coef * v_loss
        metrics.update(v_metrics, vf_loss=v_loss)
    return loss, mark_shares(metrics, _SHARES)

