"""REPRO ("RePro", arXiv 2512.01925) process reward: answer-likelihood surrogate, dual score, segment selection.

The least certain method of the project: no code was available, every formula is [NOTES]
(third-party notes on the paper) or [INFERRED]; each inferred choice below is a function argument.

Pipeline, per response ``n`` with ``K`` selected segments (slots, original order, valid ones first):
  J_NxK   = answer_loglik_mean(logp of the answer tokens after each selected prefix)     surrogate J~
  S_m     = magnitude_score(J, J_b);  S_s = stability_score(J, valid)                    dual score
  S       = composite_score(S_m, S_s, w);  r = process_rewards(S, valid)                  r_1 = S_1, r_j = S_j - S_{j-1}
  r'      = normalize_process_rewards(r, valid)                                          z-score (scope INFERRED)
  A_proc  = process_advantage(r', seg_of_token, sel_idx, sel_valid, mask)                return-to-go on tokens
  A       = combine_advantages(A_outcome, A_proc, alpha=0.1)
Host side: ``segment_boundaries`` splits a text / token sequence on "\\n\\n", ``segment_layout`` turns the
boundaries of a batch into fixed-shape arrays, ``select_segments_by_entropy`` keeps the top-k.
Responses with fewer than 2 selected segments get zero process advantage.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_JB_FLOOR = 1e-6  # |J_b| floor: keeps J~ / J_b finite when the baseline likelihood is ~0


def answer_loglik_mean(logp_answer_KxA, answer_mask_KxA):
    """Surrogate ``J~ = (1/|a|) sum_k log pi(a^(k) | q, tau_<=t, a^(<k))`` [NOTES].

    Args:
      logp_answer_KxA: [..., A] log-probs of the ground-truth answer tokens (one row per scored prefix; the
        baseline J_b is the row with an empty reasoning prefix).
      answer_mask_KxA: [..., A] 1 for real answer tokens.
    Returns:
      J_K: [...] float32 mean log-likelihood (0 for a row with no answer token: denominator max(count, 1)).
    """
    m = answer_mask_KxA.astype(jnp.float32)
    total = jnp.sum(logp_answer_KxA.astype(jnp.float32) * m, axis=-1)
    return total / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def magnitude_score(J_K, J_b, form: str = "one_minus_tanh"):
    """Magnitude score from ``Delta + 1 = J~ / J_b`` (the sign is [INFERRED]).

    ``form="one_minus_tanh"`` (default, [INFERRED]): ``S = 1 - tanh(J / J_b)`` in (0, 1]: 1 when the answer is
    certain (J = 0), ~0.24 for no progress (J = J_b), -> 0 when reasoning makes the answer less likely.
    ``form="notes"`` [NOTES, verbatim]: ``S = tanh(J / J_b) + 1`` (lies in [1, 2), inconsistent with the stated
    range; kept for comparison). ``J_b`` (<= 0) is guarded: ``J_b <- -max(|J_b|, 1e-6)``.

    Args:
      J_K: [..., K] surrogate at each selected boundary. J_b: baseline broadcastable to J_K (e.g. [N, 1]).
    Returns:
      S_m: [..., K] float32.
    """
    if form not in ("one_minus_tanh", "notes"):
        raise ValueError(f"form must be 'one_minus_tanh' or 'notes', got {form!r}.")
    J_b = -jnp.maximum(jnp.abs(jnp.asarray(J_b, jnp.float32)), _JB_FLOOR)
    t = jnp.tanh(jnp.asarray(J_K, jnp.float32) / J_b)
    return 1.0 - t if form == "one_minus_tanh" else t + 1.0


def _ema_over_valid(J_NxK, valid_NxK, ema: float):
    """EMA ``s_j = ema * s_prev + (1 - ema) * J_j`` over the valid points in order; the first valid point is J."""
    def step(carry, xs):
        prev, seen = carry
        j, v = xs
        s = jnp.where(seen, ema * prev + (1.0 - ema) * j, j)
        return (jnp.where(v, s, prev), seen | v), jnp.where(v, s, j)
    init = (jnp.zeros(J_NxK.shape[:-1], jnp.float32), jnp.zeros(J_NxK.shape[:-1], bool))
    _, out = jax.lax.scan(step, init, (jnp.moveaxis(J_NxK, -1, 0), jnp.moveaxis(valid_NxK, -1, 0)))
    return jnp.moveaxis(out, 0, -1)


def stability_score(J_K, valid_K, ema: float | None = None, single_point_value: float = 1.0):
    """Prefix Kendall-τ of J~ against step order, rescaled to [0, 1] (normalization [INFERRED]).

    ``S_t = 1/2 + 1/2 * sum_{i<j<=t} sign(J_j - J_i) / (n_t (n_t - 1) / 2)`` over the valid points up to slot t
    (Kendall τ-a: ties count 0). ``n_t < 2`` -> ``single_point_value`` ([INFERRED]: 1.0 or 0.5).
    ``ema`` in [0, 1) [INFERRED]: smooth J over the valid points before ranking; None = no smoothing.

    Args:
      J_K: [..., K]. valid_K: [..., K] bool (any pattern; order = slot order).
    Returns:
      S_s: [..., K] float32, 0 at invalid slots.
    """
    J = jnp.asarray(J_K, jnp.float32)
    valid = jnp.asarray(valid_K).astype(bool)
    if ema is not None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) or None, got {ema}.")
        J = _ema_over_valid(J, valid, ema)
    k = J.shape[-1]
    upper = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]  # [i, j]: i < j
    pair = valid[..., :, None] & valid[..., None, :] & upper
    sign_KxK = jnp.where(pair, jnp.sign(J[..., None, :] - J[..., :, None]), 0.0)
    concordance = jnp.cumsum(jnp.sum(sign_KxK, axis=-2), axis=-1)  # sum over pairs with j <= t
    n_t = jnp.cumsum(valid.astype(jnp.float32), axis=-1)
    pairs = jnp.maximum(n_t * (n_t - 1.0) / 2.0, 1.0)
    score = jnp.where(n_t >= 2, 0.5 + 0.5 * concordance / pairs, single_point_value)
    return jnp.where(valid, score, 0.0)


def composite_score(S_m, S_s, w: float, w_on: str = "stability"):
    """Composite ``S = (1 - w) S_m + w S_s`` (``w_on="stability"``) or ``w S_m + (1 - w) S_s`` (``"magnitude"``).

    The two notes on the paper disagree on which score w weights [NOTES], hence the switch.
    """
    if w_on not in ("stability", "magnitude"):
        raise ValueError(f"w_on must be 'stability' or 'magnitude', got {w_on!r}.")
    if isinstance(w, (int, float)) and not 0.0 <= w <= 1.0:
        raise ValueError(f"w must be in [0, 1], got {w}.")
    w_stab = w if w_on == "stability" else 1.0 - w
    return (1.0 - w_stab) * S_m + w_stab * S_s


def process_rewards(S_K, valid_K=None):
    """Per-segment process reward ``r_j = S_j - S_{j-1}``, ``r_1 = S_1`` over valid slots.

    "Previous" means the previous VALID slot. Args: S_K [..., K]; valid_K [..., K] bool or None (all valid).
    Returns r_K [..., K] float32, 0 at invalid slots.
    """
    S = jnp.asarray(S_K, jnp.float32)
    valid = jnp.ones(S.shape, bool) if valid_K is None else jnp.asarray(valid_K).astype(bool)
    pos = jnp.broadcast_to(jnp.arange(S.shape[-1]), S.shape)
    last_valid = jax.lax.cummax(jnp.where(valid, pos, -1), axis=S.ndim - 1)
    prev_idx = jnp.concatenate([jnp.full(S.shape[:-1] + (1,), -1), last_valid[..., :-1]], axis=-1)
    prev = jnp.where(prev_idx >= 0, jnp.take_along_axis(S, jnp.maximum(prev_idx, 0), axis=-1), 0.0)
    return jnp.where(valid, S - prev, 0.0)


def normalize_process_rewards(r_NxK, valid_NxK, scope: str = "batch", eps: float = 1e-6, min_segments: int = 2):
    """z-score the process rewards separately from the outcome reward (scope [INFERRED]).

    ``r' = (r - mean) / (std + eps)`` with population std over the valid slots of rows that have at least
    ``min_segments`` valid slots (other rows get 0: they receive no process advantage).
    scope: "batch" (one mean/std over all rows), "response" (per row) or "none" (only masking).

    Args: r_NxK [N, K]; valid_NxK [N, K] bool. Returns r_norm_NxK [N, K] float32.
    """
    if scope not in ("batch", "response", "none"):
        raise ValueError(f"scope must be 'batch', 'response' or 'none', got {scope!r}.")
    r = jnp.asarray(r_NxK, jnp.float32)
    valid = jnp.asarray(valid_NxK).astype(bool)
    valid = valid & (jnp.sum(valid, axis=-1, keepdims=True) >= min_segments)
    if scope == "none":
        return jnp.where(valid, r, 0.0)
    axes = None if scope == "batch" else -1
    m = valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m, axis=axes, keepdims=True), 1.0)
    mean = jnp.sum(r * m, axis=axes, keepdims=True) / count
    std = jnp.sqrt(jnp.sum(jnp.square(r - mean) * m, axis=axes, keepdims=True) / count)
    return jnp.where(valid, (r - mean) / (std + eps), 0.0)


def select_segments_by_entropy(first_token_entropy_NxM, seg_valid_NxM, k: int):
    """Keep the top-k segments by first-token entropy, in original order [NOTES].

    Ties go to the earlier segment. Args: first_token_entropy_NxM [N, M]; seg_valid_NxM [N, M] bool (candidate
    segments, i.e. those ending with a delimiter); k static, 1 <= k.
    Returns (sel_idx_Nxk int32 segment indices, ascending among valid slots; sel_valid_Nxk bool, valid slots
    first). Rows with fewer than k candidates have invalid trailing slots (index 0).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    m = first_token_entropy_NxM.shape[-1]
    valid = jnp.asarray(seg_valid_NxM).astype(bool)
    score = jnp.where(valid, jnp.asarray(first_token_entropy_NxM, jnp.float32), -jnp.inf)
    picked = jnp.argsort(-score, axis=-1, stable=True)[..., :k]
    if k > m:  # more slots than segments: pad with invalid slots
        picked = jnp.concatenate([picked, jnp.zeros(picked.shape[:-1] + (k - m,), picked.dtype)], axis=-1)
    picked_valid = jnp.take_along_axis(valid, picked, axis=-1) & (jnp.arange(k) < m)
    order = jnp.argsort(jnp.where(picked_valid, picked, m + jnp.arange(k)), axis=-1)
    sel_idx = jnp.take_along_axis(picked, order, axis=-1)
    sel_valid = jnp.take_along_axis(picked_valid, order, axis=-1)
    return jnp.where(sel_valid, sel_idx, 0).astype(jnp.int32), sel_valid


def process_advantage(r_norm_NxK, seg_of_token_NxT, sel_idx_NxK, sel_valid_NxK, mask_NxT,
                      before_first: str = "following", after_last: str = "zero", min_segments: int = 2):
    """Token-level process advantage: return-to-go over the selected segments.

    ``A~_t = sum_{i >= j(t)} r'_i`` where ``j(t)`` is the selected segment containing token t or, if t's segment
    is not selected, the nearest FOLLOWING selected one (the selected boundaries partition the response).
    [INFERRED switches]: ``before_first="following"`` gives tokens before the first selected segment its value,
    ``"zero"`` gives them 0; ``after_last="zero"`` gives tokens after the last selected boundary (conclusion) 0,
    ``"last"`` gives them the last segment's value r'_K. Rows with fewer than ``min_segments`` valid selected
    segments get 0.

    Args:
      r_norm_NxK: [N, K] normalized process rewards per selected slot.
      seg_of_token_NxT: [N, T] int segment index of each token (``segment_layout``); < 0 = not a response token.
      sel_idx_NxK, sel_valid_NxK: from ``select_segments_by_entropy`` (valid slots in ascending segment order).
      mask_NxT: [N, T] response mask.
    Returns:
      adv_NxT: [N, T] float32.
    """
    if before_first not in ("following", "zero") or after_last not in ("zero", "last"):
        raise ValueError(f"before_first must be following|zero and after_last zero|last, got {before_first!r}, "
                         f"{after_last!r}.")
    valid = jnp.asarray(sel_valid_NxK).astype(bool)
    r = jnp.where(valid, jnp.asarray(r_norm_NxK, jnp.float32), 0.0)
    rtg_NxK = jnp.flip(jnp.cumsum(jnp.flip(r, -1), axis=-1), -1)
    seg = seg_of_token_NxT[:, :, None]
    sel = jnp.where(valid, sel_idx_NxK, -1)[:, None, :]
    big = jnp.iinfo(jnp.int32).max
    following = jnp.where(sel >= seg, sel, big)  # [N, T, K]: selected segments at or after the token's segment
    slot = jnp.argmin(following, axis=-1)
    has_following = jnp.min(following, axis=-1) < big
    adv = jnp.take_along_axis(rtg_NxK, slot, axis=-1)
    last_slot = jnp.argmax(jnp.where(valid, jnp.arange(valid.shape[-1]), -1), axis=-1)
    last_val = jnp.take_along_axis(rtg_NxK, last_slot[:, None], axis=-1)
    adv = jnp.where(has_following, adv, last_val if after_last == "last" else 0.0)
    if before_first == "zero":
        first_sel = jnp.min(jnp.where(valid, sel_idx_NxK, big), axis=-1, keepdims=True)
        adv = jnp.where(seg_of_token_NxT < first_sel, 0.0, adv)
    enough = jnp.sum(valid, axis=-1, keepdims=True) >= min_segments
    return jnp.where(enough & (mask_NxT > 0) & (seg_of_token_NxT >= 0), adv, 0.0)


def combine_advantages(outcome_adv_NxT, process_adv_NxT, alpha: float = 0.1):
    """``A_t = A_outcome_t + alpha * A~_t`` (alpha = 0.1 per [NOTES])."""
    return outcome_adv_NxT + alpha * process_adv_NxT


def segment_boundaries(seq, delimiter: str | int | Sequence[int] | frozenset = "\n\n") -> np.ndarray:
    """Host helper: end offsets (exclusive) of the delimiter-terminated segments.

    Occurrences are found left to right without overlap; segment j spans ``[b_{j-1}, b_j)`` (b_{-1} = 0) and
    includes its delimiter; whatever follows the last boundary is the conclusion (not a segment).
    ``seq`` is a str (delimiter a str; char offsets) or a sequence of token ids (delimiter an int, a sequence of
    ints matched contiguously, or a (frozen)set of ints any of which ends a segment; token offsets).
    Pass only the thinking part. Returns int64 [num_boundaries].
    """
    if isinstance(seq, str):
        if not isinstance(delimiter, str) or not delimiter:
            raise ValueError("A text sequence needs a non-empty str delimiter.")
        out, start = [], seq.find(delimiter)
        while start >= 0:
            out.append(start + len(delimiter))
            start = seq.find(delimiter, start + len(delimiter))
        return np.asarray(out, np.int64)
    ids = np.asarray(seq, np.int64).reshape(-1)
    if isinstance(delimiter, (set, frozenset)):
        return np.flatnonzero(np.isin(ids, np.asarray(sorted(delimiter), np.int64))).astype(np.int64) + 1
    if isinstance(delimiter, str):
        raise ValueError("A token-id sequence needs an int, a sequence of ints or a set of ints as delimiter.")
    pattern = np.atleast_1d(np.asarray(delimiter, np.int64))
    out, t, p = [], 0, pattern.size
    while p and t + p <= ids.size:
        if np.array_equal(ids[t:t + p], pattern):
            out.append(t + p)
            t += p
        else:
            t += 1
    return np.asarray(out, np.int64)


def segment_layout(boundaries_N: Sequence[np.ndarray], length_N, T: int, max_segments: int | None = None):
    """Host helper: fixed-shape segment arrays for a batch.

    Args:
      boundaries_N: per response, token offsets from ``segment_boundaries`` (increasing, each in (0, length]).
      length_N: [N] number of response tokens (thinking part). T: padded response length.
      max_segments: M, the number of candidate slots; None = the largest count in the batch (exact). Boundaries
        beyond M are ignored (their tokens join the conclusion).
    Returns dict of numpy arrays:
      seg_of_token_NxT int32: segment index of each token (count of boundaries <= t; the conclusion gets the
        number of boundaries), -1 at t >= length;
      seg_start_NxM / seg_end_NxM int32: first token and end offset of each segment (gather the first-token
        entropy with ``take_along_axis(entropy_NxT, seg_start_NxM, 1)``); seg_valid_NxM bool.
    """
    length_N = np.asarray(length_N, np.int64)
    if len(boundaries_N) != length_N.shape[0]:
        raise ValueError(f"Got {len(boundaries_N)} boundary lists for {length_N.shape[0]} lengths.")
    if np.any(length_N < 0) or np.any(length_N > T):
        raise ValueError(f"Every length must lie in [0, T={T}], got {length_N}.")
    if max_segments is not None and max_segments < 1:
        raise ValueError(f"max_segments must be >= 1 or None, got {max_segments}.")
    bounds = [np.asarray(b, np.int64).reshape(-1) for b in boundaries_N]
    for b, n in zip(bounds, length_N):
        if b.size and (np.any(np.diff(b) <= 0) or b[0] <= 0 or b[-1] > n):
            raise ValueError(f"Boundaries must increase strictly within (0, length], got {b} for length {n}.")
    m = max_segments if max_segments is not None else max([b.size for b in bounds] + [1])
    num = len(bounds)
    seg_of_token = np.full((num, T), -1, np.int32)
    seg_start = np.zeros((num, m), np.int32)
    seg_end = np.zeros((num, m), np.int32)
    seg_valid = np.zeros((num, m), bool)
    for n, (b, length) in enumerate(zip(bounds, length_N)):
        b = b[:m]
        seg_of_token[n, :length] = np.searchsorted(b, np.arange(length), side="right")
        seg_end[n, :b.size] = b
        seg_start[n, 1:b.size] = b[:-1]
        seg_valid[n, :b.size] = True
    return {"seg_of_token_NxT": seg_of_token, "seg_start_NxM": seg_start, "seg_end_NxM": seg_end,
            "seg_valid_NxM": seg_valid}
