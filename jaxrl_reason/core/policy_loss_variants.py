"""Policy losses beyond PPO and GSPO, each one function registered under its `loss.mode` name.

Every formula transcribes verl's `core_algos.py` (the `@register_policy_loss` function named in each docstring):
CISPO, SAPO, GMPO (`geo_mean`), Clip-Cov, KL-Cov, GPG and DPPO (Binary-TV, Binary-KL). Shapes: `[N, T]` log-probs,
advantages and masks; losses return `(loss, metrics)` like `policy_loss.ppo_clip_loss`, and take the same
aggregation keywords (`agg`, `agg_const`, `num_tokens`, `num_seqs`) so that micro-batch losses sum to the
mini-batch loss. The log-ratio is clamped to ±20 as in verl's PPO loss (a numerical guard only: no token of a
sane batch reaches it).
"""
import jax
import jax.numpy as jnp

from .aggregate import aggregate, check_agg_mode, masked_mean
from .policy_loss import LOG_RATIO_CLAMP, _clip_hparams, _loss_inputs, _ratio_metrics, register_policy_loss, weighted

DPPO_TRUNCATION_DEFAULT = 20.0  # verl's clip_ratio_c fallback for DPPO's truncated importance weight


def _inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, agg):
    """float32 log-probs (logp_old, adv constant), the mask, the clamped log-ratio and the ratio."""
    check_agg_mode(agg)
    logp, logp_old, adv, mask = _loss_inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT)
    log_ratio = jnp.clip(logp - logp_old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return logp, logp_old, adv, mask, log_ratio, jnp.exp(log_ratio)


def _check_positive(x, name):
    if isinstance(x, (int, float)) and not x > 0:
        raise ValueError(f"{name} must be positive, got {x}.")


@register_policy_loss("cispo", _clip_hparams)
def cispo_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low=10.0, eps_high=0.2, agg="token-mean",
               agg_const=None, token_weights_NxT=None, **agg_kwargs):
    """CISPO (MiniMax-M1, arXiv 2506.13585; verl `compute_policy_loss_cispo`): clip the importance weight, not
    the update, and keep every token's gradient.

      L = −sg(clip(r, 1−ε_low, 1+ε_high)) · A · logp     (ε_low = 10: no lower bound, verl's example)
    Metrics: pg_clipfrac (r outside the range), ppo_kl, ratio_mean, ratio_max.
    """
    _check_positive(eps_low, "eps_low")
    _check_positive(eps_high, "eps_high")
    logp, _, adv, mask, log_ratio, ratio = _inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, agg)
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jax.lax.stop_gradient(clipped) * adv * logp
    loss = aggregate(weighted(per_token, token_weights_NxT), mask, agg, agg_const, **agg_kwargs)
    metrics = {"pg_clipfrac": masked_mean((ratio != clipped).astype(jnp.float32), mask),
               **_ratio_metrics(log_ratio, ratio, mask)}
    return loss, jax.lax.stop_gradient(metrics)


@register_policy_loss("sapo", lambda hp: dict(tau_pos=hp.sapo_tau_pos, tau_neg=hp.sapo_tau_neg))
def sapo_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, tau_pos=1.0, tau_neg=1.05, agg=None, agg_const=None,
              token_weights_NxT=None, **agg_kwargs):
    """SAPO soft-gated policy optimization (arXiv 2511.20347; verl `compute_policy_loss_sapo`).

      τ = τ_pos if A > 0 else τ_neg;  f(r) = σ(τ·(r − 1)) · 4/τ;  L = −f(r)·A,  seq-mean-token-mean (forced:
      `agg` / `agg_const` are ignored, as in verl). The gate's slope at r = 1 is 1, so on-policy it is the plain
      policy gradient; far from r = 1 the gradient fades smoothly instead of being cut.
    """
    _check_positive(tau_pos, "sapo_tau_pos")
    _check_positive(tau_neg, "sapo_tau_neg")
    _, _, adv, mask, log_ratio, ratio = _inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, "seq-mean-token-mean")
    tau = jnp.where(adv > 0, tau_pos, tau_neg)
    gate = jax.nn.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = aggregate(weighted(-gate * adv, token_weights_NxT), mask, "seq-mean-token-mean", **agg_kwargs)
    return loss, jax.lax.stop_gradient(_ratio_metrics(log_ratio, ratio, mask))


@register_policy_loss("gmpo", _clip_hparams)
def gmpo_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low=0.4, eps_high=0.4, agg=None, agg_const=None,
              num_tokens=None, num_seqs=None):
    """GMPO geometric-mean policy optimization (arXiv 2507.20673; verl `compute_policy_loss_geo_mean`).

      ℓ_t = logp − logp_old;  ℓ̃_t = sgn(A)·min(sgn(A)·ℓ_t, sgn(A)·clip(ℓ_t, −ε_low, ε_high))   (clip in log space)
      s_i = exp(Σ_t m·ℓ̃_t / |o_i|);  Ā_i = Σ_t m·A / |o_i|;  loss = Σ_i −Ā_i·s_i / num_seqs
    The sequence mean is over non-empty rows (`num_seqs`, the global count when micro-batching); verl's
    `torch.mean` also counts empty rows, which only differs when a row has no token. `agg` is ignored (verl too).
    The log-ratio is not clamped beyond the clip, as in verl. Metrics: pg_clipfrac (clipped tokens with A > 0),
    pg_clipfrac_lower (with A < 0), ppo_kl, ratio_mean / ratio_max (of s over rows).
    """
    del agg, agg_const, num_tokens
    _check_positive(eps_low, "eps_low")
    _check_positive(eps_high, "eps_high")
    logp, logp_old, adv, mask = _loss_inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT)
    log_ratio = logp - logp_old
    sgn = jnp.sign(adv)
    log_ratio_clip = jnp.clip(log_ratio, -eps_low, eps_high)
    log_ratio_min = sgn * jnp.minimum(sgn * log_ratio, sgn * log_ratio_clip)
    len_N = jnp.sum(mask, axis=-1)
    s_N = jnp.exp(jnp.sum(jnp.where(mask > 0, log_ratio_min * mask, 0.0), axis=-1) / (len_N + 1e-8))
    adv_N = jnp.sum(jnp.where(mask > 0, adv * mask, 0.0), axis=-1) / (len_N + 1e-8)
    nonempty_N = (len_N > 0).astype(s_N.dtype)
    n_seqs = jnp.sum(nonempty_N) if num_seqs is None else jnp.asarray(num_seqs, s_N.dtype)
    loss = jnp.sum(-adv_N * s_N * nonempty_N) / jnp.maximum(n_seqs, 1.0)
    clipped = (log_ratio != log_ratio_clip).astype(jnp.float32)
    metrics = {"pg_clipfrac": masked_mean(clipped * (adv > 0), mask),
               "pg_clipfrac_lower": masked_mean(clipped * (adv < 0), mask),
               "ppo_kl": masked_mean(-log_ratio, mask),
               "ratio_mean": masked_mean(s_N, nonempty_N),
               "ratio_max": jnp.max(jnp.where(nonempty_N > 0, s_N, 0.0))}
    return loss, jax.lax.stop_gradient(metrics)


def _token_covariance(adv, logp, mask):
    """(A − mean_m A)·(logp − mean_m logp) per token, over the valid tokens of this batch (stop-gradient)."""
    adv, logp = jax.lax.stop_gradient((adv, logp))
    return (adv - masked_mean(adv, mask)) * (logp - masked_mean(logp, mask))


def _rank_NxT(score_NxT):
    """Rank of every entry in decreasing `score` (0 = largest; ties keep the row-major order)."""
    flat = score_NxT.reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    return jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32)).reshape(
        score_NxT.shape)


@register_policy_loss("clip_cov", lambda hp: dict(eps_low=hp.eps_low, eps_high=hp.eps_high,
                                                  ratio=hp.clip_cov_ratio, cov_lb=hp.clip_cov_lb,
                                                  cov_ub=hp.clip_cov_ub))
def clip_cov_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low=0.2, eps_high=0.2, ratio=2e-4, cov_lb=1.0,
                  cov_ub=5.0, rng=None, agg="token-mean", agg_const=None, token_weights_NxT=None, **agg_kwargs):
    """Clip-Cov (The Entropy Mechanism of RL for Reasoning LMs, arXiv 2505.22617; verl
    `compute_policy_loss_clip_cov`): PPO clip, plus the gradient of a few high-covariance tokens cut.

      cov_t = (A − mean A)·(logp − mean logp) over this batch's valid tokens, −inf where PPO already clips;
      eligible = cov_lb < cov_t < cov_ub;  pick max(⌊ratio·#valid⌋, 1) eligible tokens uniformly at random;
      L = max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high)) · (0 on the picked tokens, 1 elsewhere)
    The random pick is a function of `rng` (a PRNG key; the step passes one per micro-batch), so a run is
    reproducible; verl draws from torch's global generator. Statistics are per micro-batch, as in verl.
    Metrics: pg_clipfrac (fraction of tokens cut), ppo_kl, ratio_mean, ratio_max.
    """
    _check_positive(ratio, "clip_cov_ratio")
    if rng is None:
        raise ValueError("clip_cov_loss needs a PRNG key `rng` to pick the tokens it cuts.")
    logp, _, adv, mask, log_ratio, r = _inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, agg)
    l1 = -adv * r
    l2 = -adv * jnp.clip(r, 1.0 - eps_low, 1.0 + eps_high)
    clip_by_origin = (l2 > l1) & (mask > 0)
    cov = _token_covariance(adv, logp, mask)
    eligible = (mask > 0) & ~clip_by_origin & (cov > cov_lb) & (cov < cov_ub)
    num_cut = jnp.maximum(jnp.floor(ratio * jnp.sum(mask)), 1.0)
    u = jax.random.uniform(rng, mask.shape)
    cut = eligible & (_rank_NxT(jnp.where(eligible, u, -1.0)) < num_cut)
    per_token = jnp.maximum(l1, l2) * jnp.where(cut, 0.0, 1.0)
    loss = aggregate(weighted(per_token, token_weights_NxT), mask, agg, agg_const, **agg_kwargs)
    metrics = {"pg_clipfrac": masked_mean(cut.astype(jnp.float32), mask), **_ratio_metrics(log_ratio, r, mask)}
    return loss, jax.lax.stop_gradient(metrics)


@register_policy_loss("kl_cov", lambda hp: dict(ratio=hp.kl_cov_ratio, kl_coef=hp.kl_cov_coef))
def kl_cov_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, ratio=2e-4, kl_coef=1.0, agg="token-mean",
                agg_const=None, token_weights_NxT=None, **agg_kwargs):
    """KL-Cov (arXiv 2505.22617; verl `compute_policy_loss_kl_cov`): unclipped policy gradient, plus a |log r|
    penalty on the highest-covariance tokens.

      cov_t as in Clip-Cov over the valid tokens;  top = the max(⌊ratio·#valid⌋, 1) largest cov_t (deterministic);
      L = −A·r + kl_coef·|log r| on `top`,  −A·r elsewhere
    Metrics: kl_cov_frac (fraction of tokens penalized), ppo_kl_abs (verl's `ppo_kl` for this loss: mean |log r|),
    ppo_kl, ratio_mean, ratio_max.
    """
    _check_positive(ratio, "kl_cov_ratio")
    logp, _, adv, mask, log_ratio, r = _inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, agg)
    cov = _token_covariance(adv, logp, mask)
    num_top = jnp.maximum(jnp.floor(ratio * jnp.sum(mask)), 1.0)
    top = (mask > 0) & (_rank_NxT(jnp.where(mask > 0, cov, -jnp.inf)) < num_top)
    per_token = -adv * r + jnp.where(top, kl_coef * jnp.abs(log_ratio), 0.0)
    loss = aggregate(weighted(per_token, token_weights_NxT), mask, agg, agg_const, **agg_kwargs)
    metrics = {"kl_cov_frac": masked_mean(top.astype(jnp.float32), mask),
               "ppo_kl_abs": masked_mean(jnp.abs(log_ratio), mask), **_ratio_metrics(log_ratio, r, mask)}
    return loss, jax.lax.stop_gradient(metrics)


@register_policy_loss("gpg", lambda hp: {})
def gpg_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, agg="token-mean", agg_const=None, token_weights_NxT=None,
             **agg_kwargs):
    """GPG group policy gradient (arXiv 2504.02546; verl `compute_policy_loss_gpg`): L = −A·logp, no ratio and
    no clip (one update per batch keeps it on-policy). Metrics: ppo_kl, ratio_mean, ratio_max (diagnostic)."""
    logp, _, adv, mask, log_ratio, r = _inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, agg)
    loss = aggregate(weighted(-adv * logp, token_weights_NxT), mask, agg, agg_const, **agg_kwargs)
    return loss, jax.lax.stop_gradient(_ratio_metrics(log_ratio, r, mask))


def _dppo(valid_fn, logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low, eps_high, truncation, agg, agg_const,
          agg_kwargs):
    """Shared DPPO body: L = −A · sg(min(r, C)) · logp · sg(valid), valid from the divergence test `valid_fn`."""
    _check_positive(eps_low, "eps_low")
    _check_positive(eps_high, "eps_high")
    logp, logp_old, adv, mask, log_ratio, r = _inputs(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, agg)
    cap = DPPO_TRUNCATION_DEFAULT if truncation is None else truncation
    weight = jax.lax.stop_gradient(jnp.minimum(r, cap))
    prob, old_prob = jax.lax.stop_gradient((jnp.exp(logp), jnp.exp(logp_old)))
    valid = jax.lax.stop_gradient(valid_fn(prob, old_prob, logp, logp_old, adv, eps_low, eps_high))
    valid = valid.astype(jnp.float32)
    loss = aggregate(-adv * weight * logp * valid, mask, agg, agg_const, **agg_kwargs)
    metrics = {"pg_clipfrac": masked_mean(1.0 - valid, mask),
               "pg_clipfrac_lower": masked_mean((r > cap).astype(jnp.float32) * valid, mask),
               **_ratio_metrics(log_ratio, r, mask)}
    return loss, jax.lax.stop_gradient(metrics)


def _dppo_hparams(hp):
    return dict(eps_low=hp.eps_low, eps_high=hp.eps_high, truncation=hp.dual_clip_c)


def _tv_valid(prob, old_prob, logp, logp_old, adv, eps_low, eps_high):
    return jnp.where(adv > 0, prob - old_prob <= eps_high, prob - old_prob >= -eps_low)


def _binary_kl_valid(prob, old_prob, logp, logp_old, adv, eps_low, eps_high):
    logp, logp_old = jax.lax.stop_gradient((logp, logp_old))
    kl = old_prob * (logp_old - logp) + (1.0 - old_prob) * jnp.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
    return jnp.where(adv > 0, (kl <= eps_high) | (prob <= old_prob), (kl <= eps_low) | (prob >= old_prob))


@register_policy_loss("dppo_tv", _dppo_hparams)
def dppo_tv_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low=0.15, eps_high=0.15, truncation=None,
                 agg="token-mean", agg_const=None, **agg_kwargs):
    """DPPO-Binary-TV (Rethinking the Trust Region in LLM RL, arXiv 2602.04879; verl
    `compute_policy_loss_dppo_tv`): mask tokens whose probability moved too far, not whose ratio did.

      valid = (p − p_old ≤ ε_high) if A > 0 else (p − p_old ≥ −ε_low)      (p = exp(logp): a TV bound)
      L = −A · sg(min(r, C)) · logp · valid        (C = `truncation`, the dual-clip constant; None -> 20)
    ε here is a probability difference (verl's recipe: 0.15), not a ratio range. Metrics: pg_clipfrac (masked
    tokens), pg_clipfrac_lower (truncated weights among the valid tokens), ppo_kl, ratio_mean, ratio_max.
    """
    return _dppo(_tv_valid, logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low, eps_high, truncation, agg,
                 agg_const, agg_kwargs)


@register_policy_loss("dppo_kl", _dppo_hparams)
def dppo_kl_loss(logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low=0.05, eps_high=0.05, truncation=None,
                 agg="token-mean", agg_const=None, **agg_kwargs):
    """DPPO-Binary-KL (arXiv 2602.04879; verl `compute_policy_loss_dppo_kl`): as DPPO-TV with the KL between the
    Bernoulli(p_old) and Bernoulli(p) distributions of "this token or not":

      kl = p_old·(logp_old − logp) + (1 − p_old)·log((1 − p_old + 1e-8) / (1 − p + 1e-8))
      valid = (kl ≤ ε_high or p ≤ p_old) if A > 0 else (kl ≤ ε_low or p ≥ p_old)     (verl's recipe: ε = 0.05)
    """
    return _dppo(_binary_kl_valid, logp_NxT, logp_old_NxT, adv_NxT, mask_NxT, eps_low, eps_high, truncation, agg,
                 agg_const, agg_kwargs)
