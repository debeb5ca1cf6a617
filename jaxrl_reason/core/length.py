"""Length-based reward shaping: DAPO overlong penalty, DLER truncation, DA-DLER difficulty-aware budgets.

Per-response arrays are flat `[N]` with groups contiguous (`group_size = G`, static), as in advantages.py.

Reward shapings register under a name in `REWARD_SHAPINGS` (`@register_shaping`) with one signature,
  `(arrays, hp) -> (reward_N, metrics)`,
where `arrays` holds the round's `score_N` (correctness), `length_N`, `truncated_N` and the running `reward_N`, and
`hp` the frozen reward hyper-parameters (`group_size`, `max_new_tokens`, `overlong_buffer`, ...). The rollout stage
starts from the base named by `reward.kind` (binary, signed) and applies the names of `reward.shaping` in order.
Shapings that belong to one method (DLER's truncation) register in that method's module.
"""
import numbers
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxrl_reason.core.registry import registrar

REWARD_SHAPINGS: dict[str, Callable] = {}
register_shaping = registrar(REWARD_SHAPINGS)  # @register_shaping(name) on `(arrays, hp) -> (reward_N, metrics)`


def _float(x):
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dapo_overlong_penalty(length_N, max_len: int, buffer: int, factor: float = 1.0):
    """DAPO soft overlong punishment `[N]` (verl `DAPORewardManager`).

      expected = max_len − buffer;  r_len = min(−(len − expected)/buffer · factor, 0)
    0 up to `expected`, linear down to −factor at `max_len` (linear beyond it, as verl; TRL returns −1 there).
    Add it to the correctness score: reward = score + r_len.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong buffer must satisfy 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}.")
    expected = max_len - buffer
    return jnp.minimum(-(_float(length_N) - expected) / buffer * factor, 0.0)


def dler_truncation_reward(score_N, truncated_N, stop_penalty_coef: float = 0.0):
    """DLER truncation reward `[N]`.

    reward = score · (stop_penalty_coef if truncated else 1). `stop_penalty_coef=0.0` is the paper (truncated ⇒ 0);
    0.1 is the released code's `stop_properly_penalty.penalty_coef`. [switch; paper vs code]
    """
    truncated = jnp.asarray(truncated_N, bool)
    return _float(score_N) * jnp.where(truncated, stop_penalty_coef, 1.0)


def _check_tiers(thresholds: Sequence[float], budgets: Sequence[int]) -> None:
    thresholds, budgets = tuple(thresholds), tuple(budgets)
    if len(budgets) != len(thresholds) + 1:
        raise ValueError(f"DA-DLER needs len(budgets) == len(thresholds) + 1, "
                         f"got {len(budgets)} and {len(thresholds)}.")
    if any(not 0.0 <= d <= 1.0 for d in thresholds) or any(a >= b for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"DA-DLER thresholds must be strictly increasing values in [0, 1], got {thresholds}.")
    if any(b <= 0 for b in budgets):
        raise ValueError(f"DA-DLER budgets must be positive token counts, got {budgets}.")


def da_dler_budget(score_N, group_size: int, thresholds: Sequence[float] = (0.5,),
                   budgets: Sequence[int] = (4000, 2000), boundary_to_upper_tier: bool = True):
    """DA-DLER difficulty-aware truncation budget per response `[N]` int32.

    c(q) = #correct / G (correct = score > 0) over the group of prompt q. Thresholds d_1 < ... < d_n split [0, 1]
    into n+1 tiers ordered by increasing c; tier k (c between d_k and d_{k+1}) uses budgets[k]. Paper: one
    threshold 0.5, budgets (4000, 2000): c ≥ 0.5 ("reliably solved") ⇒ 2000 tokens, c < 0.5 ⇒ 4000.

    Args:
      boundary_to_upper_tier: c == d_k belongs to the upper (easier) tier (paper's "d_i ≤ c < d_{i+1}");
        False puts it in the lower tier. [INFERRED switch]
    """
    _check_tiers(thresholds, budgets)
    score_N = _float(score_N)
    bad_group = not isinstance(group_size, numbers.Integral) or group_size < 1
    if score_N.ndim != 1 or bad_group or score_N.shape[0] % group_size:
        raise ValueError(f"score_N must be [N] with N a multiple of a positive int group_size, got {score_N.shape} "
                         f"and {group_size!r}.")
    n_correct_B = jnp.sum((score_N > 0).reshape(-1, group_size).astype(jnp.float32), axis=1)
    c_B = n_correct_B / group_size  # one correctly rounded division: k/G == d compares exactly in float32
    d = jnp.asarray(thresholds, jnp.float32)
    above_BxD = c_B[:, None] >= d if boundary_to_upper_tier else c_B[:, None] > d
    tier_B = jnp.sum(above_BxD.astype(jnp.int32), axis=1)
    return jnp.repeat(jnp.asarray(budgets, jnp.int32)[tier_B], group_size)


def da_dler_truncation_reward(score_N, length_N, truncated_N, group_size: int,
                              thresholds: Sequence[float] = (0.5,), budgets: Sequence[int] = (4000, 2000),
                              stop_penalty_coef: float = 0.0, boundary_to_upper_tier: bool = True,
                              c_after_budget: bool = False, virtual_uses_stop_penalty: bool = True):
    """DA-DLER reward `[N]`: DLER truncation with a per-prompt budget ([INFERRED]).

    Rollouts are generated with the largest budget; c(q) sets L_T(q) (`da_dler_budget`); a response with
    length > L_T(q) is "virtually truncated". Then reward = score · (coef if truncated else 1).

    Args:
      score_N: pre-penalty correctness score (also what the dynamic-sampling filter should read).
      length_N: response lengths in tokens; truncated_N: the sampler's hit-max-length flag.
      c_after_budget: False (default) counts correctness before any budget; True counts a response as correct
        for c(q) only if it is also within the tightest budget min(budgets) and not truncated. [INFERRED switch]
      virtual_uses_stop_penalty: True treats virtually truncated responses like truncated ones
        (score · coef); False gives them reward 0. Identical when coef = 0. [INFERRED switch]

    Returns:
      (reward_N, {"budget_N": int32 [N], "truncated_N": bool [N] (real or virtual truncation)}).
    """
    score_N = _float(score_N)
    length_N = jnp.asarray(length_N)
    truncated = jnp.asarray(truncated_N, bool)
    correct = score_N > 0
    if c_after_budget:
        correct = correct & (length_N <= min(budgets)) & ~truncated
    budget_N = da_dler_budget(correct.astype(jnp.float32), group_size, thresholds, budgets, boundary_to_upper_tier)
    virtual = length_N > budget_N
    eff_truncated = truncated | virtual
    reward = dler_truncation_reward(score_N, eff_truncated, stop_penalty_coef)
    if not virtual_uses_stop_penalty:
        reward = jnp.where(virtual & ~truncated, 0.0, reward)
    return reward, {"budget_N": budget_N, "truncated_N": eff_truncated}


@register_shaping("binary")
def _binary(arrays, hp):
    """Base reward: the correctness score itself ({0, 1} for a verifier)."""
    return np.asarray(arrays["score_N"], np.float32).copy(), {}


@register_shaping("signed")
def _signed(arrays, hp):
    """Base reward of the DAPO verifier: {-1, +1} from a {0, 1} score."""
    return 2.0 * np.asarray(arrays["score_N"], np.float32) - 1.0, {}


@register_shaping("overlong")
def _overlong(arrays, hp):
    """DAPO soft overlong punishment added to the running reward (`hp.overlong_buffer` tokens before the budget)."""
    penalty = np.asarray(dapo_overlong_penalty(arrays["length_N"], hp.max_new_tokens, int(hp.overlong_buffer),
                                               hp.overlong_factor))
    return arrays["reward_N"] + penalty, {"overlong_penalty": float(penalty.mean())}
