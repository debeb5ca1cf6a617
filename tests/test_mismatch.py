"""The sampler / trainer log-prob contract: the exact sampler (train/exact_sampler.py) agrees with the trainer's old
log-prob pass bit for bit, the KV-cache sampler only to float rounding; mismatch metrics and importance weights
reach the update batch and the PPO loss (train/mismatch.py); config errors are one sentence."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from rl_testing import digit_scorer, loss_hp, tiny_config

from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.sampling import autoregressive as ar
from jaxrl_reason.sampling.processors import SamplingParams
from jaxrl_reason.train import batch as batch_lib
from jaxrl_reason.train import build, loop
from jaxrl_reason.train import mismatch
from jaxrl_reason.train.contracts import Rows, UpdateBatch
from jaxrl_reason.train.exact_sampler import make_exact_generate_fn
from jaxrl_reason.train.logprobs import LogpSpec
from jaxrl_reason.train.metrics import read_metrics
from jaxrl_reason.train.objectives import policy_term

CFG = TransformerConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
P, R, B, EOS = 6, 12, 16, (5, 6, 7)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95)


@pytest.fixture(scope="module")
def setup():
    graphdef, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(0)
    lens = rng.integers(1, P + 1, B)
    lens[0] = P
    mask = np.arange(P)[None] >= (P - lens)[:, None]  # LEFT padded
    tokens = np.where(mask, rng.integers(8, CFG.vocab_size, (B, P)), 0).astype(np.int32)
    return graphdef, params, tokens, mask


@functools.lru_cache(maxsize=None)
def _exact(graphdef, spec, sampling):
    return make_exact_generate_fn(graphdef, spec=spec, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS, pad_id=0,
                                  params=sampling)


@functools.lru_cache(maxsize=None)
def _forward(graphdef, spec, micro_batch_rows):
    return batch_lib.make_forward_fns(graphdef, spec=spec, micro_batch_rows=micro_batch_rows)[0]


def _trainer_logps(graphdef, params, ro, spec, micro_batch_rows=0):
    """The old log-prob pass of the RL loop (train/batch.py) on a rollout's rows."""
    logps = _forward(graphdef, spec, micro_batch_rows)
    return tuple(np.asarray(x) for x in logps(params, batch_lib.model_inputs(_rows(ro))))


def _rows(ro):
    """Rollout rows of a sampler's output (no scores: these tests read tokens and log-probs only)."""
    n = np.shape(ro.tokens_BxR)[0]
    return Rows(prompt_tokens_NxP=np.asarray(ro.prompt_tokens_BxP), prompt_mask_NxP=np.asarray(ro.prompt_mask_BxP),
                tokens_NxR=np.asarray(ro.tokens_BxR), response_mask_NxR=np.asarray(ro.response_mask_BxR),
                logp_sampler_NxR=np.asarray(ro.logp_BxR), logp_sampler_raw_NxR=np.asarray(ro.logp_raw_BxR),
                entropy_NxR=np.asarray(ro.entropy_BxR), length_N=np.asarray(ro.length_B),
                truncated_N=np.asarray(ro.truncated_B), score_N=np.zeros(n, np.float32),
                example_index_N=np.arange(n), answer_N=np.full(n, ""))


@pytest.mark.parametrize("spec", [LogpSpec(), LogpSpec(logits_chunk=40, vocab_chunk=24)])
def test_exact_sampler_matches_trainer_bit_for_bit(setup, spec):
    graphdef, params, tokens, mask = setup
    key = jax.random.PRNGKey(1)
    exact = _exact(graphdef, spec, SAMPLED)(params, tokens, mask, key)
    m = np.asarray(exact.response_mask_BxR)
    assert m.sum() > 3 * B and not m.all()  # some rows stopped early, all sampled several tokens
    logp, entropy = _trainer_logps(graphdef, params, exact, spec)
    assert np.abs(logp - np.asarray(exact.logp_raw_BxR))[m].max() == 0.0
    assert np.abs(entropy - np.asarray(exact.entropy_BxR))[m].max() == 0.0
    # the processed log-prob is the sampled-from distribution's (temperature 0.9, top-p), not the raw one
    assert not np.allclose(np.asarray(exact.logp_BxR)[m], logp[m], atol=1e-3)
    # the KV-cache sampler's raw log-probs of its own tokens: equal to float rounding, not bit for bit (XLA:CPU)
    cached = ar.make_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS, pad_id=0,
                                 params=SAMPLED)(params, tokens, mask, key)
    mc = np.asarray(cached.response_mask_BxR)
    diff = np.abs(_trainer_logps(graphdef, params, cached, spec)[0] - np.asarray(cached.logp_raw_BxR))[mc].max()
    assert 0.0 < diff < 1e-4, diff


def test_exact_greedy_equals_cached_greedy(setup):
    graphdef, params, tokens, mask = setup
    greedy = SamplingParams(greedy=True)
    key = jax.random.PRNGKey(0)
    exact = _exact(graphdef, LogpSpec(), greedy)(params, tokens, mask, key)
    cached = ar.generate(nnx.merge(graphdef, params), tokens, mask, key, max_new_tokens=R, eos_ids=EOS, pad_id=0,
                         params=greedy)
    np.testing.assert_array_equal(np.asarray(exact.tokens_BxR), np.asarray(cached.tokens_BxR))
    np.testing.assert_array_equal(np.asarray(exact.response_mask_BxR), np.asarray(cached.response_mask_BxR))
    np.testing.assert_allclose(np.asarray(exact.logp_raw_BxR), np.asarray(cached.logp_raw_BxR), atol=1e-5)


def test_exact_needs_equal_row_counts_on_cpu(setup):
    """Measured: XLA:CPU's results for a row depend on how many rows a pass runs (4 vs 16 here), which is why the
    exact mode requires the sampler and the old log-prob pass to run the same number of rows."""
    graphdef, params, tokens, mask = setup
    spec = LogpSpec()
    exact = _exact(graphdef, spec, SAMPLED)(params, tokens, mask, jax.random.PRNGKey(1))
    m = np.asarray(exact.response_mask_BxR)
    logp4, _ = _trainer_logps(graphdef, params, exact, spec, micro_batch_rows=4)
    assert 0.0 < np.abs(logp4 - np.asarray(exact.logp_raw_BxR))[m].max() < 1e-4


def test_batch_terms_metrics_and_weights():
    rng = np.random.default_rng(0)
    mask = np.ones((4, 5), np.float32)
    mask[3, 2:] = 0
    sampler = -rng.uniform(0.5, 2.0, (4, 5)).astype(np.float32)
    old = sampler + np.float32(0.1) * rng.normal(size=(4, 5)).astype(np.float32)
    rows = Rows(*(np.zeros((4, 1)),) * 12).replace(logp_sampler_raw_NxR=sampler)
    assert mismatch.batch_terms(rows, old, mask, tiny_config("grpo").rollout) == (None, {})
    extra, metrics = mismatch.batch_terms(rows, old, mask, tiny_config("grpo", rollout__log_mismatch=True).rollout)
    assert extra is None and metrics["rollout/mismatch_kl"] == pytest.approx(float(((sampler - old) * mask).sum()
                                                                                  / mask.sum()), rel=1e-5)
    assert metrics["rollout/max_ratio"] == pytest.approx(float(np.exp(old - sampler)[mask > 0].max()), rel=1e-5)
    extra, metrics = mismatch.batch_terms(
        rows, old, mask, tiny_config("grpo", rollout__is_correction="token_tis", rollout__is_cap=1.05).rollout)
    want = np.minimum(np.exp(old - sampler), 1.05) * mask
    np.testing.assert_allclose(np.asarray(extra), want, rtol=1e-5)
    assert metrics["rollout/frac_over_cap"] == pytest.approx(float((np.exp(old - sampler) > 1.05)[mask > 0].mean()))


def test_policy_term_multiplies_per_token_loss_by_the_weights():
    rng = np.random.default_rng(1)
    n, r = 4, 6
    logp = -rng.uniform(0.5, 2.0, (n, r)).astype(np.float32)
    mask = (rng.uniform(size=(n, r)) > 0.2).astype(np.float32)
    adv = rng.normal(size=(n, r)).astype(np.float32)
    w = rng.uniform(0.0, 2.0, (n, r)).astype(np.float32)
    batch = UpdateBatch(tokens_NxL=None, valid_NxL=None, response_mask_NxR=mask, adv_NxR=adv, logp_old_NxR=logp,
                        num_tokens_N=np.full((n,), mask.sum(), np.float32), num_seqs_N=np.full((n,), n, np.float32))
    cfg = loss_hp(mode="ppo")
    plain, _ = policy_term(cfg, logp, None, batch)
    weighted, _ = policy_term(cfg, logp, None, batch.replace(is_weight_NxR=w))
    # on-policy (ratio 1) the PPO per-token loss is -A: the weighted token-mean is sum(-A w m) / sum(m)
    assert float(plain) == pytest.approx(float((-adv * mask).sum() / mask.sum()), rel=1e-5)
    assert float(weighted) == pytest.approx(float((-adv * w * mask).sum() / mask.sum()), rel=1e-5)


@pytest.mark.parametrize("mode", ["ppo", "gspo", "cispo", "sapo", "clip_cov", "kl_cov", "gpg"])
def test_every_weighted_loss_is_linear_in_the_weights(mode):
    """Weights multiply the per-token loss before aggregation: all ones changes nothing, all twos doubles it."""
    assert mode in mismatch.weighted_losses()
    rng = np.random.default_rng(2)
    n, r = 4, 6
    logp_old = -rng.uniform(0.5, 2.0, (n, r)).astype(np.float32)
    logp = logp_old + np.float32(0.05) * rng.normal(size=(n, r)).astype(np.float32)
    mask = (rng.uniform(size=(n, r)) > 0.2).astype(np.float32)
    batch = UpdateBatch(tokens_NxL=None, valid_NxL=None, response_mask_NxR=mask,
                        adv_NxR=rng.normal(size=(n, r)).astype(np.float32), logp_old_NxR=logp_old,
                        num_tokens_N=np.full((n,), mask.sum(), np.float32), num_seqs_N=np.full((n,), n, np.float32))
    cfg, key = loss_hp(mode=mode, clip_cov_ratio=0.2, kl_cov_ratio=0.2), jax.random.PRNGKey(0)
    plain = float(policy_term(cfg, logp, None, batch, key)[0])
    ones = float(policy_term(cfg, logp, None, batch.replace(is_weight_NxR=np.ones_like(mask)), key)[0])
    twos = float(policy_term(cfg, logp, None, batch.replace(is_weight_NxR=2 * np.ones_like(mask)), key)[0])
    assert plain != 0.0 and ones == pytest.approx(plain, rel=1e-6) and twos == pytest.approx(2 * plain, rel=1e-5)


@pytest.mark.parametrize("overrides,sentence", [
    (dict(rollout__is_correction="tis"), "unknown importance correction"),
    (dict(rollout__is_correction="seq_tis", rollout__is_cap=0.0), "positive number"),
    (dict(rollout__is_correction="token_tis", loss__mode="gmpo"), "per-token weights"),
    (dict(rollout__exact_logprobs=True, rollout__compact_rows=True), "compact_rows False"),
    (dict(rollout__exact_logprobs=True, optim__logp_micro_batch_rows=8), "same number of rows"),
])
def test_bad_settings_are_one_sentence(overrides, sentence):
    with pytest.raises(ValueError, match=sentence):
        build.validate_config(tiny_config("grpo", **overrides))


def test_loop_exact_mode_has_zero_mismatch_and_unit_weights(tmp_path, monkeypatch):
    """The RL loop in exact mode with token-level TIS: the old log-probs equal the sampler's raw ones exactly, so
    every importance weight is exp(0) = 1."""
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    config = tiny_config("grpo", rollout__exact_logprobs=True, rollout__is_correction="token_tis",
                         train__num_steps=1, train__eval_every=0)
    loop.run(config, str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path)) if "rollout/mismatch_max_abs" in r]
    assert len(rows) == 1
    assert rows[0]["rollout/mismatch_max_abs"] == 0.0 and rows[0]["rollout/mismatch_kl"] == 0.0
    assert rows[0]["rollout/is_weight_mean"] == 1.0 and rows[0]["rollout/frac_over_cap"] == 0.0
