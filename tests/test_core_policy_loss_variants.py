"""Golden tests for jaxrl_reason/core/policy_loss_variants.py and the policy-loss registry.

Each loss is checked against a hand-computed case and against a numpy transcription of verl's torch function of
the same name (verl/trainer/ppo/core_algos.py: compute_policy_loss_cispo, _sapo, _geo_mean, _clip_cov, _kl_cov,
_gpg, _dppo_tv, _dppo_kl), written here independently of the jnp code.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_reason import algorithms
from jaxrl_reason.core import policy_loss as pl
from jaxrl_reason.core import policy_loss_variants as pv

TOL = dict(rtol=2e-5, atol=2e-6)


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _batch(seed, N=4, T=6, spread=0.6, adv_scale=1.0):
  rng = np.random.default_rng(seed)
  logp_old = np.log(rng.uniform(0.05, 0.95, size=(N, T)))
  logp = np.minimum(logp_old + spread * rng.standard_normal((N, T)), -1e-3)
  A = adv_scale * rng.standard_normal((N, 1)) * np.ones((1, T))
  A[0] = -np.abs(A[0])
  A[1] = np.abs(A[1])
  m = _mask(rng.integers(2, T + 1, size=N), T)
  return [x.astype(np.float32) for x in (logp, logp_old, A, m)]


# ---------------------------------------------------------------- numpy transcriptions of verl

def np_masked_mean(x, m):
  return (x * m).sum() / m.sum()


def np_agg_loss(L, m, mode):
  """verl agg_loss without global batch info (one micro-batch = the whole batch)."""
  if mode == "token-mean":
    return (L * m).sum() / m.sum()
  if mode == "token-sum":
    return (L * m).sum()
  seq_count = m.sum(-1)
  seq_losses = (L * m).sum(-1) / (seq_count + 1e-8)
  seq_mask = (seq_count > 0).astype(np.float64)
  return (seq_losses * seq_mask).sum() / seq_mask.sum()


def verl_cispo(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, mode):
  ratio = np.exp(np.clip(log_prob - old_log_prob, -20.0, 20.0))
  clipped_ratio = np.clip(ratio, 1 - clip_low, 1 + clip_high)
  pg_losses = -clipped_ratio * advantages * log_prob
  return np_agg_loss(pg_losses, response_mask, mode), np_masked_mean((ratio != clipped_ratio), response_mask)


def verl_sapo(old_log_prob, log_prob, advantages, response_mask, tau_pos, tau_neg):
  ratio = np.exp(np.clip(log_prob - old_log_prob, -20.0, 20.0))
  taus = np.where(advantages > 0, tau_pos, tau_neg)
  gates = 1.0 / (1.0 + np.exp(-taus * (ratio - 1.0))) * (4.0 / taus)
  return np_agg_loss(-gates * advantages, response_mask, "seq-mean-token-mean")


def verl_geo_mean(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high):
  negative_approx_kl = log_prob - old_log_prob
  sgn_advantage = np.sign(advantages)
  negative_approx_kl_clamp = np.clip(negative_approx_kl, -cliprange_low, cliprange_high)
  negative_approx_kl_min = np.minimum(sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp)
  negative_approx_kl_min = sgn_advantage * negative_approx_kl_min
  response_mask_sum = response_mask.sum(-1)
  ratio = np.exp((negative_approx_kl_min * response_mask).sum(-1) / (response_mask_sum + 1e-8))
  advantage = (advantages * response_mask).sum(-1) / (response_mask_sum + 1e-8)
  clipped = negative_approx_kl != negative_approx_kl_clamp
  return (np.mean(-advantage * ratio), np_masked_mean(clipped * (advantages > 0), response_mask),
          np_masked_mean(clipped * (advantages < 0), response_mask))


def verl_clip_cov_all_cut(old_log_prob, log_prob, advantages, response_mask, cl, ch, lb, ub):
  """verl's Clip-Cov when clip_num >= the number of eligible tokens (then the random permutation cuts all)."""
  ratio = np.exp(log_prob - old_log_prob)
  pg_losses1 = -advantages * ratio
  pg_losses2 = -advantages * np.clip(ratio, 1 - cl, 1 + ch)
  clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)
  cov_all = (advantages - np_masked_mean(advantages, response_mask)) * (
      log_prob - np_masked_mean(log_prob, response_mask))
  cov_all[response_mask == 0] = -np.inf
  cov_all[clip_by_origin] = -np.inf
  eligible = (cov_all < ub) & (cov_all > lb) & (response_mask > 0)
  corr = np.where(eligible, 0.0, 1.0)
  return np_agg_loss(np.maximum(pg_losses1, pg_losses2) * corr, response_mask, "token-mean"), eligible


def verl_kl_cov(old_log_prob, log_prob, advantages, response_mask, kl_cov_ratio, ppo_kl_coef):
  negative_approx_kl = log_prob - old_log_prob
  ratio = np.exp(negative_approx_kl)
  pg_losses = -advantages * ratio
  pg_losses_kl = -advantages * ratio + ppo_kl_coef * np.abs(negative_approx_kl)
  valid = response_mask.reshape(-1) > 0
  valid_idx = np.nonzero(valid)[0]
  adv_v, logp_v = advantages.reshape(-1)[valid], log_prob.reshape(-1)[valid]
  cov = (adv_v - adv_v.mean()) * (logp_v - logp_v.mean())
  k = max(1, int(len(cov) * kl_cov_ratio))
  top = valid_idx[np.argsort(-cov)[:k]]
  flat = pg_losses.reshape(-1).copy()
  flat[top] = pg_losses_kl.reshape(-1)[top]
  return np_agg_loss(flat.reshape(pg_losses.shape), response_mask, "token-mean"), len(top)


def verl_gpg(log_prob, advantages, response_mask, mode):
  return np_agg_loss(-log_prob * advantages, response_mask, mode)


def verl_dppo(old_log_prob, log_prob, advantages, response_mask, low, high, clip_ratio_c, kind):
  ratio = np.exp(np.clip(log_prob - old_log_prob, -20.0, 20.0))
  truncated_ratio = np.minimum(ratio, clip_ratio_c)
  prob, old_prob = np.exp(log_prob), np.exp(old_log_prob)
  if kind == "tv":
    valid_positive_mask = (prob - old_prob) <= high
    valid_negative_mask = (prob - old_prob) >= -low
  else:
    binary_kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * np.log(
        (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
    valid_positive_mask = (binary_kl <= high) | (prob <= old_prob)
    valid_negative_mask = (binary_kl <= low) | (prob >= old_prob)
  valid_mask = np.where(advantages > 0, valid_positive_mask, valid_negative_mask).astype(np.float64)
  pg_losses = -advantages * truncated_ratio * log_prob * valid_mask
  return (np_agg_loss(pg_losses, response_mask, "token-mean"), np_masked_mean(1.0 - valid_mask, response_mask),
          valid_mask)


# ---------------------------------------------------------------- one compile for all variants

@jax.jit
def _all_variants(logp, logp_old, A, m):
  return {
      "cispo_tm": pv.cispo_loss(logp, logp_old, A, m, 0.2, 0.28),
      "cispo_sm": pv.cispo_loss(logp, logp_old, A, m, 10.0, 0.2, agg="seq-mean-token-mean"),
      "sapo": pv.sapo_loss(logp, logp_old, A, m, 1.0, 1.05),
      "gmpo": pv.gmpo_loss(logp, logp_old, A, m, 0.4, 0.3),
      "kl_cov": pv.kl_cov_loss(logp, logp_old, A, m, ratio=0.2, kl_coef=0.7),
      "gpg_tm": pv.gpg_loss(logp, logp_old, A, m),
      "gpg_ts": pv.gpg_loss(logp, logp_old, A, m, agg="token-sum"),
      "dppo_tv": pv.dppo_tv_loss(logp, logp_old, A, m, 0.1, 0.15, truncation=1.5),
      "dppo_kl": pv.dppo_kl_loss(logp, logp_old, A, m, 0.02, 0.05, truncation=1.5),
  }


def test_variants_match_verl_transcriptions():
  logp, logp_old, A, m = _batch(0)
  out = _all_variants(logp, logp_old, A, m)
  f64 = [x.astype(np.float64) for x in (logp_old, logp, A, m)]
  loss, frac = verl_cispo(*f64, 0.2, 0.28, "token-mean")
  np.testing.assert_allclose(out["cispo_tm"][0], loss, **TOL)
  np.testing.assert_allclose(out["cispo_tm"][1]["pg_clipfrac"], frac, **TOL)
  assert 0 < frac < 1  # the case clips some tokens and not others
  np.testing.assert_allclose(out["cispo_sm"][0], verl_cispo(*f64, 10.0, 0.2, "seq-mean-token-mean")[0], **TOL)
  np.testing.assert_allclose(out["sapo"][0], verl_sapo(*f64, 1.0, 1.05), **TOL)
  gm, gm_hi, gm_lo = verl_geo_mean(*f64, 0.4, 0.3)
  np.testing.assert_allclose(out["gmpo"][0], gm, **TOL)
  np.testing.assert_allclose(out["gmpo"][1]["pg_clipfrac"], gm_hi, **TOL)
  np.testing.assert_allclose(out["gmpo"][1]["pg_clipfrac_lower"], gm_lo, **TOL)
  kc, n_top = verl_kl_cov(*f64, 0.2, 0.7)
  np.testing.assert_allclose(out["kl_cov"][0], kc, **TOL)
  np.testing.assert_allclose(out["kl_cov"][1]["kl_cov_frac"], n_top / m.sum(), **TOL)
  np.testing.assert_allclose(out["gpg_tm"][0], verl_gpg(f64[1], f64[2], f64[3], "token-mean"), **TOL)
  np.testing.assert_allclose(out["gpg_ts"][0], verl_gpg(f64[1], f64[2], f64[3], "token-sum"), **TOL)
  for kind, low, high in (("tv", 0.1, 0.15), ("kl", 0.02, 0.05)):
    loss, frac, valid = verl_dppo(*f64, low, high, 1.5, kind)
    np.testing.assert_allclose(out[f"dppo_{kind}"][0], loss, **TOL)
    np.testing.assert_allclose(out[f"dppo_{kind}"][1]["pg_clipfrac"], frac, **TOL)
    assert 0 < valid[m > 0].mean() < 1  # the case masks some tokens and not others


def test_variants_hand_computed():
  m = np.ones((1, 2), np.float32)
  lp_old = np.log(np.array([[0.5, 0.5]], np.float32))
  lp = lp_old + np.array([[0.1, 0.5]], np.float32)
  pos, neg = np.ones((1, 2), np.float32), -np.ones((1, 2), np.float32)
  # GMPO: A > 0 clips the 0.5 log-ratio to 0.4 -> s = exp(0.25); A < 0 keeps both -> s = exp(0.3)
  np.testing.assert_allclose(pv.gmpo_loss(lp, lp_old, pos, m, 0.4, 0.4)[0], -np.exp(0.25), rtol=1e-6)
  np.testing.assert_allclose(pv.gmpo_loss(lp, lp_old, neg, m, 0.4, 0.4)[0], np.exp(0.3), rtol=1e-6)
  # CISPO: r = e^0.1 (inside 1.2), e^0.5 -> 1.2;  loss = -mean(w * A * logp)
  w = np.array([np.exp(0.1), 1.2])
  np.testing.assert_allclose(pv.cispo_loss(lp, lp_old, pos, m, 0.2, 0.2)[0], -np.mean(w * lp[0]), rtol=1e-6)
  # SAPO on-policy: gate 2/tau, gradient of the plain policy gradient (-A per token, token-mean over 2 tokens)
  loss, grad = jax.value_and_grad(lambda x: pv.sapo_loss(x, lp_old, pos, m, 1.0, 1.05)[0])(lp_old)
  np.testing.assert_allclose(loss, -2.0, rtol=1e-6)
  np.testing.assert_allclose(grad, [[-0.5, -0.5]], rtol=1e-6)
  # DPPO-TV, A > 0: p = 0.5·e^0.1 = 0.553 (moved 0.053 <= 0.15, kept), 0.5·e^0.5 = 0.824 (moved 0.32, masked)
  loss, met = pv.dppo_tv_loss(lp, lp_old, pos, m, 0.15, 0.15)
  np.testing.assert_allclose(loss, -np.exp(0.1) * lp[0, 0] / 2, rtol=1e-6)
  np.testing.assert_allclose(met["pg_clipfrac"], 0.5)
  # GPG: -A·logp
  np.testing.assert_allclose(pv.gpg_loss(lp, lp_old, pos, m)[0], -lp.mean(), rtol=1e-6)


def test_stop_gradients_follow_verl():
  """CISPO and DPPO differentiate only the logp factor; GMPO's gradient is that of −Ā·s."""
  logp, logp_old, A, m = _batch(1)
  r = np.exp(logp - logp_old)
  g = jax.grad(lambda x: pv.cispo_loss(x, logp_old, A, m, 0.2, 0.28)[0])(logp)
  np.testing.assert_allclose(g, -np.clip(r, 0.8, 1.28) * A * m / m.sum(), **TOL)
  g = jax.grad(lambda x: pv.dppo_tv_loss(x, logp_old, A, m, 0.1, 0.15, truncation=1.5)[0])(logp)
  valid = verl_dppo(logp_old, logp, A, m, 0.1, 0.15, 1.5, "tv")[2]
  np.testing.assert_allclose(g, -A * np.minimum(r, 1.5) * valid * m / m.sum(), **TOL)
  lp = np.zeros((1, 3), np.float32)
  g = jax.grad(lambda x: pv.gmpo_loss(x, lp, np.ones((1, 3), np.float32), np.ones((1, 3), np.float32))[0])(lp)
  np.testing.assert_allclose(g, [[-1 / 3] * 3], rtol=1e-6)  # d(-exp(mean l))/dl_t at l = 0


def _cov_batch():
  rng = np.random.default_rng(3)
  N, T = 6, 8
  logp = np.log(rng.uniform(0.02, 0.98, size=(N, T))).astype(np.float32)
  logp_old = (logp - 0.05 * rng.standard_normal((N, T))).astype(np.float32)  # mostly inside the clip
  A = np.repeat(rng.choice([-3.0, 3.0], size=(N, 1)), T, 1).astype(np.float32)
  m = _mask([8, 7, 6, 8, 5, 8], T)
  return logp, logp_old, A, m


def test_clip_cov_matches_verl_when_every_eligible_token_is_cut():
  logp, logp_old, A, m = _cov_batch()
  loss, met = jax.jit(lambda *a: pv.clip_cov_loss(*a, 0.2, 0.2, ratio=1.0, cov_lb=1.0, cov_ub=5.0,
                                                  rng=jax.random.PRNGKey(0)))(logp, logp_old, A, m)
  ref, eligible = verl_clip_cov_all_cut(*(x.astype(np.float64) for x in (logp_old, logp, A, m)), 0.2, 0.2, 1.0, 5.0)
  assert 3 <= eligible.sum() < m.sum()  # the case has something to cut and something to keep
  np.testing.assert_allclose(loss, ref, **TOL)
  np.testing.assert_allclose(met["pg_clipfrac"], eligible.sum() / m.sum(), **TOL)


def test_clip_cov_random_pick_is_a_function_of_the_key():
  logp, logp_old, A, m = _cov_batch()
  eligible = verl_clip_cov_all_cut(*(x.astype(np.float64) for x in (logp_old, logp, A, m)), 0.2, 0.2, 1.0, 5.0)[1]
  ratio = 2.5 / m.sum()  # floor(ratio * #valid) = 2 tokens cut among the eligible ones
  f = jax.jit(lambda key: jax.grad(lambda x: pv.clip_cov_loss(x, logp_old, A, m, 0.2, 0.2, ratio, 1.0, 5.0,
                                                               rng=key)[0])(logp))
  full = jax.grad(lambda x: pv.clip_cov_loss(x, logp_old, A, m, 0.2, 0.2, ratio, 1e6, 2e6,
                                             rng=jax.random.PRNGKey(0))[0])(logp)  # band empty: nothing cut
  picks = []
  for seed in range(4):
    g = np.asarray(f(jax.random.PRNGKey(seed)))
    cut = (g == 0) & (np.asarray(full) != 0)
    assert cut.sum() == 2 and np.all(eligible[cut])
    np.testing.assert_array_equal(g, f(jax.random.PRNGKey(seed)))  # same key, same pick
    picks.append(tuple(np.flatnonzero(cut)))
  assert len(set(picks)) > 1  # different keys pick different tokens
  with pytest.raises(ValueError, match="PRNG key"):
    pv.clip_cov_loss(logp, logp_old, A, m)


def test_variant_errors():
  logp, logp_old, A, m = _batch(2)
  with pytest.raises(ValueError, match="sapo_tau_pos"):
    pv.sapo_loss(logp, logp_old, A, m, tau_pos=0.0)
  with pytest.raises(ValueError, match="kl_cov_ratio"):
    pv.kl_cov_loss(logp, logp_old, A, m, ratio=0.0)
  with pytest.raises(ValueError, match="Unknown loss aggregation"):
    pv.cispo_loss(logp, logp_old, A, m, agg="token-median")


# ---------------------------------------------------------------- the registry

HP = types.SimpleNamespace(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                           clip_cov_ratio=0.1, clip_cov_lb=0.0, clip_cov_ub=5.0, kl_cov_ratio=0.1, kl_cov_coef=1.0)


def test_registry_entries_share_one_signature():
  logp, logp_old, A, m = _batch(4)
  agg = dict(agg="token-mean", agg_const=None, num_tokens=m.sum(), num_seqs=float(len(m)))

  @jax.jit
  def run(logp, key):
    return {name: jax.value_and_grad(lambda x: entry(x, logp_old, A, m, HP, agg, rng=key)[0])(logp)
            for name, entry in pl.POLICY_LOSSES.items()}

  out = run(logp, jax.random.PRNGKey(0))
  assert set(out) == set(algorithms.LOSS_MODES) >= {"ppo", "gspo", "cispo", "sapo", "gmpo", "clip_cov", "kl_cov",
                                                    "gpg", "dppo_tv", "dppo_kl"}
  for name, (loss, grad) in out.items():
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad)), name
  same = dict(rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out["ppo"][0], pl.ppo_clip_loss(logp, logp_old, A, m, 0.2, 0.28, 3.0, **agg)[0], **same)
  np.testing.assert_allclose(out["cispo"][0], pv.cispo_loss(logp, logp_old, A, m, 0.2, 0.28, **agg)[0], **same)
  np.testing.assert_allclose(out["dppo_tv"][0], pv.dppo_tv_loss(logp, logp_old, A, m, 0.2, 0.28, 3.0, **agg)[0],
                             **same)
  # per-token overrides (HAPO's clip ranges) replace the hp-derived keywords
  wide = pl.POLICY_LOSSES["ppo"](logp, logp_old, A, m, HP, agg, eps_low=jnp.full(m.shape, 0.9),
                                 eps_high=jnp.full(m.shape, 0.9))[0]
  np.testing.assert_allclose(wide, pl.ppo_clip_loss(logp, logp_old, A, m, 0.9, 0.9, 3.0, **agg)[0], rtol=1e-6)


def test_register_a_new_policy_loss():
  @pl.register_policy_loss("test_reinforce", lambda hp: dict(scale=hp.eps_low))
  def reinforce_loss(logp, logp_old, adv, mask, scale=1.0, agg="token-mean", agg_const=None, **agg_kwargs):
    from jaxrl_reason.core.aggregate import aggregate
    return aggregate(-scale * adv * logp, mask, agg, agg_const, **agg_kwargs), {}

  try:
    logp, logp_old, A, m = _batch(5)
    loss, _ = pl.POLICY_LOSSES["test_reinforce"](logp, logp_old, A, m, HP, dict(agg="token-sum"))
    np.testing.assert_allclose(loss, -(0.2 * A * logp * m).sum(), rtol=1e-5)
    assert reinforce_loss is pl.POLICY_LOSSES["test_reinforce"].loss_fn  # the function itself stays plain
  finally:
    del pl.POLICY_LOSSES["test_reinforce"]


def test_micro_batch_losses_sum_to_the_mini_batch_loss():
  """With the mini-batch's global counts, the losses without batch statistics split over micro-batches exactly."""
  logp, logp_old, A, m = _batch(6, N=8)
  names = ("ppo", "gspo", "cispo", "sapo", "gmpo", "gpg", "dppo_tv", "dppo_kl")
  counts = dict(num_tokens=m.sum(), num_seqs=float((m.sum(-1) > 0).sum()))

  @jax.jit
  def run(logp, logp_old, A, m):
    return {(name, mode): pl.POLICY_LOSSES[name](logp, logp_old, A, m, HP, dict(agg=mode, agg_const=None, **counts))[0]
            for name in names for mode in ("token-mean", "seq-mean-token-mean", "token-sum")}

  full = run(logp, logp_old, A, m)
  halves = [run(logp[k:k + 4], logp_old[k:k + 4], A[k:k + 4], m[k:k + 4]) for k in (0, 4)]
  for key, value in full.items():
    np.testing.assert_allclose(halves[0][key] + halves[1][key], value, rtol=1e-5, atol=1e-6, err_msg=str(key))
