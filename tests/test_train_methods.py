"""The added methods from config to loss: every new config validates, the objective translates its keys, and
`rl_loss` reaches each registered policy loss (with the step's rng) through one code path."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_testing import loss_hp, tiny_config

from jaxrl_reason import algorithms
from jaxrl_reason.core import hapo as hapo_lib
from jaxrl_reason.core import policy_loss as pl
from jaxrl_reason.core import policy_loss_variants as pv
from jaxrl_reason.methods import hapo as hapo_method
from jaxrl_reason.train import build, hparams
from jaxrl_reason.train.contracts import UpdateBatch
from jaxrl_reason.train.objectives import rl_loss

NEW_CONFIGS = ("cispo", "sapo", "gmpo", "clip_cov", "kl_cov", "gpg", "dppo_tv", "dppo_kl", "grpo_passk", "opo",
               "grpo_token_sum")


@pytest.mark.parametrize("name", NEW_CONFIGS)
def test_new_configs_validate_and_translate(name):
  config = tiny_config(name)
  assert config.algorithm == name and name in algorithms.RECIPES
  build.validate_config(config)
  obj = hparams.loss_hp(config)
  for key in ("mode", "eps_low", "eps_high", "sapo_tau_pos", "sapo_tau_neg", "clip_cov_ratio", "clip_cov_lb",
              "clip_cov_ub", "kl_cov_ratio", "kl_cov_coef"):
    assert getattr(obj, key) == config.loss[key], key
  assert obj.agg == config.loss.agg


def test_remax_without_the_greedy_baseline_is_refused_with_one_sentence():
  config = importlib.import_module("configs.remax").get_config("tiny")
  assert config.advantage.estimator == "remax" and config.rollout.greedy_baseline
  build.validate_config(config)
  config.rollout.greedy_baseline = False
  with pytest.raises(ValueError, match="needs rollout.greedy_baseline=True"):
    build.validate_config(config)


@pytest.mark.parametrize("field,value,sentence", [
    ("loss__mode", "ppoo", "unknown loss mode 'ppoo'"),
    ("loss__agg", "token-median", "unknown loss aggregation"),
    ("advantage__estimator", "grpo_pass", "unknown advantage estimator"),
])
def test_unknown_names_read_the_registries(field, value, sentence):
  with pytest.raises(ValueError, match=sentence):
    build.validate_config(tiny_config(**{field: value}))


def test_hapo_pieces_need_the_ppo_loss():
  config = tiny_config("hapo", loss__mode="gspo")
  with pytest.raises(ValueError, match="act on the ppo loss"):
    build.validate_config(config)


def _fake_batch(seed=0, N=4, R=6):
  rng = np.random.default_rng(seed)
  mask = (np.arange(R)[None, :] < rng.integers(2, R + 1, size=N)[:, None]).astype(np.float32)
  logp_old = np.log(rng.uniform(0.05, 0.95, size=(N, R))).astype(np.float32)
  adv = np.repeat(rng.choice([-2.0, 2.0], size=(N, 1)), R, 1).astype(np.float32)
  batch = UpdateBatch(tokens_NxL=None, valid_NxL=None, response_mask_NxR=mask, logp_old_NxR=logp_old, adv_NxR=adv,
                      num_tokens_N=np.full(N, mask.sum(), np.float32), num_seqs_N=np.full(N, N, np.float32))
  logp = np.minimum(logp_old + 0.3 * rng.standard_normal((N, R)), -1e-3).astype(np.float32)
  return batch, logp


def test_rl_loss_dispatches_every_registered_loss_with_the_step_rng():
  """`rl_loss` with a stand-in `logps_fn` (the params are the log-probs): its policy term is the registered loss."""
  batch, logp = _fake_batch()
  entropy = jnp.ones_like(logp)
  logps_fn = lambda graphdef, params, b: (params, entropy)
  cfgs = {mode: loss_hp(mode=mode, clip_cov_ratio=0.3, clip_cov_lb=0.0, kl_cov_ratio=0.3)
          for mode in pl.POLICY_LOSSES}

  @jax.jit
  def run(logp, rng):
    return {mode: rl_loss({"policy": logp}, batch, rng, hp=cfg, policy_graphdef=None, logps_fn=logps_fn)[0]
            for mode, cfg in cfgs.items()}

  key = jax.random.PRNGKey(3)
  out = run(logp, key)
  m, A, lo = batch.response_mask_NxR, batch.adv_NxR, batch.logp_old_NxR
  agg = dict(agg="token-mean", agg_const=None, num_tokens=m.sum(), num_seqs=4.0)
  for mode, cfg in cfgs.items():
    expect = pl.POLICY_LOSSES[mode](logp, lo, A, m, cfg, agg, rng=key)[0]
    np.testing.assert_allclose(out[mode], expect, rtol=1e-6, atol=1e-7, err_msg=mode)
  np.testing.assert_allclose(out["clip_cov"], pv.clip_cov_loss(logp, lo, A, m, 0.2, 0.2, 0.3, 0.0, 5.0, rng=key,
                                                               **agg)[0], rtol=1e-6)
  other = run(logp, jax.random.PRNGKey(4))  # only Clip-Cov draws from the key
  assert all(float(other[k]) == float(out[k]) for k in out if k != "clip_cov")


def test_hapo_still_shapes_the_ppo_term():
  batch, logp = _fake_batch(1)
  entropy = jnp.asarray(np.random.default_rng(2).gamma(2.0, 0.5, size=logp.shape), jnp.float32)
  logps_fn = lambda graphdef, params, b: (params, entropy)
  config = tiny_config("hapo", loss__eps_high=0.2, loss__dual_clip_c=10.0)
  hapo = loss_hp(mode="ppo", eps_high=0.2, dual_clip_c=10.0, hapo=config.hapo.to_dict())
  hook = hapo_method.policy_hook(config)
  assert config.hapo.adaptive_clip and config.hapo.redistribute and hook is not None
  plain, _ = rl_loss({"policy": logp}, batch, None, hp=hapo, policy_graphdef=None, logps_fn=logps_fn)
  shaped, metrics = rl_loss({"policy": logp}, batch, None, hp=hapo, hooks=(hook,), policy_graphdef=None,
                            logps_fn=logps_fn)
  m, A, lo = batch.response_mask_NxR, batch.adv_NxR, batch.logp_old_NxR
  h = hapo_lib.normalize_entropy(entropy, m, hapo_lib.entropy_stats(entropy, m, 0.8), False)
  el, eh = hapo_lib.hapo_adaptive_clip_bounds(h, 0.2, 0.2, 1.0)
  A2 = hapo_lib.hapo_redistribute_advantages(A, h, jnp.exp(logp - lo), el, eh, 1.0)
  agg = dict(agg="token-mean", agg_const=None, num_tokens=m.sum(), num_seqs=4.0)
  np.testing.assert_allclose(shaped, pl.ppo_clip_loss(logp, lo, A2, m, el, eh, 10.0, **agg)[0], rtol=1e-6)
  assert "hapo_h_mean" in metrics and float(plain) != float(shaped)
