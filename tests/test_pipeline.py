"""Rollout pipelining (train/pipeline.py, `rollout.staleness`): validation, the background rollout's threading,
donation safety and pending-rollout checkpoints, and the loop: a staleness-1 run resumed from a checkpoint taken
while a rollout was pending repeats the uninterrupted run. (Staleness 0, the default, is the synchronous loop:
tests/test_rl_loop.py's goldens run through the same code.)"""
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_testing import digit_scorer, final_policy_params, tiny_config

from jaxrl_reason.train import build, loop, pipeline
from jaxrl_reason.train.contracts import Rows
from jaxrl_reason.train.metrics import read_metrics
from jaxrl_reason.train.rollout import PromptStream


@pytest.mark.parametrize("module,overrides,sentence", [
    ("grpo", dict(rollout__staleness=2), "rollout.staleness must be 0 .* or 1"),
    ("grpo", dict(rollout__staleness=True), "rollout.staleness must be 0 .* or 1"),
    ("grpo", dict(rollout__staleness=1), "set rollout.is_correction"),
    ("grpo", dict(rollout__staleness=1, rollout__is_correction="token_tis", rollout__exact_logprobs=True),
     "use it with rollout.staleness 0"),
    ("tracerl", dict(rollout__staleness=1, rollout__is_correction="token_tis"), "autoregressive .causal. policies"),
])
def test_invalid_staleness_is_one_sentence(module, overrides, sentence):
    config = tiny_config(module, "block,tiny" if module == "tracerl" else "tiny", **overrides)
    with pytest.raises(ValueError, match=sentence):
        build.validate_config(config)


def test_staleness_one_with_a_correction_is_valid_in_one_process(monkeypatch):
    config = tiny_config(rollout__staleness=1, rollout__is_correction="seq_mis")
    build.validate_config(config)
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="runs in one process"):
        pipeline.validate(config)


# ------------------------------------------------------------------------------------------------- the pipeline
def _rows(n: int, fill: float) -> Rows:
    f = np.full((n, 3), fill, np.float32)
    return Rows(prompt_tokens_NxP=np.arange(2 * n, dtype=np.int32).reshape(n, 2),
                prompt_mask_NxP=np.ones((n, 2), bool), tokens_NxR=np.ones((n, 3), np.int32),
                response_mask_NxR=np.ones((n, 3), bool), logp_sampler_NxR=f, logp_sampler_raw_NxR=f - 1,
                entropy_NxR=f, length_N=np.full(n, 3, np.int32), truncated_N=np.zeros(n, bool),
                score_N=np.full(n, fill, np.float32), example_index_N=np.arange(n), answer_N=np.asarray(["7"] * n),
                reward_N=np.full(n, fill, np.float32))


class FakeCollect:
    """A rollout that reads its params (after a pause, as a real sampler reads them late), consumes 2 prompts and
    records which thread ran it; `fail_at` raises at that iteration."""

    def __init__(self, stream, fail_at=-1):
        self.stream, self.fail_at, self.calls = stream, fail_at, []

    def __call__(self, params, it, sampler_args):
        time.sleep(0.05)
        if it == self.fail_at:
            raise RuntimeError(f"sampler failed at {it}")
        value = float(np.asarray(params["w"]).sum())  # an array deleted by a donation would raise here
        self.stream.take(2)
        self.calls.append((it, value, sampler_args, threading.current_thread() is threading.main_thread()))
        return _rows(4, value), {"reward/accuracy": value / 10, "rollout/rounds": np.int64(1)}


def _pipeline(tmp_path, staleness, fail_at=-1):
    config = tiny_config(rollout__staleness=staleness, rollout__is_correction="token_tis")
    stream = PromptStream(list(range(10)), seed=0)
    collect = FakeCollect(stream, fail_at)
    return pipeline.RolloutPipeline(config, collect, stream, tmp_path / "pending"), collect


def test_prefetch_samples_in_the_background_on_a_copy_the_update_may_donate(tmp_path):
    pipe, collect = _pipeline(tmp_path, staleness=1)
    params = {"w": jnp.ones((4,))}
    rows, metrics, times = pipe.take(0, params, ("a",))  # nothing pending: sampled now, in the main thread
    assert collect.calls == [(0, 4.0, ("a",), True)] and metrics["rollout/staleness"] == 0
    assert pipe.position == 2 and set(times) == {"time/rollout_s", "time/rollout_wait_s"}
    pipe.prefetch(1, params, ("b",), num_steps=3)
    params["w"].delete()  # what the update's donation does to the trainer's arrays
    rows, metrics, _ = pipe.take(1, None, ())
    assert collect.calls[1] == (1, 4.0, ("b",), False) and metrics["rollout/staleness"] == 1
    np.testing.assert_array_equal(rows.score_N, np.full(4, 4.0))
    assert pipe.position == 4
    pipe.prefetch(3, {"w": jnp.zeros(2)}, (), num_steps=3)  # past the last iteration: nothing starts
    assert pipe.wait() is None
    pipe.prefetch(2, {"w": jnp.zeros(2)}, (), num_steps=3)
    with pytest.raises(RuntimeError, match="the pending rollout is iteration 2's, not 3's"):
        pipe.take(3, None, ())


def test_staleness_zero_never_prefetches(tmp_path):
    pipe, collect = _pipeline(tmp_path, staleness=0)
    pipe.prefetch(1, {"w": jnp.ones(2)}, (), num_steps=3)
    assert pipe.wait() is None and collect.calls == []
    _, metrics, _ = pipe.take(1, {"w": jnp.ones(2)}, ())
    assert "rollout/staleness" not in metrics and collect.calls[0][3]


def test_an_error_in_the_background_rollout_reraises_in_the_loop(tmp_path):
    pipe, _ = _pipeline(tmp_path, staleness=1, fail_at=1)
    pipe.prefetch(1, {"w": jnp.ones(2)}, (), num_steps=3)
    with pytest.raises(RuntimeError, match="sampler failed at 1"):
        pipe.take(1, None, ())
    pipe.prefetch(2, {"w": jnp.ones(2)}, (), num_steps=3)  # the pipeline is usable again
    pipe.close()
    assert pipe.wait() is None


def test_pending_rollout_checkpoint_round_trip_and_pruning(tmp_path):
    pipe, _ = _pipeline(tmp_path, staleness=1)
    pipe.take(0, {"w": jnp.ones(3)}, ())
    assert pipe.checkpoint_meta(1, {"iteration": 1, "a": 0}, kept_steps=list) == {"iteration": 1, "a": 0}
    pipe.prefetch(1, {"w": jnp.ones(3)}, (), num_steps=5)
    meta = pipe.checkpoint_meta(1, {"iteration": 1, "stream_position": pipe.position, "pending_rollout": "x"}, list)
    assert meta["pending_rollout"] == "1.npz" and meta["stream_position"] == 2
    expected = pipe.wait()

    fresh, collect = _pipeline(tmp_path, staleness=1)
    assert fresh.restore(meta) == {"iteration": 1, "stream_position": 2}
    assert fresh.stream.position == 4
    rows, metrics, _ = fresh.take(1, None, ())
    assert collect.calls == [] and metrics == {**expected.metrics, "rollout/staleness": 1}
    assert type(metrics["rollout/rounds"]) is int and type(metrics["reward/accuracy"]) is float
    for name in ("prompt_tokens_NxP", "logp_sampler_raw_NxR", "answer_N", "reward_N", "score_N"):
        np.testing.assert_array_equal(getattr(rows, name), getattr(expected.rows, name))
    assert rows.step_map_NxR is None and rows.answer_N.dtype.kind == "U"

    # staleness 0 drops the name and samples the iteration again from the meta's stream position
    zero, _ = _pipeline(tmp_path, staleness=0)
    assert "pending_rollout" not in zero.restore(meta) and zero.wait() is None and zero.stream.position == 0
    # a later save removes the files of checkpoints that are gone
    fresh.prefetch(2, {"w": jnp.ones(3)}, (), num_steps=5)
    fresh.checkpoint_meta(2, {"iteration": 2}, kept_steps=lambda: [2])
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == ["2.npz"]


# ------------------------------------------------------------------------------------------------- the loop
def test_staleness_one_trains_off_policy_and_resumes_exactly(tmp_path, monkeypatch):
    """3 iterations straight vs stopped by the time budget after 1 (its checkpoint holds the pending rollout of
    iteration 2) and resumed: every logged number but time/* is equal, and so are the final parameters."""
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    kw = dict(rollout__staleness=1, rollout__is_correction="token_tis", rollout__log_mismatch=True)
    loop.run(tiny_config(train__num_steps=3, **kw), str(tmp_path / "a"))
    loop.run(tiny_config(train__num_steps=3, train__time_budget_s=1e-6, **kw), str(tmp_path / "b"))
    assert [p.name for p in (tmp_path / "b" / "pending_rollout").iterdir()] == ["1.npz"]
    loop.run(tiny_config(train__num_steps=3, **kw), str(tmp_path / "b"))
    ma, mb = ([{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(str(tmp_path / d))]
              for d in "ab")
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [0, 1, 2, 3, 4]
    assert ma == mb
    for x, y in zip(final_policy_params(str(tmp_path / "a")), final_policy_params(str(tmp_path / "b"))):
        np.testing.assert_array_equal(x, y)
    train = [r for r in ma if "train/loss" in r]
    assert [r["rollout/staleness"] for r in train] == [0, 1, 1]
    # iteration 1's rows come from the parameters that score them (numerical mismatch only); later rows from the
    # parameters one update before, so the sampler / trainer log-probs differ by a whole update (lr 1e-3)
    gap = [r["rollout/mismatch_max_abs"] for r in train]
    assert gap[0] < 1e-4 and min(gap[1:]) > 100 * max(gap[0], 1e-6)
    assert all(r["rollout/is_weight_mean"] != 1.0 for r in train[1:])
