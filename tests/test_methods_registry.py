"""The method registry: sections added by recipes, hooks reached without a name test, old checkpoint metas."""
import numpy as np
import pytest

from rl_testing import tiny_config

from jaxrl_reason import algorithms
from jaxrl_reason.core import hapo as hapo_core
from jaxrl_reason.methods import registry
from jaxrl_reason.train import build


def test_recipes_add_their_sections_and_only_theirs():
    assert [m.name for m in registry.active(tiny_config("grpo"))] == []
    assert [m.name for m in registry.active(tiny_config("hapo"))] == ["hapo"]
    assert [m.name for m in registry.active(tiny_config("da_dler"))] == ["dler"]
    assert [m.name for m in registry.active(tiny_config("lspo", "gspo,tiny"))] == ["lspo"]
    c = tiny_config("repro", "ppo,tiny")
    assert [m.name for m in registry.active(c)] == ["repro"] and c.algorithm == "repro"
    assert set(algorithms.RECIPES) >= {"dler", "da_dler", "hapo", "lspo", "repro"}


def test_a_method_part_without_its_section_is_refused():
    with pytest.raises(ValueError, match="'lspo' is a part of lspo"):
        build.validate_config(tiny_config("grpo", filter__kind="lspo"))
    with pytest.raises(ValueError, match="'hapo' is a part of hapo"):
        build.validate_config(tiny_config("grpo", advantage__estimator="hapo"))


def test_hapo_state_feeds_the_next_sampler():
    """The entropy statistics of one iteration are the sampler's extra argument at the next (tau > 0 only)."""
    config = tiny_config("hapo")
    rng = np.random.default_rng(0)
    entropy, mask = rng.uniform(0.1, 2.0, (4, 6)).astype(np.float32), np.ones((4, 6), np.float32)
    assert registry.sampler_args(config, {}) == ()
    state = registry.next_state(config, entropy, mask)
    want = {k: float(v) for k, v in hapo_core.entropy_stats(entropy, mask, config.hapo.pivot).items()}
    assert state == {"hapo": want}
    (stats,) = registry.sampler_args(config, state)
    assert {k: float(v) for k, v in stats.items()} == pytest.approx(want)
    config.hapo.tau = 0.0
    assert registry.sampler_args(config, state) == ()
    assert registry.next_state(tiny_config("grpo"), entropy, mask) == {}


def test_checkpoint_meta_of_older_runs_is_upgraded():
    stats = {"pivot": 0.1, "sigma": 1.0, "h_max": 2.0, "h_min": -1.0}
    old = {"iteration": 3, "stream_position": 48, "hapo_stats": stats, "eval_before": {"pass@1": 0.5}}
    new = registry.upgrade_meta(old)
    assert new == {"iteration": 3, "stream_position": 48, "method_state": {"hapo": stats},
                   "eval_before": {"pass@1": 0.5}}
    assert registry.upgrade_meta({**old, "hapo_stats": None})["method_state"] == {}
    assert registry.upgrade_meta(new) == new


def test_a_method_added_as_the_readme_shows(monkeypatch):
    """The README's "adding a method" example: a reward shaping with its own section, registered at run time,
    reaches the rollout's shaping through the recipe and the stage's hp."""
    from ml_collections import config_dict

    from jaxrl_reason.core import length as length_lib
    from jaxrl_reason.methods.hooks import Method
    from jaxrl_reason.train import hparams, rollout

    def brevity(arrays, hp):
        short = (arrays["score_N"] > 0) & (arrays["length_N"] < hp.max_new_tokens // 2)
        return arrays["reward_N"] + hp.brevity.bonus * short, {"brevity_frac": float(short.mean())}

    monkeypatch.setitem(length_lib.REWARD_SHAPINGS, "brevity", brevity)
    method = Method(name="brevity", based_on="grpo", section=lambda c: config_dict.ConfigDict({"bonus": 0.1}),
                    parts=("brevity",), recipes={"brevity": {"reward.shaping": ("brevity",), "brevity.bonus": 0.1}})
    monkeypatch.setitem(registry.METHODS, "brevity", method)
    monkeypatch.setitem(algorithms.RECIPES, "brevity", {**algorithms.RECIPES["grpo"], **method.recipes["brevity"]})
    config = tiny_config("grpo")
    algorithms.apply_recipe(config, "brevity")
    build.validate_config(config)
    assert config.algorithm == "brevity" and [m.name for m in registry.active(config)] == ["brevity"]
    half = config.rollout.max_new_tokens // 2
    reward, metrics = rollout.shape_rewards(np.array([1, 1, 0, 0]), np.array([half - 1, half, 3, half + 5]),
                                            np.zeros(4, bool), hparams.reward_hp(config))
    np.testing.assert_allclose(reward, [1.1, 1.0, 0.0, 0.0], rtol=1e-6)
    assert metrics["brevity_frac"] == 0.25
