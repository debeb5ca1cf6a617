"""Golden tests for jaxrl_reason/core/advantages.py and HAPO's advantages in core/hapo.py.

Each estimator is checked against a hand-computed case and an independent numpy reference written with explicit
Python loops over responses and tokens (float64), comparing float32 results to 1e-5.
"""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_reason.core import advantages as adv
from jaxrl_reason.core import hapo

TOL = dict(rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _jit(f, static_items):
  return jax.jit(functools.partial(f, **dict(static_items)))


def J(f, **static):
  """jit with the keyword arguments static, cached: one compile per (config, shape) is cheaper than eager."""
  return _jit(f, tuple(sorted(static.items())))


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# ---------------------------------------------------------------- numpy references (explicit loops)

def ref_grpo(r, G, eps=1e-6, norm=True, singleton="verl"):
  out = np.zeros(len(r))
  for g0 in range(0, len(r), G):
    grp = [float(x) for x in r[g0:g0 + G]]
    if G == 1:
      mean, std = (0.0, 1.0) if singleton == "verl" else (grp[0], 0.0)
    else:
      mean = sum(grp) / G
      std = (sum((x - mean) ** 2 for x in grp) / (G - 1)) ** 0.5
    for j in range(G):
      out[g0 + j] = (grp[j] - mean) / (std + eps) if norm else grp[j] - mean
  return out


def ref_whiten(x, m, shift_mean=True):
  vals = [x[i, t] for i in range(x.shape[0]) for t in range(x.shape[1]) if m[i, t] > 0]
  out = np.zeros(x.shape)
  if len(vals) < 2:
    return out
  mean = sum(vals) / len(vals)
  var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
  for i in range(x.shape[0]):
    for t in range(x.shape[1]):
      if m[i, t] > 0:
        out[i, t] = (x[i, t] - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
  return out


def ref_gae(r, v, m, gamma, lam):
  N, T = r.shape
  adv_ = np.zeros((N, T))
  for i in range(N):
    next_v, last = 0.0, 0.0
    for t in reversed(range(T)):
      delta = r[i, t] + gamma * next_v - v[i, t]
      cand = delta + gamma * lam * last
      if m[i, t] > 0:
        next_v, last = v[i, t], cand
      adv_[i, t] = last
  return adv_, adv_ + v


def ref_hapo(r, m, G, eps=1e-6, fb=5.0, scope="valid"):
  N, T = m.shape
  grpo = ref_grpo(r, G, eps)
  out = np.zeros((N, T))
  for g0 in range(0, N, G):
    toks = [float(r[i]) for i in range(g0, g0 + G) for t in range(T) if m[i, t] > 0]
    mu = sum(toks) / len(toks) if toks else 0.0
    sd = (sum((x - mu) ** 2 for x in toks) / len(toks)) ** 0.5 if toks else 0.0
    normed = {i: (float(r[i]) - mu) / (sd + eps) for i in range(g0, g0 + G)}
    checked = [abs(normed[i]) for i in range(g0, g0 + G) for t in range(T) if m[i, t] > 0]
    if scope == "padded":
      checked += [abs((0.0 - mu) / (sd + eps)) for i in range(g0, g0 + G) for t in range(T) if m[i, t] == 0]
    fallback = any(c >= fb for c in checked)
    for i in range(g0, g0 + G):
      for t in range(T):
        if m[i, t] > 0:
          out[i, t] = grpo[i] if fallback else normed[i]
  return out


# ---------------------------------------------------------------- GRPO / Dr.GRPO / RLOO

def test_grpo_hand_computed():
  # group [1,0,1,1]: mean .75, unbiased std .5 -> (.25/.5, -.75/.5); group [2,4]: mean 3, std sqrt(2)
  f = jax.jit(lambda r4, r2: (adv.grpo_advantages(r4, 4, eps=0.0), adv.grpo_advantages(r2, 2, eps=0.0),
                              adv.dr_grpo_advantages(r4, 4), adv.rloo_advantages(r4, 4)))
  grpo4, grpo2, dr, rloo = f(np.array([1., 0., 1., 1.]), np.array([2., 4.]))
  np.testing.assert_allclose(grpo4, [0.5, -1.5, 0.5, 0.5], **TOL)
  np.testing.assert_allclose(grpo2, [-1 / np.sqrt(2), 1 / np.sqrt(2)], **TOL)
  np.testing.assert_allclose(dr, [.25, -.75, .25, .25], **TOL)
  np.testing.assert_allclose(rloo, [1 / 3, -1, 1 / 3, 1 / 3], **TOL)  # RLOO: R_i - mean of the others


def test_grpo_matches_reference():
  r = np.random.default_rng(0).normal(size=12).astype(np.float32)
  configs = [(4, True), (4, False), (3, True), (1, True), (1, False)]
  outs = jax.jit(lambda r: [adv.grpo_advantages(r, G, norm_by_std=n) for G, n in configs])(r)
  for (G, norm), out in zip(configs, outs):
    np.testing.assert_allclose(out, ref_grpo(r, G, norm=norm), **TOL)


@pytest.mark.parametrize("ddof", [0, 1])
def test_grpo_std_ddof_matches_numpy_std(ddof):
  """std_ddof picks the group std: numpy's np.std(ddof=...) is the reference, binary and continuous rewards."""
  rng = np.random.default_rng(3)
  for G, r in [(4, rng.normal(size=12)), (8, rng.integers(0, 2, size=24).astype(float)), (3, rng.normal(size=9))]:
    grp = r.reshape(-1, G)
    want = ((grp - grp.mean(1, keepdims=True)) / (np.std(grp, axis=1, ddof=ddof, keepdims=True) + 1e-6)).reshape(-1)
    got = J(adv.grpo_advantages, group_size=G, std_ddof=ddof)(r.astype(np.float32))
    np.testing.assert_allclose(got, want, **TOL)
    # the registry entry reads the switch from its hyper-parameters
    hp = types.SimpleNamespace(group_size=G, eps=1e-6, std_ddof=ddof)
    mask = np.ones((len(r), 2), np.float32)
    got_NxT, _, _ = adv.ADVANTAGE_ESTIMATORS["grpo"](r.astype(np.float32), mask, hp)
    np.testing.assert_allclose(got_NxT, np.stack([want, want], 1), **TOL)
  # a group of one: the population std is 0 and the formula gives 0; Bessel's std keeps the singleton switch
  r = np.array([0.3, -2.0])
  np.testing.assert_array_equal(J(adv.grpo_advantages, group_size=1, std_ddof=0)(r), [0.0, 0.0])
  with pytest.raises(ValueError, match="std_ddof"):
    adv.grpo_advantages(np.zeros(4), 2, std_ddof=2)


def test_rloo_matches_reference():
  r = np.random.default_rng(0).normal(size=12).astype(np.float32)
  expect = np.array([r[i] - (r[(i // 4) * 4:(i // 4) * 4 + 4].sum() - r[i]) / 3 for i in range(12)])
  np.testing.assert_allclose(jax.jit(adv.rloo_advantages, static_argnums=1)(r, 4), expect, **TOL)
  np.testing.assert_allclose(J(adv.rloo_advantages, group_size=1)(r), r, **TOL)  # singleton: raw reward (verl)


def test_grpo_edge_cases():
  # all-equal rewards (non-representable 0.7): exactly 0, also with tiny eps
  a = J(adv.grpo_advantages, group_size=4, eps=1e-12)(np.array([0.7] * 4 + [1., 0., 0., 1.]))
  assert np.all(np.asarray(a[:4]) == 0.0) and np.all(np.isfinite(a))
  # singleton group: verl passes raw reward (std 1), TRL gives 0
  r = np.array([0.3, -2.0])
  np.testing.assert_allclose(J(adv.grpo_advantages, group_size=1, singleton="verl")(r),
                             np.array([0.3, -2.0]) / (1 + 1e-6), **TOL)
  np.testing.assert_array_equal(J(adv.grpo_advantages, group_size=1, singleton="trl")(r), [0.0, 0.0])
  with pytest.raises(ValueError):
    adv.grpo_advantages(np.zeros(6), 4)
  with pytest.raises(ValueError):
    adv.grpo_advantages(np.zeros(4), 2, singleton="nope")
  with pytest.raises(ValueError):
    adv.grpo_advantages(np.zeros((2, 2)), 2)


# ---------------------------------------------------------------- whitening, token rewards, RF++

def test_masked_whiten_hand_and_reference():
  x = np.array([[1., 2., 99.], [3., 99., 99.]])
  m = np.array([[1., 1., 0.], [1., 0., 0.]])
  # valid {1,2,3}: mean 2, unbiased var 1
  expect = np.array([[-1., 0., 0.], [1., 0., 0.]]) / np.sqrt(1 + 1e-8)
  np.testing.assert_allclose(J(adv.masked_whiten)(x, m), expect, **TOL)
  np.testing.assert_allclose(J(adv.masked_whiten, shift_mean=False)(x, m), expect + 2 * np.asarray(m), **TOL)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(5, 7)).astype(np.float32) * 3 + 1
  m = _mask([7, 3, 0, 5, 1], 7)
  for shift in (True, False):
    f = jax.jit(functools.partial(adv.masked_whiten, shift_mean=shift))
    np.testing.assert_allclose(f(x, m), ref_whiten(x, m, shift), **TOL)


def test_masked_whiten_guards():
  x = np.array([[5., 1.], [2., 2.]])
  whiten = J(adv.masked_whiten)
  np.testing.assert_array_equal(whiten(x, np.array([[1., 0.], [0., 0.]])), np.zeros((2, 2)))
  np.testing.assert_array_equal(whiten(x, np.zeros((2, 2))), np.zeros((2, 2)))
  const = whiten(np.full((2, 3), 0.7), np.ones((2, 3)))  # zero variance -> exactly 0
  np.testing.assert_array_equal(const, np.zeros((2, 3)))
  nan_pad = whiten(np.array([[1., np.nan], [3., np.inf]]), np.array([[1., 0.], [1., 0.]]))
  assert np.all(np.isfinite(nan_pad))


def test_outcome_to_token_rewards():
  m = np.array([[1., 1., 1., 0.], [1., 0., 0., 0.], [0., 0., 0., 0.], [1., 1., 1., 1.]])
  out = jax.jit(adv.outcome_to_token_rewards)(np.array([2., 3., 4., 5.]), m)
  expect = np.zeros((4, 4))
  expect[0, 2], expect[1, 0], expect[3, 3] = 2., 3., 5.
  np.testing.assert_array_equal(out, expect)


def test_reinforce_pp_matches_reference():
  rng = np.random.default_rng(2)
  r = rng.normal(size=(4, 6)).astype(np.float32)
  m = _mask([6, 4, 2, 5], 6)
  m[0, 2] = 0.0  # a hole inside a response: the running return resets there
  for gamma in (1.0, 0.9):
    ret = np.zeros(r.shape)
    for i in range(4):
      running = 0.0
      for t in reversed(range(6)):
        running = r[i, t] + gamma * running
        ret[i, t] = running
        running = running * m[i, t]
    out = jax.jit(adv.reinforce_pp_advantages, static_argnums=2)(r, m, gamma)
    np.testing.assert_allclose(out, ref_whiten(ret, m), **TOL)


def test_reinforce_pp_hand_computed():
  # one response, rewards [0, 0, 1], gamma .5: returns [.25, .5, 1] -> whitened over 3 tokens
  r = np.array([[0., 0., 1.]])
  out = J(adv.reinforce_pp_advantages, gamma=0.5)(r, np.ones((1, 3)))
  g = np.array([.25, .5, 1.])
  np.testing.assert_allclose(out[0], (g - g.mean()) / np.sqrt(g.var(ddof=1) + 1e-8), **TOL)


def test_reinforce_pp_baseline_matches_reference():
  rng = np.random.default_rng(3)
  r = rng.integers(0, 2, size=8).astype(np.float32)
  r[4:] = 0.7  # an all-equal group
  m = _mask([5, 2, 6, 1, 3, 6, 4, 2], 6)
  a = np.zeros(8)
  for i in range(8):
    g0 = (i // 4) * 4
    a[i] = r[i] - sum(r[g0:g0 + 4]) / 4
  expect = ref_whiten(np.array([[a[i] * m[i, t] for t in range(6)] for i in range(8)]), m)
  out = jax.jit(adv.reinforce_pp_baseline_advantages, static_argnums=2)(r, m, 4)
  np.testing.assert_allclose(out, expect, **TOL)
  # the all-equal group gets -mean/std of the batch (not 0), identical on all its tokens
  vals = np.asarray(out)[4:][m[4:] > 0]
  assert np.allclose(vals, vals[0]) and abs(vals[0]) > 1e-3
  # singleton groups: baseline 0, i.e. whitened raw rewards
  np.testing.assert_allclose(J(adv.reinforce_pp_baseline_advantages, group_size=1)(r, m),
                             ref_whiten(r[:, None] * m, m), **TOL)
  # a batch where every group is all-equal: everything 0
  out = J(adv.reinforce_pp_baseline_advantages, group_size=4)(np.full(8, 0.7), m)
  np.testing.assert_array_equal(out, np.zeros((8, 6)))


# ---------------------------------------------------------------- GAE

def test_gae_hand_computed():
  # T=3, all valid, gamma=lam=1, V=[.5,.5,.5], reward 1 at the end:
  # deltas [0, 0, .5] -> adv [.5, .5, .5], returns [1, 1, 1]
  r = np.array([[0., 0., 1.]])
  v = np.full((1, 3), 0.5)
  gae = J(adv.gae_advantages, gamma=1.0, lam=1.0, whiten=False)
  a, ret = gae(r, v, np.ones((1, 3)))
  np.testing.assert_allclose(a, [[.5, .5, .5]], **TOL)
  np.testing.assert_allclose(ret, [[1., 1., 1.]], **TOL)
  # a masked middle position is skipped: its value is not bootstrapped from
  m = np.array([[1., 0., 1.]])
  v = np.array([[0.2, 9.0, 0.5]])
  a, _ = gae(r, v, m)
  # t=2: delta=.5 -> .5; t=1 skipped; t=0: delta = 0 + .5 - .2 = .3, adv = .3 + .5 = .8
  np.testing.assert_allclose(a, [[.8, 0., .5]], **TOL)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95)])
def test_gae_matches_reference(gamma, lam):
  rng = np.random.default_rng(4)
  r = rng.normal(size=(4, 7)).astype(np.float32)
  v = rng.normal(size=(4, 7)).astype(np.float32)
  m = _mask([7, 5, 0, 3], 7)
  m[1, 2] = 0.0
  f = jax.jit(adv.gae_advantages, static_argnums=(3, 4, 5))
  a_ref, ret_ref = ref_gae(r, v, m, gamma, lam)
  a, ret = f(r, v, m, gamma, lam, True)
  np.testing.assert_allclose(a, ref_whiten(a_ref, m), **TOL)
  np.testing.assert_allclose(ret, ret_ref * m, **TOL)
  a_raw, _ = f(r, v, m, gamma, lam, False)
  np.testing.assert_allclose(a_raw, a_ref * m, **TOL)


# ---------------------------------------------------------------- HAPO

def test_hapo_token_group_hand_computed():
  # group of 2: R=[1, 0], lengths [1, 3] -> tokens {1, 0, 0, 0}: mu=.25, pop std=sqrt(3)/4
  m = np.array(_mask([1, 3], 3))
  a, met = J(hapo.hapo_token_group_advantages, group_size=2, eps=0.0)(np.array([1., 0.]), m)
  s = np.sqrt(3) / 4
  np.testing.assert_allclose(a, [[.75 / s, 0, 0], [-.25 / s] * 3], **TOL)
  assert float(met["hapo_fallback_frac"]) == 0.0
  # token-weighted zero mean inside the group
  assert abs(float(jnp.sum(a * m))) < 1e-5


def test_hapo_token_group_fallback_and_edges():
  # one short correct answer among long wrong ones: |z| >= 5 -> GRPO advantages for that group
  m = _mask([1, 60, 60, 60], 60)
  r = np.array([1., 0., 0., 0.], np.float32)
  a, met = J(hapo.hapo_token_group_advantages, group_size=4)(r, m)
  np.testing.assert_allclose(np.asarray(a)[:, 0], ref_grpo(r, 4), **TOL)
  assert float(met["hapo_fallback_frac"]) == 1.0
  # all-equal, singleton and all-masked groups: zeros, finite
  m2 = _mask([3, 2, 0, 0], 3)
  a, _ = J(hapo.hapo_token_group_advantages, group_size=2)(np.array([.7, .7, 1., 0.]), m2)
  np.testing.assert_array_equal(a, np.zeros((4, 3)))
  a, _ = J(hapo.hapo_token_group_advantages, group_size=1)(np.array([.3, -1.]), _mask([2, 3], 3))
  np.testing.assert_array_equal(a, np.zeros((2, 3)))
  # the released-code scope also checks padding, whose value (0 - mu)/std can be large
  m3 = _mask([4, 4, 4, 2], 4)
  r3 = np.array([1., 1., 1., .9], np.float32)
  a_valid, met_v = J(hapo.hapo_token_group_advantages, group_size=4, fallback_scope="valid")(r3, m3)
  a_pad, met_p = J(hapo.hapo_token_group_advantages, group_size=4, fallback_scope="padded")(r3, m3)
  assert float(met_v["hapo_fallback_frac"]) == 0.0 and float(met_p["hapo_fallback_frac"]) == 1.0
  np.testing.assert_allclose(a_pad, ref_hapo(r3, m3, 4, scope="padded"), **TOL)
  with pytest.raises(ValueError):
    hapo.hapo_token_group_advantages(r3, m3, 4, fallback_scope="all")


@pytest.mark.parametrize("scope", ["valid", "padded"])
def test_hapo_token_group_matches_reference(scope):
  rng = np.random.default_rng(5)
  r = rng.choice([-1.0, 1.0, 0.5], size=12).astype(np.float32)
  m = _mask(rng.integers(0, 9, size=12), 8)
  f = jax.jit(functools.partial(hapo.hapo_token_group_advantages, group_size=4, fallback_scope=scope))
  a, _ = f(r, m)
  np.testing.assert_allclose(a, ref_hapo(r, m, 4, scope=scope), **TOL)


def test_hapo_redistribute_hand_and_reference():
  A = np.array([[2., 2., 2., 2.]])
  h = np.array([[.5, .5, -.5, -.5]])
  ratio = np.array([[1.0, 1.2, 1.0, 1.2]])  # neutral zone with eps .2/.2 is (0.9, 1.1)
  out = J(hapo.hapo_redistribute_advantages, beta=1.0)(A, h, ratio, 0.2, 0.2)
  # high entropy: inside -> A, outside -> A(1+h)=3; low entropy: inside -> A(1+h)=1, outside -> A
  np.testing.assert_allclose(out, [[2., 3., 1., 2.]], **TOL)
  rng = np.random.default_rng(6)
  A = rng.normal(size=(3, 5)).astype(np.float32)
  h = rng.uniform(-1, 1, size=(3, 5)).astype(np.float32)
  ratio = rng.uniform(0.8, 1.2, size=(3, 5)).astype(np.float32)
  el = rng.uniform(0.1, 0.4, size=(3, 5)).astype(np.float32)
  eh = rng.uniform(0.1, 0.4, size=(3, 5)).astype(np.float32)
  expect = np.zeros((3, 5))
  for i in range(3):
    for t in range(5):
      inside = 1 - el[i, t] / 2 < ratio[i, t] < 1 + eh[i, t] / 2
      ent = A[i, t] * (1 + 0.7 * h[i, t])
      if h[i, t] > 0:
        expect[i, t] = A[i, t] if inside else ent
      else:
        expect[i, t] = ent if inside else A[i, t]
  f = jax.jit(hapo.hapo_redistribute_advantages, static_argnums=5)
  np.testing.assert_allclose(f(A, h, ratio, el, eh, 0.7), expect, **TOL)
  # stop-gradient on everything (the ratio in particular)
  g = jax.jit(jax.grad(lambda rt: jnp.sum(hapo.hapo_redistribute_advantages(A, h, rt, el, eh))))(jnp.asarray(ratio))
  np.testing.assert_array_equal(g, np.zeros_like(ratio))
