"""Golden tests for core/repro.py: hand cases and explicit-loop numpy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_reason.core import repro

# every jnp function is exercised through jit (static hyperparameters as static arguments)
loglik_jit = jax.jit(repro.answer_loglik_mean)
magn_jit = jax.jit(repro.magnitude_score, static_argnames="form")
stab_jit = jax.jit(repro.stability_score, static_argnames=("ema", "single_point_value"))
comp_jit = jax.jit(repro.composite_score, static_argnames="w_on")
prew_jit = jax.jit(repro.process_rewards)
norm_jit = jax.jit(repro.normalize_process_rewards, static_argnames=("scope", "min_segments"))
select_jit = jax.jit(repro.select_segments_by_entropy, static_argnames="k")
padv_jit = jax.jit(repro.process_advantage, static_argnames=("before_first", "after_last", "min_segments"))


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- independent loop references
def ref_stability(J, valid, ema=None, single=1.0):
  out = np.zeros(len(J))
  pts = []  # (slot, smoothed J) of the valid points seen so far
  s_prev = None
  for t in range(len(J)):
    if not valid[t]:
      continue
    s = J[t] if (ema is None or s_prev is None) else ema * s_prev + (1 - ema) * J[t]
    s_prev = s
    pts.append(s)
    n = len(pts)
    if n < 2:
      out[t] = single
      continue
    conc = sum(np.sign(pts[j] - pts[i]) for i in range(n) for j in range(i + 1, n))
    out[t] = 0.5 + 0.5 * conc / (n * (n - 1) / 2)
  return out


def ref_process_rewards(S, valid):
  out, prev = np.zeros(len(S)), 0.0
  for j in range(len(S)):
    if valid[j]:
      out[j], prev = S[j] - prev, S[j]
  return out


def ref_normalize(r, valid, scope, eps=1e-6, min_seg=2):
  r, out = np.asarray(r, float), np.zeros(np.shape(r))
  rows = [n for n in range(r.shape[0]) if sum(valid[n]) >= min_seg]
  groups = [rows] if scope == "batch" else [[n] for n in rows]
  for grp in groups:
    vals = [r[n, k] for n in grp for k in range(r.shape[1]) if valid[n][k]]
    if not vals:
      continue
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
    for n in grp:
      for k in range(r.shape[1]):
        if valid[n][k]:
          out[n, k] = r[n, k] if scope == "none" else (r[n, k] - mu) / (sd + eps)
  return out


def ref_select(ent, valid, k):
  cands = sorted([j for j in range(len(ent)) if valid[j]], key=lambda j: (-ent[j], j))[:k]
  idx = sorted(cands)
  return idx + [0] * (k - len(idx)), [True] * len(idx) + [False] * (k - len(idx))


def ref_process_advantage(r, seg_of_tok, sel_idx, sel_valid, mask, before_first, after_last, min_seg):
  sel = [(s, rr) for s, rr, v in zip(sel_idx, r, sel_valid) if v]
  out = np.zeros(len(seg_of_tok))
  if len(sel) < min_seg:
    return out
  for t, seg in enumerate(seg_of_tok):
    if not mask[t] or seg < 0:
      continue
    following = [j for j, (s, _) in enumerate(sel) if s >= seg]
    if following:
      j = following[0]
    elif after_last == "last":
      j = len(sel) - 1
    else:
      continue
    if before_first == "zero" and seg < sel[0][0]:
      continue
    out[t] = sum(rr for _, rr in sel[j:])
  return out


# ---------------------------------------------------------------- surrogate and scores
def test_answer_loglik_mean_hand_and_empty_row():
  logp = np.array([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0], [-4.0, -4.0, -4.0]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
  _close(loglik_jit(logp, mask), [-1.5, -0.5, 0.0])
  rng = np.random.default_rng(0)
  logp, mask = -rng.random((2, 3, 5)), rng.random((2, 3, 5)) < 0.6
  ref = [[sum(logp[a, b, c] for c in range(5) if mask[a, b, c]) / max(mask[a, b].sum(), 1) for b in range(3)]
         for a in range(2)]
  _close(loglik_jit(logp.astype(np.float32), mask), ref)


def test_magnitude_score_forms_and_jb_guard():
  J = np.array([[0.0, -2.0, -4.0, -1.0]], np.float32)
  _close(magn_jit(J, np.array([[-2.0]], np.float32)), 1 - np.tanh([[0.0, 1.0, 2.0, 0.5]]))
  _close(magn_jit(J, -2.0, form="notes"), np.tanh([[0.0, 1.0, 2.0, 0.5]]) + 1)
  s_none = magn_jit(np.float32(-2.0), np.float32(-2.0))  # no progress: 1 - tanh(1) ~ 0.238
  _close(s_none, 0.23840584)
  # J_b ~ 0 (answer already certain without reasoning): |J_b| floored at 1e-6, finite, in [0, 1]
  s0 = magn_jit(np.array([0.0, -1e-7, -0.5], np.float32), 0.0)
  _close(s0, [1.0, 1 - math.tanh(0.1), 0.0])
  with pytest.raises(ValueError):
    repro.magnitude_score(J, -1.0, form="tanh")


def test_stability_score_hand_cases():
  ones = np.ones(3, bool)
  _close(stab_jit(np.array([1.0, 2.0, 3.0]), ones), [1.0, 1.0, 1.0])
  _close(stab_jit(np.array([3.0, 2.0, 1.0]), ones), [1.0, 0.0, 0.0])
  _close(stab_jit(np.array([1.0, 3.0, 2.0]), ones), [1.0, 1.0, 2 / 3])
  _close(stab_jit(np.array([1.0, 1.0]), np.ones(2, bool)), [1.0, 0.5])  # tie counts 0
  _close(stab_jit(np.array([1.0, 2.0]), np.ones(2, bool), single_point_value=0.5), [0.5, 1.0])  # n < 2 switch
  _close(stab_jit(np.array([1.0, 99.0, 2.0]), np.array([True, False, True])), [1.0, 0.0, 1.0])  # invalid slot
  # EMA 0.5: smoothed [0, 1, 1] -> pairs (+, +, 0) at t=3 -> 0.5 + 0.5 * 2/3
  _close(stab_jit(np.array([0.0, 2.0, 1.0]), ones, ema=0.5), [1.0, 1.0, 5 / 6])


def test_stability_score_matches_loop_reference():
  rng = np.random.default_rng(1)
  J = np.round(rng.normal(size=(6, 7)), 1).astype(np.float32)  # rounding creates ties
  valid = rng.random((6, 7)) < 0.75
  for ema, single in ((None, 1.0), (None, 0.5), (0.7, 1.0)):
    got = stab_jit(J, valid, ema=ema, single_point_value=single)
    ref = [ref_stability(J[n].astype(float), valid[n], ema, single) for n in range(6)]
    _close(got, ref)
  with pytest.raises(ValueError):
    repro.stability_score(J, valid, ema=1.0)


def test_composite_and_process_rewards():
  S_m, S_s = np.array([0.2, 0.6]), np.array([1.0, 0.0])
  _close(comp_jit(S_m, S_s, 0.25), [0.75 * 0.2 + 0.25, 0.75 * 0.6])
  _close(comp_jit(S_m, S_s, 0.25, w_on="magnitude"), [0.25 * 0.2 + 0.75, 0.25 * 0.6])
  with pytest.raises(ValueError):
    repro.composite_score(S_m, S_s, 1.5)
  _close(prew_jit(np.array([0.3, 0.5, 0.4]), None), [0.3, 0.2, -0.1])
  _close(prew_jit(np.array([0.3, 9.0, 0.4]), np.array([True, False, True])), [0.3, 0.0, 0.1])
  rng = np.random.default_rng(2)
  S, valid = rng.random((5, 6)), rng.random((5, 6)) < 0.6
  _close(prew_jit(S.astype(np.float32), valid), [ref_process_rewards(S[n], valid[n]) for n in range(5)])


def test_normalize_process_rewards_matches_loop_reference():
  rng = np.random.default_rng(3)
  r = rng.normal(size=(5, 4)).astype(np.float32)
  valid = rng.random((5, 4)) < 0.6
  valid[0] = [True, False, False, False]  # a row with one segment: excluded and zeroed
  for scope in ("batch", "response", "none"):
    _close(norm_jit(r, valid, scope=scope), ref_normalize(r, valid.tolist(), scope))
  out = norm_jit(np.full((2, 3), 0.7, np.float32), np.ones((2, 3), bool))  # all equal -> 0
  assert np.all(np.asarray(out) == 0.0)
  out = norm_jit(r, np.zeros((5, 4), bool))  # nothing valid -> zeros, finite
  assert np.all(np.asarray(out) == 0.0)
  with pytest.raises(ValueError):
    repro.normalize_process_rewards(r, valid, scope="group")


# ---------------------------------------------------------------- segment selection and process advantage
def test_select_segments_hand_cases():
  ent = np.array([[0.1, 0.9, 0.5, 0.9, 0.2]], np.float32)
  idx, val = select_jit(ent, np.ones((1, 5), bool), k=3)
  np.testing.assert_array_equal(idx, [[1, 2, 3]])  # top-3 by entropy, original order
  assert np.asarray(val).all()
  idx, _ = select_jit(ent, np.ones((1, 5), bool), k=1)
  np.testing.assert_array_equal(idx, [[1]])  # tie 0.9 / 0.9 -> earlier segment
  idx, val = select_jit(ent, np.array([[True, False, True, False, False]]), k=3)
  np.testing.assert_array_equal(idx, [[0, 2, 0]])  # only 2 candidates: trailing slot invalid
  np.testing.assert_array_equal(val, [[True, True, False]])
  idx, val = select_jit(ent, np.ones((1, 5), bool), k=7)  # k > M
  np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 4, 0, 0]])
  np.testing.assert_array_equal(val, [[True] * 5 + [False] * 2])


def test_select_segments_matches_loop_reference():
  rng = np.random.default_rng(4)
  ent = np.round(rng.random((8, 9)), 1).astype(np.float32)  # ties
  valid = rng.random((8, 9)) < 0.6
  for k in (3, 12):
    idx, val = select_jit(ent, valid, k=k)
    for n in range(8):
      ref_idx, ref_val = ref_select(ent[n], valid[n], k)
      np.testing.assert_array_equal(idx[n], ref_idx)
      np.testing.assert_array_equal(val[n], ref_val)


def test_process_advantage_hand_case():
  # boundaries [2, 5, 8] in a response of 10 tokens (T = 11: one padding token)
  lay = repro.segment_layout([np.array([2, 5, 8])], [10], T=11)
  np.testing.assert_array_equal(lay["seg_of_token_NxT"], [[0, 0, 1, 1, 1, 2, 2, 2, 3, 3, -1]])
  mask = (lay["seg_of_token_NxT"] >= 0).astype(np.float32)
  sel_idx, sel_valid = np.array([[1, 2]]), np.array([[True, True]])
  r = np.array([[0.5, -0.2]], np.float32)  # return-to-go [0.3, -0.2]
  args = (r, lay["seg_of_token_NxT"], sel_idx, sel_valid, mask)
  _close(padv_jit(*args), [[0.3, 0.3, 0.3, 0.3, 0.3, -0.2, -0.2, -0.2, 0, 0, 0]])
  _close(padv_jit(*args, before_first="zero"), [[0, 0, 0.3, 0.3, 0.3, -0.2, -0.2, -0.2, 0, 0, 0]])
  _close(padv_jit(*args, after_last="last"), [[0.3, 0.3, 0.3, 0.3, 0.3, -0.2, -0.2, -0.2, -0.2, -0.2, 0]])
  # fewer than 2 selected segments -> no process advantage
  one = (r, lay["seg_of_token_NxT"], sel_idx, np.array([[True, False]]), mask)
  assert np.all(np.asarray(padv_jit(*one)) == 0.0)
  _close(repro.combine_advantages(np.ones((1, 11)), padv_jit(*args), alpha=0.1)[0, :2], [1.03, 1.03])
  with pytest.raises(ValueError):
    repro.process_advantage(*args, before_first="nearest")


def test_process_advantage_matches_loop_reference():
  rng = np.random.default_rng(5)
  n, t, k = 6, 24, 4
  bounds, lengths = [], []
  for _ in range(n):
    length = int(rng.integers(1, t + 1))
    nb = int(rng.integers(0, min(length, 7) + 1))
    bounds.append(np.sort(rng.choice(np.arange(1, length + 1), size=nb, replace=False)))
    lengths.append(length)
  lay = repro.segment_layout(bounds, lengths, T=t)
  mask = (rng.random((n, t)) < 0.9) & (lay["seg_of_token_NxT"] >= 0)
  ent = rng.random(lay["seg_valid_NxM"].shape).astype(np.float32)
  sel_idx, sel_valid = select_jit(ent, lay["seg_valid_NxM"], k=k)
  r = rng.normal(size=(n, k)).astype(np.float32)
  for bf, al, ms in (("following", "zero", 2), ("zero", "last", 1)):
    got = padv_jit(r, lay["seg_of_token_NxT"], sel_idx, sel_valid, mask.astype(np.float32),
                   before_first=bf, after_last=al, min_segments=ms)
    ref = [ref_process_advantage(r[i], lay["seg_of_token_NxT"][i], np.asarray(sel_idx[i]),
                                 np.asarray(sel_valid[i]), mask[i], bf, al, ms) for i in range(n)]
    _close(got, ref)


# ---------------------------------------------------------------- host helpers
def test_segment_boundaries_text_and_tokens():
  np.testing.assert_array_equal(repro.segment_boundaries("a\n\nbb\n\nc"), [3, 7])
  np.testing.assert_array_equal(repro.segment_boundaries("x\n\n\ny"), [3])  # no overlap
  np.testing.assert_array_equal(repro.segment_boundaries("no split here"), [])
  np.testing.assert_array_equal(repro.segment_boundaries("a\n\n"), [3])
  toks = [5, 1, 1, 7, 1, 1, 1, 1]
  np.testing.assert_array_equal(repro.segment_boundaries(toks, [1, 1]), [3, 6, 8])
  np.testing.assert_array_equal(repro.segment_boundaries(toks, 7), [4])
  np.testing.assert_array_equal(repro.segment_boundaries(toks, frozenset({5, 7})), [1, 4])
  with pytest.raises(ValueError):
    repro.segment_boundaries(toks, "\n\n")
  with pytest.raises(ValueError):
    repro.segment_boundaries("text", 3)


def test_segment_layout_hand_case_and_cap():
  lay = repro.segment_layout([np.array([2, 5]), np.array([], np.int64)], [6, 3], T=7)
  np.testing.assert_array_equal(lay["seg_of_token_NxT"], [[0, 0, 1, 1, 1, 2, -1], [0, 0, 0, -1, -1, -1, -1]])
  np.testing.assert_array_equal(lay["seg_start_NxM"], [[0, 2], [0, 0]])
  np.testing.assert_array_equal(lay["seg_end_NxM"], [[2, 5], [0, 0]])
  np.testing.assert_array_equal(lay["seg_valid_NxM"], [[True, True], [False, False]])
  capped = repro.segment_layout([np.array([2, 5])], [6], T=7, max_segments=1)
  np.testing.assert_array_equal(capped["seg_of_token_NxT"], [[0, 0, 1, 1, 1, 1, -1]])  # rest joins conclusion
  for bad in (([np.array([3, 2])], [6]), ([np.array([7])], [6]), ([np.array([1])], [9]), ([], [3])):
    with pytest.raises(ValueError):
      repro.segment_layout(*bad, T=8)
