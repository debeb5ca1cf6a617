"""Importance weights that correct the sampler / trainer log-prob mismatch, and the metrics of that mismatch.

The sampler (KV cache, its own dtype and kernels) and the trainer's recomputation of the old log-probs (full
forward, chunked LM head) score the same tokens with slightly different numbers. With
`log r = logp_train - logp_sampler` per response token (verl's `old_log_prob - rollout_log_prob`):

  token level     w_t = exp(clamp(log r_t, -20, 20))
  sequence level  w_t = exp(clamp(sum_t' m_t' log r_t', -20, 20)) for every token of the row

  truncated (TIS) w <- min(w, cap)
  masked (MIS)    w <- w * 1[lower <= w <= cap]   (lower = 1 / cap unless given; 0 turns the lower bound off)

The weights are constants (stop-gradient) and 0 on padding; the policy loss multiplies its per-token loss by them
before aggregation (verl's `rollout_is_weights`). The clamp at +-20 is verl's guard against overflow.

Pure jnp, imports nothing of ours.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SAFETY_BOUND = 20.0  # verl's clamp on a log importance ratio before exp
KINDS = ("none", "token_tis", "seq_tis", "token_mis", "seq_mis")


def check_kind(kind: str, cap) -> None:
    """ValueError (one sentence) for an unknown correction kind or a cap that is not a positive number."""
    if kind not in KINDS:
        raise ValueError(f"unknown importance correction {kind!r}; use one of {KINDS}.")
    if kind != "none" and not (isinstance(cap, (int, float)) and cap > 0):
        raise ValueError(f"the importance-weight cap must be a positive number, got {cap!r}.")


def _masked_mean(x, mask, axis=None):
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def log_ratio(logp_train_NxR, logp_sampler_NxR, mask_NxR, level: str):
    """log(pi_train / pi_sampler) per token (`level` "token") or summed over each row and broadcast to its tokens
    ("seq"), clamped to +-20; 0 on padding. float32 `[N, R]`."""
    mask = jnp.asarray(mask_NxR, jnp.float32)
    lr = jnp.where(mask > 0, jnp.asarray(logp_train_NxR, jnp.float32) - jnp.asarray(logp_sampler_NxR, jnp.float32),
                   0.0)
    if level == "seq":
        lr = jnp.broadcast_to(jnp.sum(lr * mask, axis=-1, keepdims=True), lr.shape)
    elif level != "token":
        raise ValueError(f"importance level must be 'token' or 'seq', got {level!r}.")
    return jnp.clip(lr, -SAFETY_BOUND, SAFETY_BOUND) * mask


def truncated_weights(logp_train_NxR, logp_sampler_NxR, mask_NxR, cap: float, level: str = "token"):
    """Truncated importance sampling (TIS): `min(w, cap)` per token or per row; stop-gradient, 0 on padding."""
    mask = jnp.asarray(mask_NxR, jnp.float32)
    w = jnp.exp(log_ratio(logp_train_NxR, logp_sampler_NxR, mask, level))
    return jax.lax.stop_gradient(jnp.minimum(w, cap) * mask)


def masked_weights(logp_train_NxR, logp_sampler_NxR, mask_NxR, cap: float, level: str = "token",
                   lower: float | None = None):
    """Masked importance sampling (MIS): `w` where `lower <= w <= cap`, else 0 (the token, or with `level` "seq"
    the whole row, leaves the loss); `lower` None is verl's default 1 / cap, 0 keeps every low weight.
    Stop-gradient, 0 on padding."""
    mask = jnp.asarray(mask_NxR, jnp.float32)
    w = jnp.exp(log_ratio(logp_train_NxR, logp_sampler_NxR, mask, level))
    lo = 1.0 / cap if lower is None else lower
    keep = (w >= lo) & (w <= cap)
    return jax.lax.stop_gradient(jnp.where(keep, w, 0.0) * mask)


def importance_weights(kind: str, logp_train_NxR, logp_sampler_NxR, mask_NxR, cap: float,
                       lower: float | None = None):
    """The weights of `kind` (one of `KINDS` but "none"): token_tis, seq_tis, token_mis, seq_mis."""
    check_kind(kind, cap)
    if kind == "none":
        raise ValueError("importance correction 'none' has no weights.")
    level, mode = kind.split("_")
    if mode == "tis":
        return truncated_weights(logp_train_NxR, logp_sampler_NxR, mask_NxR, cap, level)
    return masked_weights(logp_train_NxR, logp_sampler_NxR, mask_NxR, cap, level, lower)


def mismatch_metrics(logp_train_NxR, logp_sampler_NxR, mask_NxR, cap: float | None = None) -> dict:
    """How far the sampler's log-probs are from the trainer's on the real tokens (scalars, float32).

      kl_k1       mean of logp_sampler - logp_train         (verl `mismatch_kl`: KL(sampler || trainer), k1)
      kl_k3       mean of r - log r - 1, r = exp(log r)     (verl `mismatch_k3_kl`)
      max_abs     max |logp_train - logp_sampler|           (0 exactly when the two agree bit for bit)
      max_ratio   max token ratio exp(log r) (clamped at exp(20)); min_ratio likewise (0 with no real token)
      seq_max_ratio  max over rows of exp(sum of log r)
      frac_over_cap  fraction of tokens with ratio > cap, seq_frac_over_cap fraction of rows (with `cap`)
    Means are over real tokens (0 when there are none).
    """
    mask = jnp.asarray(mask_NxR, jnp.float32)
    valid = mask > 0
    lr_raw = jnp.where(valid, jnp.asarray(logp_train_NxR, jnp.float32) - jnp.asarray(logp_sampler_NxR, jnp.float32),
                       0.0)
    lr = jnp.clip(lr_raw, -SAFETY_BOUND, SAFETY_BOUND)
    ratio = jnp.exp(lr)
    rows = jnp.any(valid, axis=-1)
    seq_lr = jnp.clip(jnp.sum(lr_raw, axis=-1), -SAFETY_BOUND, SAFETY_BOUND)
    out = {
        "kl_k1": _masked_mean(-lr_raw, mask),
        "kl_k3": _masked_mean(ratio - lr - 1.0, mask),
        "max_abs": jnp.max(jnp.where(valid, jnp.abs(lr_raw), 0.0)),
        "max_ratio": jnp.max(jnp.where(valid, ratio, 0.0)),
        "min_ratio": jnp.where(jnp.any(valid), jnp.min(jnp.where(valid, ratio, jnp.inf)), 0.0),
        "seq_max_ratio": jnp.max(jnp.where(rows, jnp.exp(seq_lr), 0.0)),
    }
    if cap is not None:
        out["frac_over_cap"] = _masked_mean((ratio > cap).astype(jnp.float32), mask)
        out["seq_frac_over_cap"] = jnp.sum((rows & (jnp.exp(seq_lr) > cap)).astype(jnp.float32)) / jnp.maximum(
            jnp.sum(rows.astype(jnp.float32)), 1.0)
    return jax.lax.stop_gradient(out)
