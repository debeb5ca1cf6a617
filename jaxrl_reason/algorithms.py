"""Named recipes: which reward shaping, filter, advantage, loss, aggregation and KL each method uses.

A method is a recipe, not a class: a flat dict of config overrides (dotted keys into the schema of `configs/base.py`)
holding the paper defaults. A config file applies a recipe and may override any single part, so combining parts
(LSPO on GSPO, REPRO on PPO) is a config edit. The baselines (GRPO, DAPO, GSPO, PPO, REINFORCE++, verl's loss
family) are written here; the methods with a module of their own (`jaxrl_reason/methods/`: DLER, HAPO, LSPO, REPRO)
bring their recipes, and `RECIPES` holds them all.

Scale-dependent numbers (the overlong buffer) are expressed as fractions of `rollout.max_new_tokens` where the paper
ties them to the response budget, and resolved by `apply_recipe`.
"""
from __future__ import annotations

from typing import Any

from jaxrl_reason.methods import registry as methods
from jaxrl_reason.core import filters as _filters
from jaxrl_reason.core import kl as _kl
from jaxrl_reason.core import length as _length
from jaxrl_reason.core.advantages import ADVANTAGE_ESTIMATORS as _ESTIMATOR_REGISTRY
from jaxrl_reason.core.aggregate import AGGREGATIONS as _AGGREGATION_REGISTRY
from jaxrl_reason.core import policy_loss_variants  # noqa: F401  (registers the variants in POLICY_LOSSES)
from jaxrl_reason.core.policy_loss import POLICY_LOSSES as _POLICY_LOSS_REGISTRY

# The accepted names are the registries' keys (the method modules register their parts when `methods` is imported):
# registering a new part makes its name valid here.
ADVANTAGE_ESTIMATORS = tuple(_ESTIMATOR_REGISTRY)
LOSS_MODES = tuple(_POLICY_LOSS_REGISTRY)
AGG_MODES = tuple(_AGGREGATION_REGISTRY)
FILTERS = tuple(_filters.GROUP_FILTERS)
REWARD_SHAPINGS = tuple(_length.REWARD_SHAPINGS)
KL_KINDS = _kl.kl_kinds()

_GRPO = {
    "advantage.estimator": "grpo",
    "loss.mode": "ppo",
    "loss.eps_low": 0.2,
    "loss.eps_high": 0.2,
    "loss.agg": "seq-mean-token-mean",  # original GRPO objective
    "loss.kl_coef": 0.001,  # verl use_kl_loss default coefficient, low_var_kl
    "loss.kl_kind": "k3",
}
_DAPO = {
    "advantage.estimator": "grpo",
    "reward.kind": "signed",  # DAPO verifier: +1 / -1
    "reward.shaping": ("overlong",),  # soft overlong punishment
    "reward.overlong_buffer": 0.2,  # fraction of max_new_tokens: 4096 of 20480 in the recipe
    "reward.overlong_factor": 1.0,
    "filter.kind": "zero_variance",
    "loss.mode": "ppo",
    "loss.eps_low": 0.2,
    "loss.eps_high": 0.28,
    "loss.dual_clip_c": 10.0,
    "loss.agg": "token-mean",
    "loss.kl_coef": 0.0,
}
_GSPO = {
    "advantage.estimator": "grpo",
    "loss.mode": "gspo",
    "loss.eps_low": 3e-4,
    "loss.eps_high": 4e-4,
    "loss.agg": "seq-mean-token-mean",  # forced by GSPO
    "loss.kl_coef": 0.0,
    "optim.mini_batches": 4,  # GSPO only differs from GRPO off-policy
}

RECIPES: dict[str, dict[str, Any]] = {
    "grpo": _GRPO,
    "dr_grpo": {
        **_GRPO,
        "advantage.estimator": "dr_grpo",
        "loss.agg": "seq-mean-token-sum-norm",  # constant = max_new_tokens
        "loss.kl_coef": 0.0,
    },
    "dapo": _DAPO,
    "gspo": _GSPO,
    "reinforce_pp": {
        "advantage.estimator": "reinforce_pp",  # return-to-go with k1 KL in the reward, batch whitening
        "loss.kl_in_reward_coef": 0.001,
        "loss.kl_coef": 0.0,
        "loss.agg": "token-mean",
    },
    "reinforce_pp_baseline": {
        "advantage.estimator": "reinforce_pp_baseline",
        "loss.kl_coef": 0.001,
        "loss.agg": "token-mean",
    },
    "ppo": {
        "advantage.estimator": "gae",  # critic + GAE, batch whitening
        "loss.mode": "ppo",
        "loss.dual_clip_c": 3.0,
        "loss.agg": "token-mean",
        "loss.kl_coef": 0.0,
        "advantage.gamma": 1.0,
        "advantage.lam": 1.0,
    },
}
_VERL_LOSS = {"advantage.estimator": "grpo", "loss.agg": "token-mean", "loss.kl_coef": 0.0}  # verl's examples
RECIPES.update({
    # CISPO: clipped, stop-gradient importance weight on every token; eps_low 10 = no lower bound (verl example)
    "cispo": {**_VERL_LOSS, "loss.mode": "cispo", "loss.eps_low": 10.0, "loss.eps_high": 0.2},
    # SAPO: soft sigmoid gate instead of a clip, seq-mean-token-mean (forced by the loss)
    "sapo": {**_VERL_LOSS, "loss.mode": "sapo", "loss.agg": "seq-mean-token-mean", "loss.sapo_tau_pos": 1.0,
             "loss.sapo_tau_neg": 1.05},
    # GMPO: geometric mean of token ratios per sequence, log-space clip (e^-0.4, e^0.4)
    "gmpo": {**_VERL_LOSS, "loss.mode": "gmpo", "loss.eps_low": 0.4, "loss.eps_high": 0.4},
    # Clip-Cov / KL-Cov: PPO-style losses that control entropy through a few high-covariance tokens
    "clip_cov": {**_VERL_LOSS, "loss.mode": "clip_cov", "loss.clip_cov_ratio": 2e-4, "loss.clip_cov_lb": 1.0,
                 "loss.clip_cov_ub": 5.0},
    "kl_cov": {**_VERL_LOSS, "loss.mode": "kl_cov", "loss.kl_cov_ratio": 2e-4, "loss.kl_cov_coef": 1.0},
    # GPG: plain -A*logp with GPG's rescaled group advantage
    "gpg": {**_VERL_LOSS, "advantage.estimator": "gpg", "loss.mode": "gpg"},
    # DPPO: trust region on the probability (TV) or Bernoulli KL instead of the ratio; truncated IS weight 20
    "dppo_tv": {**_VERL_LOSS, "loss.mode": "dppo_tv", "loss.eps_low": 0.15, "loss.eps_high": 0.15,
                "loss.dual_clip_c": 20.0},
    "dppo_kl": {**_VERL_LOSS, "loss.mode": "dppo_kl", "loss.eps_low": 0.05, "loss.eps_high": 0.05,
                "loss.dual_clip_c": 20.0},
    # advantage estimators on the GRPO loss
    "grpo_passk": {**_GRPO, "advantage.estimator": "grpo_passk"},
    "opo": {**_VERL_LOSS, "advantage.estimator": "opo", "loss.mode": "ppo"},
    "remax": {**_VERL_LOSS, "advantage.estimator": "remax", "loss.mode": "ppo", "rollout.greedy_baseline": True},
    # GRPO with the un-normalized token-sum aggregation
    "grpo_token_sum": {**_GRPO, "loss.agg": "token-sum"},
})
for _method in methods.METHODS.values():
    for _name, _recipe in _method.recipes.items():
        RECIPES[_name] = {**RECIPES.get(_method.based_on, {}), **_recipe}

# Recipe keys whose values are fractions of rollout.max_new_tokens.
_FRACTION_OF_BUDGET = ("reward.overlong_buffer",)


def apply_recipe(config, name: str) -> None:
    """Writes the recipe `name` into `config` in place (config files call this, then override).

    A key in a method's section (`"hapo.tau"`) first adds the section with its defaults. A method applied on top of
    a base recipe (`stacks_on`: LSPO, REPRO) keeps the run's name.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(sorted(RECIPES))}.")
    for dotted, value in RECIPES[name].items():
        if dotted in _FRACTION_OF_BUDGET:
            value = int(round(value * config.rollout.max_new_tokens))
        section, key = dotted.split(".")
        if section not in config and section in methods.METHODS:
            config[section] = methods.METHODS[section].section(config)
        getattr(config, section)[key] = value
    if not any(name in m.recipes and m.stacks_on for m in methods.METHODS.values()):
        config.algorithm = name


def algorithm_names() -> set[str]:
    """Every valid `config.algorithm`: the recipes and `<method>_<base>` for each method applied on a base."""
    stacked = {f"{m.name}_{b}" for m in methods.METHODS.values() for b in m.stacks_on}
    return set(RECIPES) | stacked
