"""Golden tests for core/hapo.py: a loop port of the released `compute_entropy_h`
and of the vLLM `compute_entropy_based_temperature`."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_reason.core import hapo

# every call goes through jit (fast on CPU, and the functions must be jit-able)
stats_jit = jax.jit(hapo.entropy_stats, static_argnums=2)
norm_jit = jax.jit(hapo.normalize_entropy, static_argnums=3)
temp_jit = jax.jit(hapo.adaptive_temperature, static_argnums=(2, 3, 4))


# ---------------------------------------------------------------- independent loop references
def ref_stats(entropy, mask, q):
  vals = [math.log(max(float(h), 1e-8)) for h, m in zip(np.ravel(entropy), np.ravel(mask)) if m]
  n = len(vals)
  pivot = sorted(vals)[round(q * (n - 1))] if n else 0.0  # python round = half to even, as torch_quantile
  var = max(sum((v - pivot) ** 2 for v in vals) / max(n, 1), 1e-8)
  sigma = math.sqrt(var)
  hs = [(v - pivot) / sigma for v in vals]
  h_max = max(max([h for h in hs if h > 0], default=0.0), 1e-8)
  h_min = min(min([h for h in hs if h < 0], default=0.0), -1e-8)
  return dict(pivot=pivot, sigma=sigma, h_max=h_max, h_min=h_min)


def ref_h_tilde(h, st, sign_compat):
  if h > 0:
    out = h / st["h_max"]
  elif sign_compat:
    out = h * (1.0 / st["h_min"])
  else:
    out = h / abs(st["h_min"])
  return min(max(out, -1.0), 1.0)


def ref_normalize(entropy, mask, st, sign_compat):
  out = np.zeros(np.shape(entropy))
  for idx in np.ndindex(out.shape):
    if mask[idx]:
      h = (math.log(max(float(entropy[idx]), 1e-8)) - st["pivot"]) / st["sigma"]
      out[idx] = ref_h_tilde(h, st, sign_compat)
  return out


def ref_temperature(entropy, st, t_base, tau, sign_compat, eps=1e-6):
  out = []
  for e in np.ravel(entropy):
    h = (math.log(max(float(e), eps)) - st["pivot"]) / (st["sigma"] + eps)
    out.append(t_base * (1.0 + tau * ref_h_tilde(h, st, sign_compat)))
  return np.reshape(out, np.shape(entropy))


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- hand-computed case
# valid log-entropies -2..2; the padded token (huge entropy) must not change anything.
HAND_H = np.exp(np.array([[-2.0, -1.0, 0.0], [1.0, 2.0, 30.0]], np.float32))
HAND_M = np.array([[1, 1, 1], [1, 1, 0]], np.float32)


def test_entropy_stats_hand_case():
  st = stats_jit(HAND_H, HAND_M, 0.8)
  # pivot = sorted[round(0.8*4)=3] = 1; var = (9+4+1+0+1)/5 = 3; h = [-3..1]/sqrt(3)
  _close(st["pivot"], 1.0)
  _close(st["sigma"], math.sqrt(3.0))
  _close(st["h_max"], 1 / math.sqrt(3.0))
  _close(st["h_min"], -math.sqrt(3.0))


def test_normalize_entropy_hand_case_both_signs():
  st = stats_jit(HAND_H, HAND_M, 0.8)
  h = norm_jit(HAND_H, HAND_M, st, False)
  _close(h, [[-1.0, -2 / 3, -1 / 3], [0.0, 1.0, 0.0]])  # intended: negative for low entropy, 0 on padding
  h_compat = norm_jit(HAND_H, HAND_M, st, True)
  _close(h_compat, [[1.0, 2 / 3, 1 / 3], [0.0, 1.0, 0.0]])  # released code: positive for low entropy


def test_stats_and_normalize_match_loop_reference():
  rng = np.random.default_rng(0)
  for trial in range(8):
    ent = np.exp(rng.normal(-1.0, 2.0, size=(3, 7))).astype(np.float32)
    ent[rng.random((3, 7)) < 0.1] = 0.0  # exact zeros hit the 1e-8 floor
    mask = (rng.random((3, 7)) < 0.2 + 0.1 * trial).astype(np.float32)  # from sparse to nearly full
    q = (0.8, 0.5)[trial % 2]
    st = stats_jit(ent, mask, q)
    ref = ref_stats(ent, mask, q)
    for key in ref:
      _close(st[key], ref[key], tol=2e-5)
    for sc in (False, True):
      h = norm_jit(ent, mask, st, sc)
      _close(h, ref_normalize(ent, mask, ref, sc), tol=2e-5)
      assert np.all(np.abs(np.asarray(h)) <= 1.0)


def test_quantile_round_half_to_even():
  # 4 valid values, q = 0.5: index 1.5 -> 2 (half to even); 6 values: 2.5 -> 2
  for n, expected_idx in ((4, 2), (6, 2)):
    logs = np.arange(n, dtype=np.float32)
    st = stats_jit(np.exp(logs)[None], np.ones((1, n)), 0.5)
    _close(st["pivot"], logs[expected_idx])


def test_empty_mask_and_gradient():
  st = stats_jit(HAND_H, np.zeros_like(HAND_M), 0.8)
  _close([st["pivot"], st["sigma"], st["h_max"], st["h_min"]], [0.0, 1e-4, 1e-8, -1e-8], tol=1e-9)
  h = norm_jit(HAND_H, np.zeros_like(HAND_M), st, False)
  assert np.all(np.asarray(h) == 0.0)
  # all-equal entropies: sigma floored, h == 0 everywhere, finite
  flat = np.full((2, 3), 0.7, np.float32)
  h = norm_jit(flat, HAND_M, stats_jit(flat, HAND_M, 0.8), False)
  assert np.all(np.isfinite(h)) and np.all(np.asarray(h) == 0.0)
  # h~ is a modulation signal: no gradient flows into the entropies
  grad = jax.jit(jax.grad(lambda e: jnp.sum(hapo.normalize_entropy(e, HAND_M, hapo.entropy_stats(e, HAND_M)))))(HAND_H)
  assert np.all(np.asarray(grad) == 0.0)
  with pytest.raises(ValueError):
    hapo.entropy_stats(HAND_H, HAND_M, pivot_quantile=1.5)


# ---------------------------------------------------------------- adaptive temperature
def test_adaptive_temperature_hand_case():
  st = stats_jit(HAND_H, HAND_M, 0.8)
  ent = np.exp(np.array([4.0, 1.0, -5.0], np.float32))  # far above pivot, at pivot, far below
  temp = temp_jit(ent, st, 1.0, 0.05, False)
  _close(temp, [1.05, 1.0, 0.95], tol=1e-6)  # h~ clamped to +-1, exactly 0 at the pivot
  temp_compat = temp_jit(ent, st, 1.0, 0.05, True)
  _close(temp_compat, [1.05, 1.0, 1.05], tol=1e-6)  # released code raises T for both tails
  # step 1: no statistics -> plain temperature
  _close(temp_jit(ent, None, 0.7, 0.05, False), [0.7, 0.7, 0.7], tol=1e-7)


def test_adaptive_temperature_matches_loop_reference_under_jit():
  rng = np.random.default_rng(1)
  ent_prev = np.exp(rng.normal(0.0, 1.5, size=(4, 16))).astype(np.float32)
  mask = np.ones((4, 16), np.float32)
  st = stats_jit(ent_prev, mask, 0.8)
  ref = ref_stats(ent_prev, mask, 0.8)
  ent_b = np.exp(rng.normal(0.0, 2.0, size=(32,))).astype(np.float32)
  for sc in (False, True):
    temp = temp_jit(ent_b, st, 1.0, 0.1, sc)
    _close(temp, ref_temperature(ent_b, ref, 1.0, 0.1, sc), tol=2e-5)
    assert np.all(np.asarray(temp) >= 0.9 - 1e-6) and np.all(np.asarray(temp) <= 1.1 + 1e-6)
