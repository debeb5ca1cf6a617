"""Golden tests for jaxrl_reason/core/aggregate.py and core/kl.py."""
import functools
import math

import jax
import numpy as np
import pytest

from jaxrl_reason.core import aggregate as agg
from jaxrl_reason.core import kl

TOL = dict(rtol=1e-5, atol=1e-6)


def J(f, **static):
  return jax.jit(functools.partial(f, **static))


def ref_agg(L, m, mode, const=None, per_seq=True):
  N, T = L.shape
  rows = [(sum(L[i, t] * m[i, t] for t in range(T) if m[i, t] > 0), sum(m[i])) for i in range(N)]
  nonempty = [(s, c) for s, c in rows if c > 0]
  if not nonempty:
    return 0.0
  if mode == "token-mean":
    return sum(s for s, _ in nonempty) / sum(c for _, c in nonempty)
  if mode == "seq-mean-token-sum":
    return sum(s for s, _ in nonempty) / len(nonempty)
  if mode == "seq-mean-token-mean":
    return sum(s / c for s, c in nonempty) / len(nonempty)
  if mode == "token-sum":
    return sum(s for s, _ in nonempty)
  C = T if const is None else const
  return sum(s for s, _ in nonempty) / (len(nonempty) if per_seq else 1) / C


# ---------------------------------------------------------------- aggregate

def _all_modes(const=None, **kw):
  """One jitted function returning every mode's aggregate (one compile instead of four)."""
  return jax.jit(lambda L, m: {mode: agg.aggregate(L, m, mode, const, **kw) for mode in agg.AGG_MODES})


def test_aggregate_hand_computed():
  L = np.array([[1., 2., 3.], [4., 5., 6.], [7., 8., 9.]], np.float32)
  m = np.array([[1., 1., 0.], [1., 0., 0.], [0., 0., 0.]], np.float32)
  expect = {"token-mean": 7 / 3, "seq-mean-token-sum": 3.5, "seq-mean-token-mean": 2.75,
            "seq-mean-token-sum-norm": 3.5 / 3, "token-sum": 7.0}
  out = _all_modes()(L, m)
  for mode, val in expect.items():
    np.testing.assert_allclose(out[mode], val, **TOL)
  f = jax.jit(lambda L, m: (agg.aggregate(L, m, "seq-mean-token-sum-norm", 10.0),
                            agg.aggregate(L, m, "seq-mean-token-sum-norm", 10.0, sum_norm_per_seq=False)))
  np.testing.assert_allclose(f(L, m), (0.35, 0.7), **TOL)


def test_aggregate_matches_reference_and_guards():
  rng = np.random.default_rng(0)
  L = rng.normal(size=(6, 5)).astype(np.float32)
  m = (rng.uniform(size=(6, 5)) < 0.6).astype(np.float32)
  m[3] = 0.0  # an empty row
  L_bad = L.copy()  # NaN / inf in padding never leak
  L_bad[m == 0] = np.nan
  L_bad[3, 0] = np.inf
  f = _all_modes(const=4.0)
  out, out_bad, out_empty = f(L, m), f(L_bad, m), f(L, np.zeros_like(m))
  grads = jax.jit(jax.grad(lambda x: sum(agg.aggregate(x, np.zeros_like(m), mode) for mode in agg.AGG_MODES)))(L)
  for mode in agg.AGG_MODES:
    np.testing.assert_allclose(out[mode], ref_agg(L, m, mode, 4.0), **TOL)
    np.testing.assert_allclose(out_bad[mode], ref_agg(L, m, mode, 4.0), **TOL)
    assert float(out_empty[mode]) == 0.0  # empty batch: 0
  assert np.all(np.asarray(grads) == 0.0)  # and a zero (not NaN) gradient


def test_aggregate_micro_batch_invariance():
  rng = np.random.default_rng(1)
  L = rng.normal(size=(8, 6)).astype(np.float32)
  m = (rng.uniform(size=(8, 6)) < 0.5).astype(np.float32)
  m[5] = 0.0
  n_tok, n_seq = m.sum(), (m.sum(-1) > 0).sum()
  full = _all_modes(const=6.0)(L, m)
  f = jax.jit(lambda L, m: {mode: agg.aggregate(L, m, mode, 6.0, num_tokens=n_tok, num_seqs=n_seq)
                            for mode in agg.AGG_MODES})
  parts = [f(L[k:k + 2], m[k:k + 2]) for k in range(0, 8, 2)]
  for mode in agg.AGG_MODES:
    np.testing.assert_allclose(sum(float(p[mode]) for p in parts), full[mode], **TOL)


def test_aggregate_errors():
  L = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError):
    agg.aggregate(L, L, "token-median")
  with pytest.raises(ValueError):
    agg.aggregate(L, np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError):
    agg.aggregate(L, L, "seq-mean-token-sum-norm", const=0)


def test_masked_mean():
  x = np.array([[1., 2.], [3., np.nan]], np.float32)
  m = np.array([[1., 0.], [1., 0.]], np.float32)
  np.testing.assert_allclose(J(agg.masked_mean)(x, m), 2.0, **TOL)
  np.testing.assert_allclose(J(agg.masked_mean, axis=1)(x, m), [1.0, 3.0], **TOL)
  assert float(J(agg.masked_mean)(x, np.zeros_like(m))) == 0.0


# ---------------------------------------------------------------- KL

def ref_kl(lp, lr, kind):
  out = np.zeros(lp.shape)
  for idx in np.ndindex(*lp.shape):
    d = float(lp[idx]) - float(lr[idx])
    if kind in ("k1", "kl"):
      out[idx] = d
    elif kind == "abs":
      out[idx] = abs(d)
    elif kind in ("k2", "mse"):
      out[idx] = 0.5 * d * d
    else:
      nd = min(max(-d, -20.0), 20.0)
      out[idx] = min(max(math.exp(nd) - nd - 1.0, -10.0), 10.0)
  return out


def test_kl_hand_computed():
  lp = np.array([[0.5, -0.5, 0.0]], np.float32)
  lr = np.zeros((1, 3), np.float32)
  f = jax.jit(lambda a, b: [kl.kl_estimate(a, b, k) for k in ("k1", "abs", "mse", "low_var_kl")])
  k1, kabs, k2, k3 = f(lp, lr)
  np.testing.assert_allclose(k1, lp, **TOL)
  np.testing.assert_allclose(kabs, [[.5, .5, 0.]], **TOL)
  np.testing.assert_allclose(k2, [[.125, .125, 0.]], **TOL)
  np.testing.assert_allclose(k3, [[math.exp(-.5) + .5 - 1, math.exp(.5) - .5 - 1, 0.]], **TOL)
  # clamps: inner -d to [-20, 20], estimate to [-10, 10]
  big = f(np.array([[-30., 30., 0.]], np.float32), np.zeros((1, 3), np.float32))[3]
  np.testing.assert_allclose(big, [[10., 10., 0.]], **TOL)


def test_kl_matches_reference():
  rng = np.random.default_rng(2)
  lp = -rng.uniform(0, 4, size=(3, 5)).astype(np.float32)
  lr = -rng.uniform(0, 4, size=(3, 5)).astype(np.float32)
  kinds = kl.KL_KINDS + tuple(k + "+" for k in kl.KL_KINDS)
  values = jax.jit(lambda a, b: {k: kl.kl_estimate(a, b, k) for k in kinds})(lp, lr)
  grads = jax.jit(lambda a, b: {k: jax.grad(lambda x: kl.kl_estimate(x, b, k).sum())(a) for k in kinds})(lp, lr)
  for kind in kl.KL_KINDS:
    np.testing.assert_allclose(values[kind], ref_kl(lp, lr, kind), **TOL)
    # straight-through variant: same value, gradient of k2 (= d)
    np.testing.assert_allclose(values[kind + "+"], ref_kl(lp, lr, kind), **TOL)
    np.testing.assert_allclose(grads[kind + "+"], lp - lr, **TOL)


def test_kl_gradients_match_finite_differences():
  rng = np.random.default_rng(3)
  lp = -rng.uniform(0, 2, size=(2, 3))
  lr = -rng.uniform(0, 2, size=(2, 3))
  with jax.enable_x64(True):
    kinds = ("k1", "k2", "k3")
    grads = jax.jit(lambda a: [jax.grad(lambda x: kl.kl_estimate(x, lr, k).sum())(a) for k in kinds])(lp)
    d = lp - lr
    for g, expect in zip(grads, (np.ones_like(d), d, 1 - np.exp(-d))):
      np.testing.assert_allclose(g, expect, rtol=1e-10)
  with pytest.raises(ValueError):
    kl.kl_estimate(lp, lr, "k4")


def test_adaptive_kl_coef():
  f = jax.jit(kl.adaptive_kl_coef, static_argnames=("target", "horizon", "n"))
  np.testing.assert_allclose(f(0.001, 0.15, target=0.1, horizon=10000, n=256), 0.001 * (1 + 0.2 * 256 / 1e4), **TOL)
  np.testing.assert_allclose(f(0.001, 0.11, target=0.1, horizon=10000, n=256), 0.001 * (1 + 0.1 * 256 / 1e4), **TOL)
  np.testing.assert_allclose(f(0.001, 0.0, target=0.1, horizon=10000, n=256), 0.001 * (1 - 0.2 * 256 / 1e4), **TOL)
  with pytest.raises(ValueError):
    kl.adaptive_kl_coef(0.001, 0.1, target=0.0)
