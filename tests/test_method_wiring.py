"""Method wiring as data: every method config resolves to the parts its paper names, and every part name reaches
the `jaxrl_reason.core` function it names.

The table below is written from the papers' recipes (verl / TRL defaults where a paper is silent), at the papers'
scale (`full` / `paper` config args). Budget-tied numbers are fractions of `rollout.max_new_tokens`. It checks
resolved config values (dotted keys) and the static loss settings the run builds from them, never how a stage
dispatches, so it holds whether the stages branch on names or look them up in registries.

The spies wrap `jaxrl_reason.core.*` functions. A dispatcher that captured a function object at import time (a
registry entry, a `from ... import f`) is patched where it is looked up: `_spy` also replaces every reference to the
original held in a `jaxrl_reason` module's globals or in a dict among them.
"""
import importlib
import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_reason import algorithms
from jaxrl_reason.core import advantages as adv_core
from jaxrl_reason.core import filters as filters_core
from jaxrl_reason.core import hapo as hapo_core
from jaxrl_reason.core import kl as kl_core
from jaxrl_reason.core import length as length_core
from jaxrl_reason.core import policy_loss as pl_core
from jaxrl_reason.methods import registry as methods
from jaxrl_reason.train import batch as batch_lib
from jaxrl_reason.train.contracts import Rows, UpdateBatch
from jaxrl_reason.train import hparams, rollout
from jaxrl_reason.train.objectives import rl_loss

_GRPO_LOSS = {"loss.mode": "ppo", "loss.eps_low": 0.2, "loss.eps_high": 0.2, "loss.dual_clip_c": 0.0,
              "loss.agg": "seq-mean-token-mean", "loss.kl_coef": 0.001, "loss.kl_kind": "k3"}
_NO_SHAPING = {"reward.kind": "binary", "overlong_frac": 0.0, "reward.shaping": (), "repro.alpha": 0.0}
_DAPO = {"advantage.estimator": "grpo", "loss.mode": "ppo", "loss.eps_low": 0.2, "loss.eps_high": 0.28,
         "loss.dual_clip_c": 10.0, "loss.agg": "token-mean", "loss.kl_coef": 0.0, "loss.entropy_coef": 0.0,
         "filter.kind": "zero_variance", "reward.kind": "signed", "overlong_frac": 4096 / 20480,
         "reward.overlong_factor": 1.0, "reward.shaping": ("overlong",)}
_GSPO = {"advantage.estimator": "grpo", "loss.mode": "gspo", "loss.eps_low": 3e-4, "loss.eps_high": 4e-4,
         "loss.dual_clip_c": 0.0, "loss.agg": "seq-mean-token-mean", "loss.kl_coef": 0.0, "optim.mini_batches": 4}
_DLER = {"advantage.estimator": "reinforce_pp_baseline", "loss.mode": "ppo", "loss.eps_low": 0.2,
         "loss.eps_high": 0.28, "loss.dual_clip_c": 10.0, "loss.agg": "token-mean", "loss.kl_coef": 5e-4,
         "loss.kl_kind": "k2", "loss.kl_in_reward_coef": 0.0, "loss.entropy_coef": 0.0,
         "filter.kind": "zero_variance", "reward.kind": "binary", "reward.shaping": ("dler_truncation",),
         "dler.stop_penalty_coef": 0.0, "overlong_frac": 0.0}
_PPO = {"advantage.estimator": "gae", "advantage.gamma": 1.0, "advantage.lam": 1.0, "loss.mode": "ppo",
        "loss.eps_low": 0.2, "loss.eps_high": 0.2, "loss.dual_clip_c": 3.0, "loss.agg": "token-mean",
        "loss.kl_coef": 0.0, "loss.entropy_coef": 0.0, "value_term": True, "filter.kind": "none"}
_LSPO = {"filter.kind": "lspo", "lspo.low": 0.30, "lspo.high": 0.60, "lspo.max": 0.90}
_TRACERL = {"filter.kind": "accuracy_band", "filter.band_low": 0.2, "filter.band_high": 0.8, "loss.kl_coef": 0.0,
            "loss.kl_in_reward_coef": 0.0, "loss.eps_low": 0.2, "loss.eps_high": 0.2, "advantage.std_ddof": 0,
            "loss.value_clip": 0.2, "tracerl.beta": 0.01, "tracerl.estimator": "trace"}

# (config module, arg) -> resolved values. "overlong_frac": reward.overlong_buffer / rollout.max_new_tokens;
# "agg_const": the seq-mean-token-sum-norm constant the loss uses; "value_term": critic loss on. A key in a method's
# section (`repro.alpha`) resolves to 0 / off when the config does not carry the section.
TABLE = {
    ("grpo", "full"): {"advantage.estimator": "grpo", **_GRPO_LOSS, "loss.entropy_coef": 0.0,
                       "filter.kind": "none", **_NO_SHAPING, "value_term": False},
    ("dr_grpo", "full"): {"advantage.estimator": "dr_grpo", "loss.mode": "ppo", "loss.eps_low": 0.2,
                          "loss.eps_high": 0.2, "loss.agg": "seq-mean-token-sum-norm", "agg_const": 4096.0,
                          "loss.kl_coef": 0.0, "filter.kind": "none", **_NO_SHAPING},
    ("dapo", "full"): {**_DAPO, "value_term": False},
    ("gspo", "full"): {**_GSPO, "filter.kind": "none", **_NO_SHAPING},
    ("reinforce_pp", "full"): {"advantage.estimator": "reinforce_pp", "advantage.gamma": 1.0, "loss.mode": "ppo",
                               "loss.eps_low": 0.2, "loss.eps_high": 0.2, "loss.agg": "token-mean",
                               "loss.kl_coef": 0.0, "loss.kl_in_reward_coef": 0.001, "filter.kind": "none",
                               **_NO_SHAPING},
    ("ppo", "full"): {**_PPO, **_NO_SHAPING},
    ("dler", "full"): _DLER,
    ("da_dler", "full"): {**_DLER, "reward.shaping": ("da_dler",), "dler.thresholds": (0.5,),
                          "dler.budgets": (1.0, 0.5)},
    # HAPO and LSPO keep DAPO's overlong fraction (4096 of 20480); their released scripts use 4096 of 10240 (HAPO)
    # and 512 of 2048 (LSPO) at their own response budgets
    ("hapo", "full"): {**_DAPO, "advantage.estimator": "hapo", "loss.eps_high": 0.2, "hapo.tau": 0.05,
                       "hapo.adaptive_clip": True, "hapo.redistribute": True, "hapo.clip_alpha": 1.0,
                       "hapo.adv_beta": 1.0, "hapo.pivot": 0.8},
    ("lspo", "dapo,full"): {**_DAPO, **_LSPO},
    ("lspo", "gspo,full"): {**_GSPO, **_LSPO},
    ("repro", "ppo,full"): {**_PPO, "repro.alpha": 0.1},
    ("repro", "grpo,full"): {"advantage.estimator": "grpo", **_GRPO_LOSS, "repro.alpha": 0.1},
    ("tracerl", "block,paper"): {**_TRACERL, "advantage.estimator": "grpo", "tracerl.shrink": 1},
    ("tracerl", "full,value,paper"): {**_TRACERL, "advantage.estimator": "gae", "tracerl.shrink": 8},
}
# The losses and estimators of verl's loss family, with verl's defaults (core_algos.py and its example scripts);
# their core functions are checked against verl's formulas in test_core_policy_loss_variants.py and
# test_core_advantages_registry.py, and each name reaching its registry entry in test_train_methods.py.
_VERL = {"loss.kl_coef": 0.0, "filter.kind": "none", **_NO_SHAPING}
VERL_TABLE = {
    ("cispo", "full"): {**_VERL, "advantage.estimator": "grpo", "loss.mode": "cispo", "loss.eps_low": 10.0,
                        "loss.eps_high": 0.2, "loss.agg": "token-mean"},
    ("sapo", "full"): {**_VERL, "advantage.estimator": "grpo", "loss.mode": "sapo", "loss.sapo_tau_pos": 1.0,
                       "loss.sapo_tau_neg": 1.05, "loss.agg": "seq-mean-token-mean"},
    ("gmpo", "full"): {**_VERL, "advantage.estimator": "grpo", "loss.mode": "gmpo", "loss.eps_low": 0.4,
                       "loss.eps_high": 0.4, "loss.agg": "token-mean"},
    ("clip_cov", "full"): {**_VERL, "advantage.estimator": "grpo", "loss.mode": "clip_cov",
                           "loss.clip_cov_ratio": 2e-4, "loss.clip_cov_lb": 1.0, "loss.clip_cov_ub": 5.0},
    ("kl_cov", "full"): {**_VERL, "advantage.estimator": "grpo", "loss.mode": "kl_cov", "loss.kl_cov_ratio": 2e-4,
                         "loss.kl_cov_coef": 1.0},
    ("gpg", "full"): {**_VERL, "advantage.estimator": "gpg", "loss.mode": "gpg", "loss.agg": "token-mean"},
    ("dppo_tv", "full"): {**_VERL, "advantage.estimator": "grpo", "loss.mode": "dppo_tv", "loss.eps_low": 0.15,
                          "loss.eps_high": 0.15, "loss.dual_clip_c": 20.0},
    ("dppo_kl", "full"): {**_VERL, "advantage.estimator": "grpo", "loss.mode": "dppo_kl", "loss.eps_low": 0.05,
                          "loss.eps_high": 0.05, "loss.dual_clip_c": 20.0},
    ("grpo_passk", "full"): {"advantage.estimator": "grpo_passk", **_GRPO_LOSS, "filter.kind": "none",
                             **_NO_SHAPING},
    ("opo", "full"): {**_VERL, "advantage.estimator": "opo", "loss.mode": "ppo", "loss.agg": "token-mean"},
    ("remax", "full"): {**_VERL, "advantage.estimator": "remax", "loss.mode": "ppo", "loss.agg": "token-mean",
                        "rollout.greedy_baseline": True},
    ("grpo_token_sum", "full"): {"advantage.estimator": "grpo", **{**_GRPO_LOSS, "loss.agg": "token-sum"},
                                 "filter.kind": "none", **_NO_SHAPING},
}
# recipes without a config file of their own, applied to the base config
RECIPE_TABLE = {
    "reinforce_pp_baseline": {"advantage.estimator": "reinforce_pp_baseline", "loss.kl_coef": 0.001,
                              "loss.kl_kind": "k3", "loss.agg": "token-mean", "filter.kind": "none"},
}


def _load(module, arg):
    return importlib.import_module(f"configs.{module}").get_config(arg)


def _resolved(config, key):
    if key == "overlong_frac":
        return config.reward.overlong_buffer / config.rollout.max_new_tokens
    if key == "agg_const":
        return hparams.loss_hp(config).agg_const
    if key == "value_term":
        return hparams.loss_hp(config).value_coef > 0
    section, name = key.split(".")
    if section in methods.METHODS and section not in config:
        return 0.0
    return config[section][name]


def _check_table(config, want: dict, label: str):
    for key, value in want.items():
        got = _resolved(config, key)
        if isinstance(value, float):
            np.testing.assert_allclose(got, value, rtol=2e-3, err_msg=f"{label}: {key}")
        else:
            assert tuple(got) == value if isinstance(value, tuple) else got == value, f"{label}: {key} = {got!r}"


def test_the_table_covers_every_method():
    names = {m for m, _ in TABLE} | {m for m, _ in VERL_TABLE} | set(RECIPE_TABLE)
    assert set(algorithms.RECIPES) <= names | {"lspo", "repro", "tracerl"}
    assert {m for m, _ in TABLE} >= {"lspo", "repro", "tracerl"}


@pytest.mark.parametrize("module,arg", sorted({**TABLE, **VERL_TABLE}))
def test_method_config_resolves_to_the_paper_recipe(module, arg):
    _check_table(_load(module, arg), {**TABLE, **VERL_TABLE}[(module, arg)], f"{module}:{arg}")


@pytest.mark.parametrize("name", sorted(RECIPE_TABLE))
def test_recipe_without_a_config_file(name):
    from configs.base import get_base_config

    c = get_base_config("full")
    algorithms.apply_recipe(c, name)
    _check_table(c, RECIPE_TABLE[name], name)


# ------------------------------------------------------------------------------------------ names -> core functions
_DEPTH = [0]


def _spy(monkeypatch, module, name):
    """Replaces `module.name` (and every reference to it in jaxrl_reason's modules) by a recorder; returns calls.

    Only calls from outside the spied functions are recorded (dr_grpo_advantages calling grpo_advantages is one
    call of dr_grpo_advantages)."""
    orig, calls = getattr(module, name), []
    signature = inspect.signature(orig)

    def recorder(*args, **kwargs):
        if _DEPTH[0] == 0:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            calls.append(dict(bound.arguments))
        _DEPTH[0] += 1
        try:
            return orig(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1

    monkeypatch.setattr(module, name, recorder)
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("jaxrl_reason") or mod is module or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if value is orig:
                monkeypatch.setattr(mod, attr, recorder)
            elif isinstance(value, dict):
                for k, v in list(value.items()):
                    if v is orig:
                        monkeypatch.setitem(value, k, recorder)
                    elif getattr(v, "loss_fn", None) is orig:  # a registry entry that calls its core function
                        monkeypatch.setattr(v, "loss_fn", recorder)
    return calls


ESTIMATOR_CORE = {"grpo": "grpo_advantages", "dr_grpo": "dr_grpo_advantages", "rloo": "rloo_advantages",
                  "reinforce_pp": "reinforce_pp_advantages",
                  "reinforce_pp_baseline": "reinforce_pp_baseline_advantages", "gae": "gae_advantages",
                  "hapo": "hapo_token_group_advantages"}
ESTIMATOR_MODULE = {"hapo": hapo_core}  # the estimators whose core function is not in core/advantages.py
LOSS_CORE = {"ppo": "ppo_clip_loss", "gspo": "gspo_loss"}
FILTER_CORE = {"zero_variance": "zero_variance_filter", "lspo": "lspo_length_filter",
               "accuracy_band": "accuracy_band_filter"}
G, R = 4, 5


def _rollout_arrays(seed=0):
    rng = np.random.default_rng(seed)
    n = 2 * G
    lengths = np.array([5, 2, 3, 4, 1, 5, 2, 3])
    mask = (np.arange(R)[None] < lengths[:, None]).astype(np.float32)
    return {"score_N": np.array([1, 0, 1, 0, 1, 1, 0, 0], np.float32), "length_N": lengths,
            "truncated_N": lengths == R, "mask_NxR": mask,
            "logp_old_NxR": (-1.0 + 0.1 * rng.normal(size=(n, R))).astype(np.float32),
            "logp_ref_NxR": (-1.0 + 0.1 * rng.normal(size=(n, R))).astype(np.float32),
            "values_NxR": rng.normal(size=(n, R)).astype(np.float32),
            "logp_NxR": (-1.0 + 0.1 * rng.normal(size=(n, R))).astype(np.float32),
            "entropy_NxR": rng.uniform(0.1, 2.0, size=(n, R)).astype(np.float32)}


@pytest.mark.parametrize("estimator", sorted(ESTIMATOR_CORE))
def test_each_estimator_name_calls_its_core_function(estimator, monkeypatch):
    calls = {name: _spy(monkeypatch, ESTIMATOR_MODULE.get(name, adv_core), fn) for name, fn in ESTIMATOR_CORE.items()}
    x = _rollout_arrays()
    cfg = hparams.freeze(dict(estimator=estimator, group_size=G, eps=1e-6, gamma=1.0, lam=1.0,
                              kl_in_reward_coef=0.01, hapo=dict(fallback_abs=5.0)))
    with jax.disable_jit():  # a cached trace would not call the spies
        adv, _, _ = batch_lib.compute_advantages(cfg, jnp.asarray(x["score_N"]), jnp.asarray(x["mask_NxR"]),
                                                 x["logp_old_NxR"], x["logp_ref_NxR"], x["values_NxR"])
    called = sorted(name for name, c in calls.items() if c)
    assert called == [estimator], f"{estimator!r} called {called}"
    assert np.all(np.isfinite(np.asarray(adv)))


def _config_parts(module, arg):
    config = _load(module, arg)
    config.rollout.group_size = G  # the test's groups of G rows
    return config, hparams.advantage_hp(config), hparams.loss_hp(config), hparams.filter_hp(config), \
        hparams.reward_hp(config)


AR_METHODS = sorted(k for k in TABLE if k[0] != "tracerl")


@pytest.mark.parametrize("module,arg", AR_METHODS)
def test_method_config_reaches_the_named_core_functions(module, arg, monkeypatch):
    """From each config: the estimator, the policy loss with its clip bounds, the KL kind, the aggregation, the
    filter and the reward shaping each reach their own core function with the configured values."""
    config, adv_hp, loss_hp, filter_hp, reward_hp = _config_parts(module, arg)
    est = {name: _spy(monkeypatch, ESTIMATOR_MODULE.get(name, adv_core), fn) for name, fn in ESTIMATOR_CORE.items()}
    loss = {name: _spy(monkeypatch, pl_core, fn) for name, fn in LOSS_CORE.items()}
    flt = {name: _spy(monkeypatch, filters_core, fn) for name, fn in FILTER_CORE.items()}
    kl = _spy(monkeypatch, kl_core, "kl_estimate")
    clip_bounds = _spy(monkeypatch, hapo_core, "hapo_adaptive_clip_bounds")
    redistribute = _spy(monkeypatch, hapo_core, "hapo_redistribute_advantages")
    shaping = {name: _spy(monkeypatch, length_core, name)
               for name in ("dapo_overlong_penalty", "dler_truncation_reward", "da_dler_truncation_reward")}
    x = _rollout_arrays()
    max_new = config.rollout.max_new_tokens

    rollout.shape_rewards(x["score_N"], x["length_N"] * max_new // R, x["truncated_N"], reward_hp)
    want_shaping = set()
    if config.reward.overlong_buffer > 0:
        want_shaping.add("dapo_overlong_penalty")
    if "da_dler" in config.reward.shaping:
        want_shaping.add("da_dler_truncation_reward")
    elif "dler_truncation" in config.reward.shaping:
        want_shaping.add("dler_truncation_reward")
    assert {k for k, c in shaping.items() if c} == want_shaping

    rollout.group_filter(Rows(*(None,) * 12).replace(score_N=x["score_N"], length_N=x["length_N"]), filter_hp)
    called = {k for k, c in flt.items() if c}
    want = set() if config.filter.kind == "none" else {config.filter.kind}
    assert want <= called and called - want <= {"zero_variance"}, called  # LSPO first drops std-0 groups
    if config.filter.kind == "lspo":
        np.testing.assert_allclose([flt["lspo"][0][k] for k in ("low", "high", "max")],
                                   [config.lspo.low, config.lspo.high, config.lspo.max])

    with jax.disable_jit():
        adv, _, _ = batch_lib.compute_advantages(adv_hp, jnp.asarray(x["score_N"]), jnp.asarray(x["mask_NxR"]),
                                                 x["logp_old_NxR"], x["logp_ref_NxR"], x["values_NxR"])
    assert sorted(k for k, c in est.items() if c) == [config.advantage.estimator]

    mask = x["mask_NxR"]
    batch = UpdateBatch(tokens_NxL=None, valid_NxL=None, response_mask_NxR=jnp.asarray(mask),
                        logp_old_NxR=jnp.asarray(x["logp_old_NxR"]), logp_ref_NxR=jnp.asarray(x["logp_ref_NxR"]),
                        adv_NxR=jnp.asarray(adv), num_tokens_N=jnp.full((2 * G,), mask.sum()),
                        num_seqs_N=jnp.full((2 * G,), 2.0 * G))
    params = {"policy": {"logp": jnp.asarray(x["logp_NxR"]), "ent": jnp.asarray(x["entropy_NxR"])}}
    loss_hp = hparams.freeze({**loss_hp.to_dict(), "value_coef": 0.0})
    rl_loss(params, batch, None, hp=loss_hp, hooks=methods.policy_hooks(config), policy_graphdef=None,
            logps_fn=lambda g, p, b: (p["logp"], p["ent"]))
    assert sorted(k for k, c in loss.items() if c) == [config.loss.mode]
    (pg_call,) = loss[config.loss.mode]
    hapo = config.get("hapo", {"adaptive_clip": False, "redistribute": False})
    if hapo["adaptive_clip"]:  # the configured bounds go in, per-token adaptive bounds come out
        (clip_call,) = clip_bounds
        assert (clip_call["eps_low"], clip_call["eps_high"]) == (config.loss.eps_low, config.loss.eps_high)
    else:
        assert not clip_bounds
        assert (pg_call["eps_low"], pg_call["eps_high"]) == (config.loss.eps_low, config.loss.eps_high)
    assert bool(redistribute) == hapo["redistribute"]
    if config.loss.mode == "ppo":
        assert pg_call["dual_clip_c"] == (config.loss.dual_clip_c or None)
        assert pg_call["agg"] == config.loss.agg
        if config.loss.agg == "seq-mean-token-sum-norm":
            assert pg_call["agg_const"] == (config.loss.agg_const or float(max_new))
    if config.loss.kl_coef > 0:
        (kl_call,) = kl
        assert kl_call["kind"] == config.loss.kl_kind
    else:
        assert not kl
