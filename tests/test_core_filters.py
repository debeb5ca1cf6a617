"""Golden tests for core/filters.py."""
import math
from fractions import Fraction

import numpy as np
import pytest

from jaxrl_reason.core import filters


# ---------------------------------------------------------------- independent loop references
def ref_zero_variance(metric, g, keep_singletons=True):
  keep = []
  for b in range(len(metric) // g):
    vals = [float(v) for v in metric[b * g:(b + 1) * g]]
    keep.append(len(set(vals)) > 1 or (keep_singletons and g == 1))
  return np.array(keep)


def ref_percentile_linear(values, q):
  s = sorted(values)
  pos = q * (len(s) - 1)
  lo = int(math.floor(pos))
  hi = min(lo + 1, len(s) - 1)
  return s[lo] + (pos - lo) * (s[hi] - s[lo])


def ref_percentile_inverted_cdf(values, q):
  """Q(a) = inf{t : F(t) >= a}, with F counted exactly (Fraction) to avoid float rounding."""
  s = sorted(values)
  n, qf = len(s), Fraction(str(q))
  for t in s:
    if Fraction(sum(1 for v in s if v <= t), n) >= qf:
      return t
  return s[-1]


def ref_lspo(lengths, g, low, high, top, method, cand):
  means = [sum(lengths[b * g:(b + 1) * g]) / g for b in range(len(lengths) // g)]
  cand_vals = [m for m, c in zip(means, cand) if c]
  if not cand_vals:
    return np.zeros(len(means), bool), (math.nan,) * 3
  pct = ref_percentile_linear if method == "linear" else ref_percentile_inverted_cdf
  p = [pct(cand_vals, q) for q in (low, high, top)]
  keep = [bool(c) and (m <= p[0] or p[1] <= m <= p[2]) for m, c in zip(means, cand)]
  return np.array(keep), tuple(p)


def ref_band(correct, g, low, high):
  keep = []
  for b in range(len(correct) // g):
    acc = sum(correct[b * g:(b + 1) * g]) / g
    keep.append(not (acc > high or acc < low))
  return np.array(keep)


# ---------------------------------------------------------------- zero-variance (DAPO / DLER)
def test_zero_variance_hand_case():
  metric = [1, 0, 1, 1, 1, 1, 0, 0, 0, 0.5, 0.5, 0.2]
  keep, m = filters.zero_variance_filter(metric, group_size=3)
  np.testing.assert_array_equal(keep, [True, False, False, True])
  assert m["kept_fraction"] == 0.5 and m["num_kept"] == 2 and m["num_groups"] == 4
  assert m["zero_variance_fraction"] == 0.5


def test_zero_variance_matches_loop_reference():
  rng = np.random.default_rng(0)
  for g in (1, 2, 4, 8):
    metric = rng.integers(0, 2, size=16 * g).astype(float)
    for ks in (True, False):
      keep, _ = filters.zero_variance_filter(metric, g, keep_singletons=ks)
      np.testing.assert_array_equal(keep, ref_zero_variance(metric, g, ks))


def test_zero_variance_singletons_and_rounding():
  keep, _ = filters.zero_variance_filter([0.0, 1.0, 1.0], 1)
  assert keep.all()
  keep, m = filters.zero_variance_filter([0.0, 1.0, 1.0], 1, keep_singletons=False)
  assert not keep.any() and m["kept_fraction"] == 0.0
  # np.std([0.1]*3) is 1.4e-17 > 0; an all-equal group must still be dropped.
  keep, _ = filters.zero_variance_filter([0.1, 0.1, 0.1, 0.1, 0.1, 0.3], 3)
  np.testing.assert_array_equal(keep, [False, True])


def test_dler_filter_is_dynamic_sampling():
  assert filters.dler_filter is filters.zero_variance_filter
  # DLER filters on the pre-penalty score: scores {1,1,0} kept although rewards {0.1,0.1,0} would also vary.
  keep, _ = filters.dler_filter([1, 1, 0, 1, 1, 1], 3)
  np.testing.assert_array_equal(keep, [True, False])


@pytest.mark.parametrize("metric, g", [([1, 0, 1], 2), ([[1, 0]], 1), ([1, np.nan], 2), ([1, 0], 0)])
def test_zero_variance_bad_arguments(metric, g):
  with pytest.raises(ValueError):
    filters.zero_variance_filter(metric, g)


# ---------------------------------------------------------------- LSPO
def _lengths_with_means(means, g=2):
  return np.repeat(np.asarray(means, float), g) + np.tile([-1.0, 1.0], len(means))


def test_lspo_hand_case_both_presets_and_methods():
  lengths = _lengths_with_means(np.arange(1, 11) * 10.0)  # group means 10..100
  cases = [
      (filters.LSPO_THRESHOLDS_CODE, "linear", (37.0, 64.0, 91.0), [10, 20, 30, 70, 80, 90]),
      (filters.LSPO_THRESHOLDS_CODE, "inverted_cdf", (30.0, 60.0, 90.0), [10, 20, 30, 60, 70, 80, 90]),
      (filters.LSPO_THRESHOLDS_NOTES, "linear", (37.0, 68.5, 95.5), [10, 20, 30, 70, 80, 90]),
      (filters.LSPO_THRESHOLDS_NOTES, "inverted_cdf", (30.0, 70.0, 100.0), [10, 20, 30, 70, 80, 90, 100]),
  ]
  for (lo, hi, mx), method, p, kept_means in cases:
    keep, m = filters.lspo_length_filter(lengths, 2, lo, hi, mx, percentile_method=method)
    np.testing.assert_allclose((m["p_low"], m["p_high"], m["p_max"]), p, atol=1e-9)
    np.testing.assert_array_equal(np.flatnonzero(keep), np.asarray(kept_means) // 10 - 1)
    assert m["kept_fraction"] == len(kept_means) / 10


def test_lspo_percentiles_only_over_candidates():
  lengths = _lengths_with_means([10, 1000, 20, 30, 2000])
  cand = np.array([True, False, True, True, False])
  keep, m = filters.lspo_length_filter(lengths, 2, 0.30, 0.60, 0.90, candidates_B=cand)
  # candidates 10, 20, 30: p = 16, 22, 28 (linear) -> keep 10 only; non-candidates never kept
  np.testing.assert_allclose((m["p_low"], m["p_high"], m["p_max"]), (16.0, 22.0, 28.0))
  np.testing.assert_array_equal(keep, [True, False, False, False, False])
  assert m["num_candidates"] == 3 and m["kept_of_candidates"] == pytest.approx(1 / 3)


def test_lspo_matches_loop_reference():
  rng = np.random.default_rng(1)
  for trial in range(30):
    g, b = int(rng.integers(1, 5)), int(rng.integers(1, 40))
    lengths = rng.integers(1, 50, size=b * g).astype(float)  # small range: many exact ties
    cand = rng.random(b) < 0.7
    lo, hi = sorted(rng.random(2))
    mx = hi + (1 - hi) * rng.random()
    for method in ("linear", "inverted_cdf"):
      keep, m = filters.lspo_length_filter(lengths, g, lo, hi, mx, method, candidates_B=cand)
      ref_keep, ref_p = ref_lspo(list(lengths), g, lo, hi, mx, method, cand)
      np.testing.assert_array_equal(keep, ref_keep, err_msg=f"trial {trial} {method}")
      np.testing.assert_allclose((m["p_low"], m["p_high"], m["p_max"]), ref_p, atol=1e-6)


def test_lspo_edge_cases():
  # no candidates: nothing kept, thresholds NaN
  keep, m = filters.lspo_length_filter([1, 2, 3, 4], 2, candidates_B=[False, False])
  assert not keep.any() and math.isnan(m["p_low"]) and m["kept_of_candidates"] == 0.0
  # one candidate: all percentiles equal its length -> kept
  keep, _ = filters.lspo_length_filter([5, 7], 2)
  assert keep.all()
  # two distinct candidates, linear (released code): only the shorter one survives ...
  two = _lengths_with_means([10, 20])
  keep, _ = filters.lspo_length_filter(two, 2)
  np.testing.assert_array_equal(keep, [True, False])
  # ... the paper's inverted-cdf keeps both, and so does the min_candidates=3 switch (the paper's stated intent)
  keep, _ = filters.lspo_length_filter(two, 2, percentile_method="inverted_cdf")
  assert keep.all()
  keep, m = filters.lspo_length_filter(two, 2, min_candidates=3)
  assert keep.all() and math.isnan(m["p_low"])
  # ties: all groups share one mean length -> all kept
  keep, _ = filters.lspo_length_filter(np.full(12, 4.0), 3)
  assert keep.all()


@pytest.mark.parametrize("kwargs", [dict(low=1.2), dict(high=0.9, max=0.8), dict(percentile_method="nearest"),
                                    dict(candidates_B=[True])])
def test_lspo_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    filters.lspo_length_filter([1, 2, 3, 4], 2, **kwargs)


# ---------------------------------------------------------------- TraceRL accuracy band
def test_accuracy_band_hand_case():
  correct = np.concatenate([np.r_[np.ones(k), np.zeros(5 - k)] for k in range(6)])
  keep, m = filters.accuracy_band_filter(correct, 5)
  np.testing.assert_array_equal(keep, [False, True, True, True, True, False])  # 0.2 and 0.8 kept
  assert m["above_fraction"] == pytest.approx(1 / 6) and m["below_fraction"] == pytest.approx(1 / 6)
  assert m["mean_accuracy"] == pytest.approx(0.5)
  correct16 = np.concatenate([np.r_[np.ones(k), np.zeros(16 - k)] for k in range(17)])
  keep16, _ = filters.accuracy_band_filter(correct16, 16)
  np.testing.assert_array_equal(np.flatnonzero(keep16), np.arange(4, 13))


def test_accuracy_band_matches_loop_reference():
  rng = np.random.default_rng(2)
  for g in (1, 3, 8, 10):
    correct = rng.integers(0, 2, size=20 * g).astype(float)
    for lo, hi in ((0.2, 0.8), (0.0, 1.0), (0.5, 0.5)):
      keep, _ = filters.accuracy_band_filter(correct, g, lo, hi)
      np.testing.assert_array_equal(keep, ref_band(list(correct), g, lo, hi))
  with pytest.raises(ValueError):
    filters.accuracy_band_filter([1, 0], 2, low=0.9, high=0.1)


# ---------------------------------------------------------------- accumulator
def _round(start_group, num_groups, g=2, t=3):
  rows = np.arange(start_group * g, (start_group + num_groups) * g)
  return {"tokens": np.repeat(rows[:, None], t, axis=1), "reward": rows.astype(float)}


def test_accumulator_exact_batch_and_surplus_dropped():
  g = 2
  acc = filters.empty_accumulator(group_size=g, train_groups=3)
  assert acc.num_groups == 0 and not acc.is_full
  acc, full = filters.accumulate_groups(acc, _round(0, 4), [False, True, False, True])
  assert not full and acc.num_groups == 2 and acc.rounds == 1
  acc, full = filters.accumulate_groups(acc, _round(4, 3), [False, False, False])  # nothing kept
  assert not full and acc.num_groups == 2 and acc.arrays["tokens"].shape == (4, 3)
  acc, full = filters.accumulate_groups(acc, _round(7, 4), [True, True, False, True])
  assert full and acc.rounds == 3 and acc.dropped_groups == 2
  # reference: list of kept group ids in order, truncated to train_groups
  kept_groups = [1, 3] + [7, 8, 10]
  expected_rows = np.concatenate([np.arange(k * g, (k + 1) * g) for k in kept_groups[:3]])
  np.testing.assert_array_equal(acc.arrays["reward"], expected_rows)
  np.testing.assert_array_equal(acc.arrays["tokens"][:, 0], expected_rows)
  # once full, nothing more is added
  acc2, full2 = filters.accumulate_groups(acc, _round(11, 1), [True])
  assert full2 and acc2.num_groups == 3 and acc2.dropped_groups == 3
  np.testing.assert_array_equal(acc2.arrays["reward"], expected_rows)


def test_accumulator_bad_arguments():
  acc = filters.empty_accumulator(2, 2)
  acc, _ = filters.accumulate_groups(acc, _round(0, 2), [True, False])
  with pytest.raises(ValueError):
    filters.accumulate_groups(acc, {"tokens": _round(0, 2)["tokens"]}, [True, True])
  with pytest.raises(ValueError):
    filters.accumulate_groups(acc, _round(0, 2), [True, True, True])
  with pytest.raises(ValueError):
    filters.empty_accumulator(0, 2)
