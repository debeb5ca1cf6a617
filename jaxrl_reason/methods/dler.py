"""DLER and DA-DLER (arXiv 2510.15110): length reduction by truncation alone.

DLER: a response that hits the budget L_T (= rollout.max_new_tokens) earns `score * dler.stop_penalty_coef` (0 in
the paper; the released code uses 0.1), advantages are the group mean baseline with batch whitening, clip-higher
0.2 / 0.28 with dual clip 10, and dynamic sampling drops the groups whose pre-penalty score does not vary (the
paper's "curriculum" is that filter's effect, not separate code). A k2 KL loss 5e-4 keeps the policy close.

DA-DLER: the budget of a prompt depends on its group pass rate c(q): with thresholds d_1 < ... and budgets
(fractions of rollout.max_new_tokens, hardest tier first), easy prompts get a tighter budget; a response longer than
its prompt's budget counts as truncated. The math is in `core/length.py`.
"""
from __future__ import annotations

import numpy as np
from ml_collections import config_dict

from jaxrl_reason.core import length as length_lib
from jaxrl_reason.methods.hooks import Method


def section(config) -> config_dict.ConfigDict:
    d = config_dict.ConfigDict()
    d.stop_penalty_coef = 0.0  # reward of a truncated response = score * coef (0.0 paper, 0.1 released code)
    d.thresholds = ()  # DA-DLER pass-rate thresholds, increasing; empty = one budget for every prompt
    d.budgets = ()  # DA-DLER: one more budget than thresholds, fractions of rollout.max_new_tokens, easiest last
    return d


@length_lib.register_shaping("dler_truncation")
def dler_truncation(arrays, hp):
    """A truncated response earns `reward * dler.stop_penalty_coef`."""
    reward = length_lib.dler_truncation_reward(arrays["reward_N"], arrays["truncated_N"], hp.dler.stop_penalty_coef)
    return np.asarray(reward), {}


def budgets_in_tokens(hp) -> tuple[int, ...]:
    return tuple(int(round(b * hp.max_new_tokens)) for b in hp.dler.budgets)


@length_lib.register_shaping("da_dler")
def da_dler_truncation(arrays, hp):
    """DLER truncation at a per-prompt budget set by the group pass rate; logs the fraction of responses that
    only the tighter budget truncates."""
    truncated = arrays["truncated_N"]
    reward, info = length_lib.da_dler_truncation_reward(
        arrays["score_N"], arrays["length_N"], truncated, hp.group_size, tuple(hp.dler.thresholds),
        budgets_in_tokens(hp), hp.dler.stop_penalty_coef)
    return np.asarray(reward), {"da_dler_virtual_trunc": float(np.mean(np.asarray(info["truncated_N"]) & ~truncated))}


def validate(config) -> None:
    d = config.dler
    if "da_dler" not in config.reward.shaping:
        return
    if len(d.budgets) != len(d.thresholds) + 1:
        raise ValueError("dler.budgets needs exactly one more entry than dler.thresholds.")
    if not all(0 < b <= 1 for b in d.budgets):
        raise ValueError("dler.budgets are fractions of rollout.max_new_tokens in (0, 1].")


DLER = {
    "reward.kind": "binary",
    "reward.shaping": ("dler_truncation",),  # truncation at L_T = max_new_tokens
    "dler.stop_penalty_coef": 0.0,  # paper; the released code uses 0.1
    "filter.kind": "zero_variance",  # on the pre-penalty score
    "advantage.estimator": "reinforce_pp_baseline",  # group mean + batch whitening
    "loss.mode": "ppo",
    "loss.eps_low": 0.2,
    "loss.eps_high": 0.28,
    "loss.dual_clip_c": 10.0,
    "loss.agg": "token-mean",
    "loss.kl_coef": 5e-4,
    "loss.kl_kind": "k2",  # the paper's table says mse; the launcher leaves low_var_kl
}
DA_DLER = {
    **DLER,
    "reward.shaping": ("da_dler",),
    "dler.thresholds": (0.5,),  # one threshold
    "dler.budgets": (1.0, 0.5),  # fractions of max_new_tokens: hard (c < 0.5), easy (c >= 0.5)
}

METHOD = Method(name="dler", recipes={"dler": DLER, "da_dler": DA_DLER}, section=section, validate=validate,
                parts=("dler_truncation", "da_dler"))
