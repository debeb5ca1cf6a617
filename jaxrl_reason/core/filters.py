"""Group filters for dynamic sampling (host-side numpy): DAPO zero variance, DLER, LSPO, TraceRL accuracy band.

These run on the host before the jitted update: they change the number of groups, so they use numpy, not jnp.
Rows are flat ``N = B*G`` with groups contiguous (rows ``b*G .. b*G+G-1`` belong to prompt ``b``); every filter
returns ``keep_B`` (bool, one entry per group) and a small metrics dict of Python floats.

``GroupAccumulator`` + ``accumulate_groups`` implement the DAPO refill loop: kept groups of successive
generation rounds are appended until exactly ``train_groups`` groups are held; the surplus of the last round is
dropped (verl discards it, it is not cached for the next step).

Group filters register under a name in `GROUP_FILTERS` (`@register_filter`) with one signature,
  `(arrays, hp) -> (keep_B, metrics)`,
where `arrays` holds one round's per-response `score_N` and `length_N` and `hp` the frozen filter hyper-parameters
(`group_size`, `band_low`, ...). The rollout stage calls `GROUP_FILTERS[filter.kind](...)` whatever the filter;
filters that belong to one method (LSPO's length band) register in that method's module.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxrl_reason.core.registry import registrar

GROUP_FILTERS: dict[str, Callable] = {}
register_filter = registrar(GROUP_FILTERS)  # @register_filter(name) on `(arrays, hp) -> (keep_B, metrics)`

# LSPO threshold presets (L_low, L_high, L_max). Which produced the paper's tables is unverified.
LSPO_THRESHOLDS_CODE = (0.30, 0.60, 0.90)  # released v2 launcher script (default of `lspo_length_filter`)
LSPO_THRESHOLDS_NOTES = (0.30, 0.65, 0.95)  # third-party paper summary and the code's accuracy-percentile ablation


def _group_view(x_N, group_size: int, name: str) -> np.ndarray:
    """Reshape a flat per-response array ``[N]`` to ``[B, G]`` after validating it."""
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
    x_N = np.asarray(x_N)
    if x_N.ndim != 1:
        raise ValueError(f"{name} must be a flat [N] array with N = B*group_size, got shape {x_N.shape}.")
    if x_N.shape[0] % group_size:
        raise ValueError(f"{name} has {x_N.shape[0]} rows, which is not a multiple of group_size={group_size}.")
    x_N = x_N.astype(np.float64)
    if not np.all(np.isfinite(x_N)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    return x_N.reshape(-1, group_size)


def _fraction(num: int, den: int) -> float:
    return float(num) / float(max(den, 1))


def zero_variance_filter(metric_N, group_size: int, keep_singletons: bool = True):
    """DAPO dynamic sampling: keep groups whose metric is not constant.

    verl keeps a group iff ``std(metric_g) > 0`` or the group has size 1. We test ``max - min > 0``, which is the
    same condition in exact arithmetic but immune to rounding (``np.std([0.1]*3)`` is 1.4e-17, not 0).
    DLER filters on the PRE-penalty correctness score (``seq_reward``): pass the score, not the reward.

    Args:
      metric_N: [N] per-response metric (acc, score, seq_reward, ...), groups contiguous.
      group_size: G (static). With G == 1 every group is a singleton.
      keep_singletons: keep size-1 groups (verl: True). False drops them (their std is 0).
    Returns:
      keep_B: [B] bool; metrics: kept_fraction, num_kept, num_groups, zero_variance_fraction.
    """
    metric_BxG = _group_view(metric_N, group_size, "metric_N")
    varies_B = np.ptp(metric_BxG, axis=1) > 0
    keep_B = varies_B | (keep_singletons and group_size == 1)
    num_groups = metric_BxG.shape[0]
    metrics = {
        "kept_fraction": _fraction(keep_B.sum(), num_groups),
        "num_kept": float(keep_B.sum()),
        "num_groups": float(num_groups),
        "zero_variance_fraction": _fraction((~varies_B).sum(), num_groups),
    }
    return keep_B, metrics


# DLER's "curriculum-based filtering" IS dynamic sampling on the pre-penalty score:
# the paper describes the curriculum as an implicit effect of this filter, so there is no separate code.
dler_filter = zero_variance_filter


def _percentile(values, q: float, method: str) -> float:
    """numpy percentile as the LSPO code calls it: ``np.percentile(values, 100*q)`` (method selects the rule)."""
    return float(np.percentile(values, 100.0 * q, method=method))


def lspo_length_filter(length_N, group_size: int, low: float = 0.30, high: float = 0.60, max: float = 0.90,
                       percentile_method: str = "linear", candidates_B=None, min_candidates: int = 0):
    """LSPO length-aware filter.

    ``L(q)`` = mean response length of the group. Among the candidate groups (the accuracy-kept ones) the
    thresholds ``Q(low), Q(high), Q(max)`` are percentiles of ``L``; a candidate is kept iff
    ``L <= Q(low)`` or ``Q(high) <= L <= Q(max)``. Thresholds are computed per generation round.

    Presets: ``LSPO_THRESHOLDS_CODE = (0.30, 0.60, 0.90)`` (released script, the default here) and
    ``LSPO_THRESHOLDS_NOTES = (0.30, 0.65, 0.95)`` (paper summary): pass them as ``low, high, max``.

    Args:
      length_N: [N] response lengths in tokens (response-mask sums; truncated responses included).
      group_size: G.
      low, high, max: quantile levels in [0, 1] with high <= max (``max`` keeps the config-key name filter_max).
      percentile_method: "linear" (``np.percentile`` default, the released code) or "inverted_cdf" (the paper's
        ``Q(a) = inf{t : F(t) >= a}``).
      candidates_B: [B] bool, the accuracy-kept groups (e.g. ``zero_variance_filter(acc_N, G)[0]``); None = all.
      min_candidates: [INFERRED switch] if fewer candidates than this remain, keep all of them without banding.
        0 (default) = released code, where 2 distinct candidates under "linear" keep only the shorter one;
        3 gives the paper's stated intent ("fewer than ~3 accuracy-kept prompts ... effectively keeps all").
    Returns:
      keep_B: [B] bool (subset of candidates); metrics: kept_fraction, kept_of_candidates, num_candidates,
      p_low, p_high, p_max (NaN when there are no candidates).
    """
    if percentile_method not in ("linear", "inverted_cdf"):
        raise ValueError(f"percentile_method must be 'linear' or 'inverted_cdf', got {percentile_method!r}.")
    if not (0.0 <= low <= 1.0 and 0.0 <= high <= max <= 1.0):
        raise ValueError(f"LSPO thresholds need 0 <= low <= 1 and 0 <= high <= max <= 1, got {(low, high, max)}.")
    mean_len_B = _group_view(length_N, group_size, "length_N").mean(axis=1)
    num_groups = mean_len_B.shape[0]
    if candidates_B is None:
        cand_B = np.ones(num_groups, dtype=bool)
    else:
        cand_B = np.asarray(candidates_B, dtype=bool)
        if cand_B.shape != (num_groups,):
            raise ValueError(f"candidates_B must have shape ({num_groups},), got {cand_B.shape}.")
    cand_len = mean_len_B[cand_B]
    p_lo = p_hi = p_mx = float("nan")
    if cand_len.size == 0:
        keep_B = np.zeros(num_groups, dtype=bool)
    elif cand_len.size < min_candidates:
        keep_B = cand_B.copy()
    else:
        p_lo, p_hi, p_mx = (_percentile(cand_len, q, percentile_method) for q in (low, high, max))
        band_B = (mean_len_B <= p_lo) | ((mean_len_B >= p_hi) & (mean_len_B <= p_mx))
        keep_B = cand_B & band_B
    metrics = {
        "kept_fraction": _fraction(keep_B.sum(), num_groups),
        "kept_of_candidates": _fraction(keep_B.sum(), cand_len.size),
        "num_candidates": float(cand_len.size),
        "p_low": p_lo, "p_high": p_hi, "p_max": p_mx,
    }
    return keep_B, metrics


def accuracy_band_filter(correct_N, group_size: int, low: float = 0.2, high: float = 0.8):
    """TraceRL group filter: drop groups with accuracy > high or < low.

    With G = 16 only groups with 4..12 correct survive. Bounds are inclusive (acc == 0.2 or 0.8 is kept).

    Args:
      correct_N: [N] correctness in {0, 1} (or a score in [0, 1]); group accuracy = its group mean.
      group_size: G.
      low, high: accuracy band, 0 <= low <= high <= 1.
    Returns:
      keep_B: [B] bool; metrics: kept_fraction, mean_accuracy, above_fraction, below_fraction.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"accuracy band needs 0 <= low <= high <= 1, got {(low, high)}.")
    acc_B = _group_view(correct_N, group_size, "correct_N").mean(axis=1)
    above_B, below_B = acc_B > high, acc_B < low
    keep_B = ~(above_B | below_B)
    num_groups = acc_B.shape[0]
    metrics = {
        "kept_fraction": _fraction(keep_B.sum(), num_groups),
        "mean_accuracy": float(acc_B.mean()) if num_groups else float("nan"),
        "above_fraction": _fraction(above_B.sum(), num_groups),
        "below_fraction": _fraction(below_B.sum(), num_groups),
    }
    return keep_B, metrics


@register_filter("none")
def _keep_all(arrays, hp):
    return np.ones(np.shape(arrays["score_N"])[0] // hp.group_size, bool), {}


@register_filter("zero_variance")
def _zero_variance(arrays, hp):
    """DAPO dynamic sampling on the pre-penalty score (DLER filters on the same score)."""
    return zero_variance_filter(arrays["score_N"], hp.group_size)


@register_filter("accuracy_band")
def _accuracy_band(arrays, hp):
    return accuracy_band_filter(np.asarray(arrays["score_N"]) > 0, hp.group_size, hp.band_low, hp.band_high)


@dataclasses.dataclass(frozen=True)
class GroupAccumulator:
    """Kept groups gathered across generation rounds (plain data, no logic).

    Attributes:
      group_size: G.
      train_groups: number of groups a training batch needs.
      arrays: a pytree (a name -> array mapping, or the caller's own dataclass) whose leaves have leading axis
        ``num_groups * G`` (rows of kept groups, groups contiguous); None before the first round.
      num_groups: groups currently held (never more than ``train_groups``).
      rounds: generation rounds accumulated so far (for a ``max_num_gen_batches`` cap).
      dropped_groups: kept groups discarded because the batch was already full (surplus).
    """
    group_size: int
    train_groups: int
    arrays: Any = None
    num_groups: int = 0
    rounds: int = 0
    dropped_groups: int = 0

    @property
    def is_full(self) -> bool:
        return self.num_groups >= self.train_groups


def empty_accumulator(group_size: int, train_groups: int) -> GroupAccumulator:
    """A new accumulator holding no groups."""
    if group_size < 1 or train_groups < 1:
        raise ValueError(f"group_size and train_groups must be >= 1, got {group_size} and {train_groups}.")
    return GroupAccumulator(group_size=group_size, train_groups=train_groups)


def accumulate_groups(acc: GroupAccumulator, batch, keep_B):
    """Append the kept groups of one generation round; never hold more than ``train_groups``.

    Groups are taken in batch order; once ``train_groups`` groups are held the rest of the round is dropped.
    The rows are any pytree (a mapping of arrays, or a dataclass pytree: the rollout stage passes its typed rows),
    so this module needs no knowledge of the caller's row type.

    Args:
      acc: the accumulator so far (not modified).
      batch: pytree whose leaves have leading axis ``N = B*G`` (rows, groups contiguous); the same structure every
        round.
      keep_B: [B] bool from a filter.
    Returns:
      (new accumulator, is_full). When full, ``new.arrays`` hold exactly ``train_groups * G`` rows.
    """
    keep_B = np.asarray(keep_B, dtype=bool)
    num_b, g = keep_B.shape[0], acc.group_size
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    if acc.arrays is not None and treedef != jax.tree_util.tree_structure(acc.arrays):
        raise ValueError(f"the round's rows {treedef} differ in structure from the accumulated rows "
                         f"{jax.tree_util.tree_structure(acc.arrays)}.")
    for path, x in leaves:
        if np.shape(x)[0] != num_b * g:
            raise ValueError(f"rows{jax.tree_util.keystr(path)} has {np.shape(x)[0]} rows, expected {num_b}*{g} "
                             f"from keep_B.")
    kept_b = np.flatnonzero(keep_B)
    room = acc.train_groups - acc.num_groups
    take_b, dropped = kept_b[:room], max(kept_b.size - room, 0)
    rows = (take_b[:, None] * g + np.arange(g)[None, :]).reshape(-1)
    new = jax.tree.map(lambda x: np.asarray(x)[rows], batch)
    arrays = new if acc.arrays is None else jax.tree.map(lambda a, b: np.concatenate([a, b], axis=0), acc.arrays, new)
    new_acc = dataclasses.replace(acc, arrays=arrays, num_groups=acc.num_groups + take_b.size,
                                  rounds=acc.rounds + 1, dropped_groups=acc.dropped_groups + dropped)
    return new_acc, new_acc.is_full
