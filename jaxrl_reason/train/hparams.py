"""The hyper-parameters each stage hands to its registered parts: a frozen config section, hashable, so it can be a
static jit argument or part of a jitted function's identity.

A stage's `hp` is its config section, plus the few values derived from other sections (below, explicit), plus every
method section the config carries (`hp.hapo`, `hp.dler`, ...), so a part registered by a method reads its own
settings where its config file put them.
"""
from __future__ import annotations

from ml_collections import config_dict

from jaxrl_reason.methods import registry as methods


def freeze(fields: dict) -> config_dict.FrozenConfigDict:
    """A frozen, hashable hp from a plain dict (nested dicts become nested sections)."""
    return config_dict.FrozenConfigDict(config_dict.ConfigDict(fields))


def _stage(config, section: str, derived: dict) -> config_dict.FrozenConfigDict:
    own = {k: config[k].to_dict() for k in methods.METHODS if k in config}
    return freeze({**config[section].to_dict(), **derived, **own})


def reward_hp(config) -> config_dict.FrozenConfigDict:
    r = config.rollout
    return _stage(config, "reward", dict(group_size=r.group_size, max_new_tokens=r.max_new_tokens))


def filter_hp(config) -> config_dict.FrozenConfigDict:
    return _stage(config, "filter", dict(group_size=config.rollout.group_size))


def advantage_hp(config) -> config_dict.FrozenConfigDict:
    return _stage(config, "advantage", dict(group_size=config.rollout.group_size,
                                            kl_in_reward_coef=config.loss.kl_in_reward_coef))


def loss_hp(config) -> config_dict.FrozenConfigDict:
    """The loss section with its derived values: the seq-mean-token-sum-norm constant (default: the response budget),
    0 meaning "off" for the dual clip and the value clip, and no critic term without a critic (GAE)."""
    l = config.loss
    return _stage(config, "loss", dict(
        agg_const=float(l.agg_const or config.rollout.max_new_tokens), dual_clip_c=l.dual_clip_c or None,
        value_clip=l.value_clip or None, value_coef=l.value_coef if config.advantage.estimator == "gae" else 0.0))
