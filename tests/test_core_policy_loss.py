"""Golden tests for jaxrl_reason/core/policy_loss.py.

Hand-computed cases, independent numpy references with explicit loops, and jax.grad against central finite
differences in float64 (inside a `jax.enable_x64` context, so nothing leaks to other tests).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_reason.core import hapo
from jaxrl_reason.core import policy_loss as pl

TOL = dict(rtol=1e-5, atol=1e-5)
MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def J(f, **static):
  return jax.jit(functools.partial(f, **static))


def _mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def ref_agg(L, m, mode, const=None):
  N, T = L.shape
  rows = [(sum(L[i, t] for t in range(T) if m[i, t] > 0), sum(m[i])) for i in range(N)]
  nonempty = [(s, c) for s, c in rows if c > 0]
  if not nonempty:
    return 0.0
  if mode == "token-mean":
    return sum(s for s, _ in nonempty) / sum(c for _, c in nonempty)
  if mode == "seq-mean-token-sum":
    return sum(s for s, _ in nonempty) / len(nonempty)
  if mode == "seq-mean-token-mean":
    return sum(s / c for s, c in nonempty) / len(nonempty)
  return sum(s for s, _ in nonempty) / len(nonempty) / (T if const is None else const)


def ref_ppo_tokens(logp, logp_old, A, el, eh, c):
  N, T = logp.shape
  el, eh = np.broadcast_to(el, (N, T)), np.broadcast_to(eh, (N, T))
  out = np.zeros((N, T))
  for i in range(N):
    for t in range(T):
      r = math.exp(min(max(logp[i, t] - logp_old[i, t], -20.0), 20.0))
      a = A[i, t]
      lc = max(-a * r, -a * min(max(r, 1 - el[i, t]), 1 + eh[i, t]))
      out[i, t] = min(lc, -a * c) if (c is not None and a < 0) else lc
  return out


def fd_grad(f, x, h=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (float(f(xp)) - float(f(xm))) / (2 * h)
  return g


def _random_batch(seed, N=4, T=5, spread=0.4):
  rng = np.random.default_rng(seed)
  logp_old = -rng.uniform(0.1, 3.0, size=(N, T))
  logp = logp_old + rng.normal(scale=spread, size=(N, T))
  A = rng.normal(size=(N, T))
  m = _mask(rng.integers(1, T + 1, size=N), T)
  return logp, logp_old, A, m


# ---------------------------------------------------------------- PPO clip

def test_ppo_clip_hand_computed():
  d = np.log([[1.5, 4.0, 0.5, 1.0, 1e6]])
  logp_old = np.full((1, 5), -2.0, np.float32)
  logp = (logp_old + d).astype(np.float32)
  A = np.array([[1., -1., -1., 2., 5.]], np.float32)
  m = np.array([[1., 1., 1., 1., 0.]], np.float32)
  loss, met = J(pl.ppo_clip_loss, eps_low=0.2, eps_high=0.2, dual_clip_c=3.0)(logp, logp_old, A, m)
  # per token: -1.2 (clipped high), min(4, 3)=3 (dual clip), 0.8 (clipped low), -2 (inside)
  np.testing.assert_allclose(loss, (-1.2 + 3 + 0.8 - 2) / 4, **TOL)
  np.testing.assert_allclose(met["pg_clipfrac"], 0.5, **TOL)
  np.testing.assert_allclose(met["pg_clipfrac_lower"], 0.25, **TOL)
  np.testing.assert_allclose(met["ppo_kl"], -np.log(1.5 * 4 * 0.5) / 4, **TOL)
  np.testing.assert_allclose(met["ratio_mean"], (1.5 + 4 + .5 + 1) / 4, **TOL)
  np.testing.assert_allclose(met["ratio_max"], 4.0, **TOL)
  loss_nodual, met = J(pl.ppo_clip_loss, dual_clip_c=None)(logp, logp_old, A, m)
  np.testing.assert_allclose(loss_nodual, (-1.2 + 4 + 0.8 - 2) / 4, **TOL)
  assert float(met["pg_clipfrac_lower"]) == 0.0


def test_ppo_clip_matches_reference():
  logp, logp_old, A, m = _random_batch(0, spread=0.5)
  rng = np.random.default_rng(1)
  el = rng.uniform(0.1, 0.4, size=A.shape)
  eh = rng.uniform(0.1, 0.4, size=A.shape)
  w = rng.uniform(0.5, 1.5, size=A.shape)
  args = [x.astype(np.float32) for x in (logp, logp_old, A, m, el, eh, w)]

  @jax.jit
  def f(logp, logp_old, A, m, el, eh, w):
    return {(mode, weighted): pl.ppo_clip_loss(logp, logp_old, A, m, el, eh, 2.0, mode, 7.0,
                                               token_weights_NxT=w if weighted else None)[0]
            for mode in MODES for weighted in (False, True)}

  out = f(*args)
  L = ref_ppo_tokens(logp, logp_old, A, el, eh, 2.0)
  for mode in MODES:
    np.testing.assert_allclose(out[(mode, False)], ref_agg(L, m, mode, 7.0), **TOL)
    np.testing.assert_allclose(out[(mode, True)], ref_agg(L * w, m, mode, 7.0), **TOL)


def test_ppo_clip_grad_matches_finite_differences():
  logp, logp_old, A, m = _random_batch(2, spread=0.3)
  with jax.enable_x64(True):
    el_tok = np.random.default_rng(9).uniform(0.05, 0.3, size=logp.shape)  # per-token ranges (HAPO)
    for mode, c, el, eh in (("token-mean", 3.0, 0.2, 0.28), ("seq-mean-token-mean", None, el_tok, el_tok[::-1]),
                            ("seq-mean-token-sum-norm", 1.5, 0.2, 0.2)):
      f = jax.jit(lambda lp: pl.ppo_clip_loss(lp, logp_old, A, m, el, eh, c, agg=mode)[0])
      g = jax.jit(jax.grad(f))(logp)
      np.testing.assert_allclose(g, fd_grad(f, logp), rtol=1e-5, atol=1e-7)
      assert np.abs(np.asarray(g)).sum() > 0
      assert np.all(np.asarray(g)[m == 0] == 0)


def test_ppo_clip_extremes_and_errors():
  logp = np.array([[0., -80., 0.]], np.float32)
  logp_old = np.array([[-80., 0., 0.]], np.float32)
  A = np.array([[-1., 1., 1.]], np.float32)
  m = np.ones((1, 3), np.float32)
  f = jax.jit(jax.value_and_grad(lambda lp: pl.ppo_clip_loss(lp, logp_old, A, m, dual_clip_c=None)[0]))
  val, g = f(logp)  # log-ratio clamped at +-20: finite value and gradient
  assert np.isfinite(val) and np.all(np.isfinite(g))
  np.testing.assert_allclose(val, (np.exp(20.0) - 0.8 - 1.0) / 3, rtol=1e-5)
  loss, met = J(pl.ppo_clip_loss)(logp, logp_old, A, np.zeros((1, 3), np.float32))  # all masked
  assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in met.values())
  with pytest.raises(ValueError):
    pl.ppo_clip_loss(logp, logp_old, A, m, dual_clip_c=1.0)
  with pytest.raises(ValueError):
    pl.ppo_clip_loss(logp, logp_old, A, m, agg="token-median")
  with pytest.raises(ValueError):
    pl.ppo_clip_loss(logp, logp_old, A, m, eps_low=1.5)


# ---------------------------------------------------------------- HAPO adaptive clip

def test_hapo_adaptive_clip_bounds():
  h = np.array([[-1., -.5, 0., .5, 1.]], np.float32)
  lo, hi = J(hapo.hapo_adaptive_clip_bounds, eps_low=0.2, eps_high=0.28, alpha=1.0)(h)
  np.testing.assert_allclose(lo, [[.4, .3, .2, .2, .2]], **TOL)
  np.testing.assert_allclose(hi, [[.28, .28, .28, .42, .56]], **TOL)
  rng = np.random.default_rng(3)
  h = rng.uniform(-1, 1, size=(3, 4)).astype(np.float32)
  lo, hi = J(hapo.hapo_adaptive_clip_bounds, eps_low=0.2, eps_high=0.2, alpha=0.5)(h)
  ref_lo = [[0.2 * (1 - 0.5 * x) if x <= 0 else 0.2 for x in row] for row in h]
  ref_hi = [[0.2 * (1 + 0.5 * x) if x > 0 else 0.2 for x in row] for row in h]
  np.testing.assert_allclose(lo, ref_lo, **TOL)
  np.testing.assert_allclose(hi, ref_hi, **TOL)
  # per-token ranges feed the PPO loss and match the reference with array eps
  logp, logp_old, A, m = _random_batch(4, N=3, T=4)
  loss, _ = J(pl.ppo_clip_loss, dual_clip_c=10.0)(*(x.astype(np.float32) for x in (logp, logp_old, A, m)), lo, hi)
  ref = ref_agg(ref_ppo_tokens(logp, logp_old, A, np.asarray(lo), np.asarray(hi), 10.0), m, "token-mean")
  np.testing.assert_allclose(loss, ref, **TOL)


# ---------------------------------------------------------------- GSPO

def ref_gspo(logp, logp_old, A, m, el, eh):
  N, T = logp.shape
  L = np.zeros((N, T))
  for i in range(N):
    n = max(sum(m[i]), 1)
    s = math.exp(min(sum((logp[i, t] - logp_old[i, t]) for t in range(T) if m[i, t] > 0) / n, 10.0))
    for t in range(T):
      L[i, t] = max(-A[i, t] * s, -A[i, t] * min(max(s, 1 - el), 1 + eh))
  return ref_agg(L, m, "seq-mean-token-mean")


def test_gspo_hand_and_reference():
  # one row, log-ratios [.1, .3] -> s = exp(.2); A = 1, eps .3/.3: not clipped -> loss = -exp(.2)
  logp_old = np.array([[-1., -2., -3.]], np.float32)
  logp = logp_old + np.array([[.1, .3, 9.]], np.float32)
  m = np.array([[1., 1., 0.]], np.float32)
  loss, met = J(pl.gspo_loss, eps_low=0.3, eps_high=0.3)(logp, logp_old, np.ones((1, 3), np.float32), m)
  np.testing.assert_allclose(loss, -np.exp(0.2), **TOL)
  assert float(met["pg_clipfrac"]) == 0.0
  logp, logp_old, A, m = _random_batch(5, spread=0.05)
  m[2] = 0.0  # an empty row is ignored
  loss, met = J(pl.gspo_loss, eps_low=3e-3, eps_high=4e-3)(*(x.astype(np.float32) for x in (logp, logp_old, A, m)))
  np.testing.assert_allclose(loss, ref_gspo(logp, logp_old, A, m, 3e-3, 4e-3), **TOL)
  assert np.isfinite(float(loss)) and 0.0 < float(met["pg_clipfrac"]) < 1.0
  # log s clamped at 10
  big, _ = J(pl.gspo_loss)(np.full((1, 2), 15.0, np.float32), np.zeros((1, 2), np.float32),
                           -np.ones((1, 2), np.float32), np.ones((1, 2), np.float32))
  np.testing.assert_allclose(big, np.exp(10.0), rtol=1e-5)


def test_gspo_grad_equals_sequence_level_objective():
  logp, logp_old, _, m = _random_batch(6, spread=0.2)
  A = np.repeat(np.random.default_rng(7).normal(size=(4, 1)), 5, axis=1)  # per-row constant advantage

  def seq_objective(lp):  # independent sequence-level GSPO: s_i = exp(mean_t log ratio), one term per row
    n = jnp.maximum(m.sum(-1), 1.0)
    s = jnp.exp(jnp.sum((lp - logp_old) * m, -1) / n)
    a = A[:, 0]
    per_row = jnp.maximum(-a * s, -a * jnp.clip(s, 1 - 0.05, 1 + 0.05))
    return jnp.sum(per_row * (m.sum(-1) > 0)) / jnp.sum(m.sum(-1) > 0)

  with jax.enable_x64(True):
    f = jax.jit(lambda lp: pl.gspo_loss(lp, logp_old, A, m, 0.05, 0.05)[0])
    g = jax.jit(jax.grad(f))(logp)
    np.testing.assert_allclose(f(logp), jax.jit(seq_objective)(logp), rtol=1e-10)
    np.testing.assert_allclose(g, jax.jit(jax.grad(seq_objective))(logp), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(g, fd_grad(f, logp), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- value loss, entropy

def test_value_loss_hand_reference_and_grad():
  v_old = np.array([[0.0, 0.0, 1.0]], np.float32)
  v_pred = np.array([[1.0, 0.2, 0.0]], np.float32)
  ret = np.array([[0.0, 1.0, 0.0]], np.float32)
  m = np.ones((1, 3), np.float32)
  loss, met = J(pl.value_loss, clip=0.5)(v_pred, v_old, ret, m)
  # tok0: max(1, .25)=1; tok1: max(.64, .64)=.64; tok2: max(0, .25)=.25 -> 0.5 * mean
  np.testing.assert_allclose(loss, 0.5 * (1 + .64 + .25) / 3, **TOL)
  np.testing.assert_allclose(met["vf_clipfrac"], 1 / 3, **TOL)
  rng = np.random.default_rng(8)
  v_pred, v_old, ret = (rng.normal(size=(3, 4)) for _ in range(3))
  m = _mask([4, 2, 3], 4)
  ref_L = np.array([[max((v_pred[i, t] - ret[i, t]) ** 2,
                         (min(max(v_pred[i, t], v_old[i, t] - .3), v_old[i, t] + .3) - ret[i, t]) ** 2)
                     for t in range(4)] for i in range(3)])
  for mode in ("token-mean", "seq-mean-token-mean"):
    loss, _ = J(pl.value_loss, clip=0.3, agg=mode)(*(x.astype(np.float32) for x in (v_pred, v_old, ret, m)))
    np.testing.assert_allclose(loss, 0.5 * ref_agg(ref_L, m, mode), **TOL)
  with jax.enable_x64(True):
    f = jax.jit(lambda v: pl.value_loss(v, v_old, ret, m, clip=0.3)[0])
    np.testing.assert_allclose(jax.jit(jax.grad(f))(v_pred), fd_grad(f, v_pred), rtol=1e-5, atol=1e-7)


def test_entropy_bonus():
  H = np.array([[1., 2., 30.], [4., 50., 60.]], np.float32)
  m = np.array([[1., 1., 0.], [1., 0., 0.]], np.float32)
  loss, met = J(pl.entropy_bonus, coef=0.01)(H, m)
  np.testing.assert_allclose(met["entropy"], 7 / 3, **TOL)
  np.testing.assert_allclose(loss, -0.01 * 7 / 3, **TOL)
  loss, met = J(pl.entropy_bonus, coef=0.5, agg="seq-mean-token-mean")(H, m)
  np.testing.assert_allclose(loss, -0.5 * (1.5 + 4) / 2, **TOL)
  with jax.enable_x64(True):
    f = jax.jit(lambda h: pl.entropy_bonus(h, m, 0.01)[0])
    H64 = H.astype(np.float64)
    g = jax.jit(jax.grad(f))(H64)
    np.testing.assert_allclose(g, -0.01 * m.astype(np.float64) / 3, rtol=1e-10)
    np.testing.assert_allclose(g, fd_grad(f, H64), rtol=1e-6, atol=1e-9)
