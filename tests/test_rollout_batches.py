"""sample_round in sub-batches of whole groups (rollout.sample_batch_rows) and the loop with the rollout options."""
import jax
import numpy as np
import pytest
from flax import nnx
from rl_testing import digit_scorer, final_policy_params, tiny_config

from jaxrl_reason.data.example import Example
from jaxrl_reason.data.tokenizer import DEFAULT_VOCAB_SIZE, build_char_tokenizer, encode_batch_left_padded
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.sampling import autoregressive as ar
from jaxrl_reason.sampling.processors import SamplingParams
from jaxrl_reason.train import build, loop
from jaxrl_reason.train import rollout as rollout_lib
from jaxrl_reason.train.metrics import read_metrics

G, PROMPTS, P, R = 2, 4, 8, 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_char_tokenizer(str(tmp_path_factory.mktemp("tok")))
    cfg = TransformerConfig(vocab_size=DEFAULT_VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=2, num_kv_heads=1)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    fn = ar.make_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=(tok.eos_token_id,),
                             pad_id=tok.pad_token_id, params=SamplingParams(temperature=1.5))
    examples = [Example(f"{i}+{i + 3}=", str(2 * i + 3), "t") for i in range(PROMPTS)]
    return tok, fn, state, examples


def _spec(tok, fn, rows):
    return rollout_lib.RolloutSpec(fn, tok, lambda texts, answers: np.zeros(len(texts), np.float32), PROMPTS, G,
                                   P, R, sample_batch_rows=rows)


def test_sub_batches_are_sampler_calls_on_slices_with_folded_keys(setup):
    tok, fn, state, examples = setup
    key = jax.random.key(3)
    ids, mask = encode_batch_left_padded(tok, [ex.prompt for ex in examples for _ in range(G)], P)
    one, _ = rollout_lib.sample_round(_spec(tok, fn, 0), state, examples, key)
    np.testing.assert_array_equal(one.tokens_NxR, np.asarray(fn(state, ids, mask, key).tokens_BxR))
    rows, _ = rollout_lib.sample_round(_spec(tok, fn, 2 * G), state, examples, key)
    want = [fn(state, ids[i:i + 2 * G], mask[i:i + 2 * G], jax.random.fold_in(key, k)) for k, i in enumerate((0, 4))]
    np.testing.assert_array_equal(rows.tokens_NxR, np.concatenate([np.asarray(w.tokens_BxR) for w in want]))
    np.testing.assert_array_equal(rows.logp_sampler_NxR, np.concatenate([np.asarray(w.logp_BxR) for w in want]))
    np.testing.assert_array_equal(rows.length_N, np.concatenate([np.asarray(w.length_B) for w in want]))
    np.testing.assert_array_equal(rows.example_index_N, np.repeat(np.arange(PROMPTS), G))
    assert not np.array_equal(rows.tokens_NxR, one.tokens_NxR)  # sub-batches draw their own noise


def test_rows_accumulate_by_group_and_pad_with_zero_weight_rows(setup):
    """Typed rows through the core accumulator (a pytree: every field, the answers too, keeps its groups) and the
    padding of a short batch (copies of the first rows with response mask 0)."""
    from jaxrl_reason.core import filters as filters_lib

    tok, fn, state, examples = setup
    rows, _ = rollout_lib.sample_round(_spec(tok, fn, 0), state, examples, jax.random.key(5))
    rows = rows.replace(reward_N=np.arange(PROMPTS * G, dtype=np.float32))
    acc = filters_lib.empty_accumulator(G, train_groups=3)
    acc, full = filters_lib.accumulate_groups(acc, rows, [False, True, False, True])
    assert not full and acc.num_groups == 2
    kept = np.r_[G:2 * G, 3 * G:4 * G]  # groups 1 and 3
    for name in ("tokens_NxR", "prompt_tokens_NxP", "step_map_NxR", "reward_N", "answer_N", "example_index_N"):
        np.testing.assert_array_equal(getattr(acc.arrays, name), getattr(rows, name)[kept], err_msg=name)
    with pytest.raises(ValueError, match="differ in structure"):
        filters_lib.accumulate_groups(acc, rows.replace(reward_N=None), [True] * PROMPTS)
    padded = rollout_lib.pad_groups(acc.arrays, 3 * G)
    assert padded.num_rows == 3 * G and not padded.response_mask_NxR[2 * G:].any()
    np.testing.assert_array_equal(padded.response_mask_NxR[:2 * G], rows.response_mask_NxR[kept])
    np.testing.assert_array_equal(padded.tokens_NxR[2 * G:], rows.tokens_NxR[kept][:G])
    np.testing.assert_array_equal(padded.answer_N[2 * G:], rows.answer_N[kept][:G])


@pytest.mark.parametrize("rows", [3, 6, -2])
def test_sub_batches_must_be_whole_groups_dividing_the_round(setup, rows):
    tok, fn, _, _ = setup
    with pytest.raises(ValueError, match="sample_batch_rows") as e:
        _spec(tok, fn, rows)
    assert str(e.value).endswith(".") and "\n" not in str(e.value)


def test_loop_trains_with_sub_batches_shared_prefill_and_compaction(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    config = tiny_config("grpo", rollout__sample_batch_rows=8, rollout__share_prefill=True,
                         rollout__compact_rows=True)
    out = loop.run(config, str(tmp_path))
    assert out["iterations"] == 2 and all(np.all(np.isfinite(x)) for x in final_policy_params(str(tmp_path)))


def test_remax_rows_carry_the_greedy_baseline_and_the_advantage_subtracts_it(tmp_path, monkeypatch):
    """ReMax end to end: the loop decodes one greedy response per prompt, its shaped reward reaches the rows
    (`greedy_reward_N`, equal within each group), and the update batch's advantage is reward - greedy reward on
    every response token."""
    from jaxrl_reason.train import batch as batch_lib

    captured = {}
    build_update_batch = batch_lib.build_update_batch

    def spy(rows, adv_hp, **kw):
        out = build_update_batch(rows, adv_hp, **kw)
        captured.update(rows=rows, batch=out[0])
        return out

    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    monkeypatch.setattr(batch_lib, "build_update_batch", spy)
    greedy_calls = []
    greedy_rewards = rollout_lib.greedy_rewards
    monkeypatch.setattr(rollout_lib, "greedy_rewards", lambda *a, **k: greedy_calls.append(1) or greedy_rewards(*a, **k))
    config = tiny_config("remax", train__num_steps=1)
    assert config.rollout.greedy_baseline and config.advantage.estimator == "remax"
    loop.run(config, str(tmp_path))
    rows, batch = captured["rows"], captured["batch"]
    g = config.rollout.group_size
    assert greedy_calls and rows.greedy_reward_N is not None
    np.testing.assert_array_equal(rows.greedy_reward_N.reshape(-1, g), rows.greedy_reward_N[::g, None].repeat(g, 1))
    mask = np.asarray(batch.response_mask_NxR)
    want = (rows.reward_N - rows.greedy_reward_N)[:, None] * mask
    np.testing.assert_allclose(np.asarray(batch.adv_NxR), want, rtol=1e-6, atol=1e-7)
    assert any("reward/greedy_mean" in r for r in read_metrics(str(tmp_path)))
