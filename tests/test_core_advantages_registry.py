"""Golden tests for the added estimators in jaxrl_reason/core/advantages.py (GRPO pass@k, GPG, OPO, ReMax) and the
estimator registry, against hand cases and numpy transcriptions of verl's core_algos.py
(compute_grpo_passk_outcome_advantage, compute_gpg_outcome_advantage, compute_opo_outcome_advantage,
compute_remax_outcome_advantage), written independently of the jnp code.
"""
import types

import jax
import numpy as np
import pytest

from jaxrl_reason import algorithms
from jaxrl_reason.core import advantages as adv
from jaxrl_reason.core import hapo
from jaxrl_reason.train import batch as batch_lib
from jaxrl_reason.train import hparams

TOL = dict(rtol=1e-5, atol=1e-6)


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _token_rewards(score, mask):
  """verl's token_level_rewards: the score at the last valid token."""
  out = np.zeros_like(mask, dtype=np.float64)
  for i, row in enumerate(mask):
    if row.any():
      out[i, np.flatnonzero(row)[-1]] = score[i]
  return out


def verl_passk(token_level_rewards, response_mask, index, epsilon=1e-6, norm=True):
  scores = token_level_rewards.sum(-1)
  advantages = np.zeros_like(scores)
  for idx in np.unique(index):
    members = np.flatnonzero(index == idx)
    rewards = scores[members]
    order = np.argsort(-rewards, kind="stable")
    r_max, r_second_max = rewards[order[0]], rewards[order[1]]
    advantage = r_max - r_second_max
    if norm:
      advantage = advantage / (np.std(rewards, ddof=1) + epsilon)
    advantages[members[order[0]]] = advantage
  return advantages[:, None] * response_mask


def verl_gpg(token_level_rewards, response_mask, index, f_norm=1.0):
  scores = token_level_rewards.sum(-1).copy()
  bsz = scores.shape[0]
  alpha = bsz / max(np.count_nonzero(scores), 1)
  means = {idx: (0.0 if (index == idx).sum() == 1 else scores[index == idx].mean()) for idx in np.unique(index)}
  out = np.array([alpha * (scores[i] - means[index[i]]) / f_norm for i in range(bsz)])
  return out[:, None] * response_mask


def verl_opo(token_level_rewards, response_mask, index):
  response_length = response_mask.sum(-1)
  scores = token_level_rewards.sum(-1).copy()
  bsl = {}
  for idx in np.unique(index):
    sel = index == idx
    bsl[idx] = 0.0 if sel.sum() == 1 else (response_length[sel] * scores[sel]).sum() / response_length[sel].sum()
  return np.array([scores[i] - bsl[index[i]] for i in range(len(scores))])[:, None] * response_mask


def verl_remax(token_level_rewards, reward_baselines, response_mask):
  returns = np.flip(np.cumsum(np.flip(token_level_rewards * response_mask, -1), -1), -1)
  return returns - reward_baselines[:, None] * response_mask


def _rows(seed, B=4, G=4, T=6):
  rng = np.random.default_rng(seed)
  r = rng.choice([0.0, 0.0, 1.0, 0.5], size=B * G).astype(np.float32)
  r[:G] = [1.0, 0.0, 0.0, 0.0]  # one clear winner
  r[G:2 * G] = 1.0  # all equal
  m = _mask(rng.integers(1, T + 1, size=B * G), T)
  return r, m, np.repeat(np.arange(B), G)


@jax.jit
def _all(r, m, greedy):
  G = 4
  return {"passk": adv.grpo_passk_advantages(r, G), "passk_raw": adv.grpo_passk_advantages(r, G, norm_by_std=False),
          "gpg": adv.gpg_advantages(r, G), "gpg1": adv.gpg_advantages(r, 1), "opo": adv.opo_advantages(r, m, G),
          "opo1": adv.opo_advantages(r, m, 1), "remax": adv.remax_advantages(r, greedy, m)}


def test_added_estimators_match_verl_transcriptions():
  for seed in range(3):
    r, m, index = _rows(seed)
    greedy = np.random.default_rng(seed + 10).choice([0.0, 1.0], size=r.shape).astype(np.float32)
    out = _all(r, m, greedy)
    tok = _token_rewards(r, m)
    m64 = m.astype(np.float64)
    np.testing.assert_allclose(out["passk"][:, None] * m, verl_passk(tok, m64, index), **TOL)
    np.testing.assert_allclose(out["passk_raw"][:, None] * m, verl_passk(tok, m64, index, norm=False), **TOL)
    np.testing.assert_allclose(out["gpg"][:, None] * m, verl_gpg(tok, m64, index), **TOL)
    np.testing.assert_allclose(out["gpg1"][:, None] * m, verl_gpg(tok, m64, np.arange(len(r))), **TOL)
    np.testing.assert_allclose(out["opo"][:, None] * m, verl_opo(tok, m64, index), **TOL)
    np.testing.assert_allclose(out["opo1"][:, None] * m, verl_opo(tok, m64, np.arange(len(r))), **TOL)
    np.testing.assert_allclose(out["remax"], verl_remax(tok, greedy.astype(np.float64), m64), **TOL)


def test_added_estimators_hand_computed():
  r = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], np.float32)
  m = _mask([2, 4, 1, 3, 1, 1, 1, 1], 4)
  out = _all(r, m, np.array([1, 1, 0, 0, 0, 0, 0, 0], np.float32))
  # pass@k: only the single winner of group 0 gets (1 - 0) / std([1,0,0,0]) = 1 / 0.5; group 1 has a tie: 0
  np.testing.assert_allclose(out["passk"], [1 / (0.5 + 1e-6), 0, 0, 0, 0, 0, 0, 0], rtol=1e-6)
  # GPG: alpha = 8 / 3 non-zero rewards; group means 0.25 and 0.5
  np.testing.assert_allclose(out["gpg"], 8 / 3 * (r - np.repeat([0.25, 0.5], 4)), rtol=1e-6)
  # OPO: baseline of group 0 = (2·1) / (2+4+1+3) = 0.2
  np.testing.assert_allclose(out["opo"][:4], r[:4] - 0.2, rtol=1e-6)
  # ReMax: (R - greedy R) on every valid token
  np.testing.assert_allclose(out["remax"][0], [0, 0, 0, 0])
  np.testing.assert_allclose(out["remax"][1], [-1, -1, -1, -1])
  np.testing.assert_allclose(out["remax"][4], [1, 0, 0, 0])
  with pytest.raises(ValueError, match="at least 2"):
    adv.grpo_passk_advantages(r, 1)
  with pytest.raises(ValueError, match="greedy_reward_N must match"):
    adv.remax_advantages(r, r[:4], m)


def _hp(estimator, kl_in_reward_coef=0.0):
  """The advantage stage's frozen hp: the base config's advantage section, groups of 4, HAPO's fallback."""
  return hparams.freeze(dict(estimator=estimator, group_size=4, eps=1e-6, gamma=1.0, lam=1.0,
                             kl_in_reward_coef=kl_in_reward_coef, hapo=dict(fallback_abs=5.0)))


def test_registry_matches_the_direct_calls():
  """`compute_advantages` (the stage) dispatches through the registry to the same numbers as direct calls."""
  r, m, _ = _rows(7)
  rng = np.random.default_rng(8)
  logp_old = np.log(rng.uniform(0.1, 0.9, size=m.shape)).astype(np.float32)
  logp_ref = np.log(rng.uniform(0.1, 0.9, size=m.shape)).astype(np.float32)
  values = rng.normal(size=m.shape).astype(np.float32)
  greedy = rng.choice([0.0, 1.0], size=r.shape).astype(np.float32)
  assert set(algorithms.ADVANTAGE_ESTIMATORS) == set(adv.ADVANTAGE_ESTIMATORS)
  direct = {
      "grpo": adv.grpo_advantages(r, 4, eps=1e-6)[:, None] * m,
      "dr_grpo": adv.dr_grpo_advantages(r, 4)[:, None] * m,
      "rloo": adv.rloo_advantages(r, 4)[:, None] * m,
      "reinforce_pp_baseline": adv.reinforce_pp_baseline_advantages(r, m, 4),
      "reinforce_pp": adv.reinforce_pp_advantages(
          adv.outcome_to_token_rewards(r, m) - 0.1 * (logp_old - logp_ref) * m, m, 1.0),
      "gae": adv.gae_advantages(adv.outcome_to_token_rewards(r, m) - 0.1 * (logp_old - logp_ref) * m, values, m)[0],
      "hapo": hapo.hapo_token_group_advantages(r, m, 4, 1e-6, 5.0)[0],
      "grpo_passk": adv.grpo_passk_advantages(r, 4)[:, None] * m,
      "gpg": adv.gpg_advantages(r, 4)[:, None] * m,
      "opo": adv.opo_advantages(r, m, 4)[:, None] * m,
      "remax": adv.remax_advantages(r, greedy, m),
  }
  assert set(direct) == set(adv.ADVANTAGE_ESTIMATORS)
  for name, expect in direct.items():
    cfg = _hp(name, kl_in_reward_coef=0.1)
    got, returns, _ = batch_lib.compute_advantages(cfg, r, m, logp_old, logp_ref, values, greedy)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7, err_msg=name)
    assert (returns is not None) == (name == "gae")
  with pytest.raises(ValueError, match="greedy_reward_N"):
    batch_lib.compute_advantages(_hp("remax"), r, m)


def test_register_a_new_estimator():
  @adv.register_advantage("test_raw_reward")
  def _raw(reward_N, mask_NxT, hp, **arrays):
    return reward_N[:, None] * mask_NxT * hp.scale, None, {}

  try:
    r, m, _ = _rows(9)
    got, _, _ = adv.ADVANTAGE_ESTIMATORS["test_raw_reward"](r, m, types.SimpleNamespace(scale=2.0))
    np.testing.assert_allclose(got, 2 * r[:, None] * m)
  finally:
    del adv.ADVANTAGE_ESTIMATORS["test_raw_reward"]
