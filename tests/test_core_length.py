"""Golden tests for jaxrl_reason/core/length.py."""
import functools

import jax
import numpy as np
import pytest

from jaxrl_reason.core import length

TOL = dict(rtol=1e-6, atol=1e-6)


def J(f, **static):
  return jax.jit(functools.partial(f, **static))


def test_dapo_overlong_penalty():
  lens = np.array([10, 16, 18, 20, 19], np.int32)
  np.testing.assert_allclose(J(length.dapo_overlong_penalty, max_len=20, buffer=4)(lens),
                             [0, 0, -0.5, -1.0, -0.75], **TOL)
  rng = np.random.default_rng(0)
  lens = rng.integers(0, 513, size=16)
  expect = [min(-(n - (512 - 100)) / 100 * 0.5, 0.0) for n in lens]
  np.testing.assert_allclose(J(length.dapo_overlong_penalty, max_len=512, buffer=100, factor=0.5)(lens),
                             expect, **TOL)
  for bad in (0, 21):
    with pytest.raises(ValueError):
      length.dapo_overlong_penalty(lens, max_len=20, buffer=bad)


def test_dler_truncation_reward():
  score = np.array([1., 1., 0., 1.], np.float32)
  trunc = np.array([False, True, True, False])
  np.testing.assert_allclose(J(length.dler_truncation_reward)(score, trunc), [1, 0, 0, 1], **TOL)
  np.testing.assert_allclose(J(length.dler_truncation_reward, stop_penalty_coef=0.1)(score, trunc),
                             [1, .1, 0, 1], **TOL)


def ref_budget(score, G, thresholds, budgets, upper):
  out = []
  for g0 in range(0, len(score), G):
    c = sum(1 for s in score[g0:g0 + G] if s > 0) / G
    tier = sum(1 for d in thresholds if (c >= d if upper else c > d))
    out += [budgets[tier]] * G
  return np.array(out)


def test_da_dler_budget_hand_and_boundary():
  score = np.array([1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, -1, 1, 1, -1], np.float32)  # c = .5, .25, 1, .5
  f = jax.jit(lambda s: [length.da_dler_budget(s, 4, (0.5,), (4000, 2000), upper) for upper in (True, False)])
  up, lo = f(score)
  np.testing.assert_array_equal(up, np.repeat([2000, 4000, 2000, 2000], 4))
  np.testing.assert_array_equal(lo, np.repeat([4000, 4000, 2000, 4000], 4))


@pytest.mark.parametrize("G,thresholds", [(4, (0.25, 0.5, 0.75)), (10, (0.3, 0.7))])
def test_da_dler_budget_matches_reference(G, thresholds):
  rng = np.random.default_rng(G)
  score = rng.integers(0, 2, size=6 * G).astype(np.float32)
  score[:3] = 1.0
  score[3:G] = 0.0  # first group's pass rate sits exactly on a threshold (3/G)
  budgets = tuple(range(1000 * (len(thresholds) + 1), 0, -1000))
  f = jax.jit(lambda s: [length.da_dler_budget(s, G, thresholds, budgets, upper) for upper in (True, False)])
  for out, upper in zip(f(score), (True, False)):
    np.testing.assert_array_equal(out, ref_budget(score, G, thresholds, budgets, upper))


def test_da_dler_truncation_reward_hand():
  score = np.array([1, 1, 1, 0, 0, 0, 1, 0], np.float32)
  lens = np.array([1500, 2500, 3900, 4000, 4000, 4000, 3000, 100], np.int32)
  trunc = np.array([0, 0, 0, 1, 1, 1, 0, 0], bool)
  kw = dict(group_size=4, thresholds=(0.5,), budgets=(4000, 2000))
  rew, aux = J(length.da_dler_truncation_reward, **kw)(score, lens, trunc)
  np.testing.assert_allclose(rew, [1, 0, 0, 0, 0, 0, 1, 0], **TOL)  # c=.75 -> 2000; c=.25 -> 4000
  np.testing.assert_array_equal(aux["budget_N"], [2000] * 4 + [4000] * 4)
  np.testing.assert_array_equal(aux["truncated_N"], [0, 1, 1, 1, 1, 1, 0, 0])
  rew, _ = J(length.da_dler_truncation_reward, stop_penalty_coef=0.1, **kw)(score, lens, trunc)
  np.testing.assert_allclose(rew, [1, .1, .1, 0, 0, 0, 1, 0], **TOL)
  rew, _ = J(length.da_dler_truncation_reward, stop_penalty_coef=0.1, virtual_uses_stop_penalty=False,
             **kw)(score, lens, trunc)
  np.testing.assert_allclose(rew, [1, 0, 0, 0, 0, 0, 1, 0], **TOL)
  # c counted after the tight budget: only one of group 1 is correct within 2000 -> c=.25 -> 4000
  rew, aux = J(length.da_dler_truncation_reward, c_after_budget=True, **kw)(score, lens, trunc)
  np.testing.assert_allclose(rew, [1, 1, 1, 0, 0, 0, 1, 0], **TOL)
  np.testing.assert_array_equal(aux["budget_N"], [4000] * 8)


def test_da_dler_truncation_reward_matches_reference():
  rng = np.random.default_rng(3)
  G, thresholds, budgets = 4, (0.25, 0.75), (3000, 2000, 1000)
  score = rng.integers(0, 2, size=8 * G).astype(np.float32)
  lens = rng.integers(1, 3001, size=8 * G).astype(np.int32)
  trunc = lens == 3000
  trunc[::5] = True
  # each switch is flipped at least once against a common base (coef .1, upper, before, virtual penalized)
  combos = ((0.1, True, False, True), (0.0, False, False, True), (0.1, True, True, True), (0.1, False, True, False))
  for coef, upper, after, virt in combos:
    correct = [s > 0 and (not after or (n <= min(budgets) and not t)) for s, n, t in zip(score, lens, trunc)]
    budget = ref_budget(np.array(correct, np.float32), G, thresholds, budgets, upper)
    expect = []
    for s, n, t, b in zip(score, lens, trunc, budget):
      if t:
        expect.append(s * coef)
      elif n > b:
        expect.append(s * coef if virt else 0.0)
      else:
        expect.append(s)
    rew, _ = J(length.da_dler_truncation_reward, group_size=G, thresholds=thresholds, budgets=budgets,
               stop_penalty_coef=coef, boundary_to_upper_tier=upper, c_after_budget=after,
               virtual_uses_stop_penalty=virt)(score, lens, trunc)
    np.testing.assert_allclose(rew, expect, **TOL)


def test_da_dler_errors():
  s = np.zeros(8, np.float32)
  with pytest.raises(ValueError):
    length.da_dler_budget(s, 4, thresholds=(0.5,), budgets=(4000,))
  with pytest.raises(ValueError):
    length.da_dler_budget(s, 4, thresholds=(0.7, 0.3), budgets=(3, 2, 1))
  with pytest.raises(ValueError):
    length.da_dler_budget(s, 3, thresholds=(0.5,), budgets=(4000, 2000))
