"""The RL system end to end: every method's config trains, resume == uninterrupted, config errors are early."""
import json
import os

import jax
import numpy as np
import pytest

from rl_testing import digit_scorer, final_policy_params, tiny_config

from jaxrl_reason.train import build, loop
from jaxrl_reason.train.checkpoint import Checkpointer
from jaxrl_reason.train.metrics import read_metrics

METHODS = [("grpo", "tiny"), ("dr_grpo", "tiny"), ("dapo", "tiny"), ("gspo", "tiny"), ("reinforce_pp", "tiny"),
           ("ppo", "tiny"), ("dler", "tiny"), ("da_dler", "tiny"), ("hapo", "tiny"), ("lspo", "gspo,tiny"), ("repro", "ppo,tiny"),
           ("tracerl", "block,tiny"), ("tracerl", "full,value,tiny")]


GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens", "method_metrics.json")
UPDATE_GOLDENS = os.environ.get("JAXRL_UPDATE_GOLDENS") == "1"


def _golden_rows(rows: list[dict]) -> list[dict]:
    """Every logged number but wall-clock timings (time/*), which no two runs share."""
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _check_goldens(name: str, rows: list[dict]) -> None:
    """Compares a run's metrics.jsonl rows with the stored ones (rtol 1e-4, atol 1e-6 for values near 0).

    With JAXRL_UPDATE_GOLDENS=1 the rows are written instead; commit them only with the reason the numbers moved.
    """
    rows = _golden_rows(rows)
    stored = {}
    if os.path.exists(GOLDENS):
        with open(GOLDENS) as f:
            stored = json.load(f)
    if UPDATE_GOLDENS:
        stored[name] = rows
        os.makedirs(os.path.dirname(GOLDENS), exist_ok=True)
        with open(GOLDENS, "w") as f:
            json.dump(dict(sorted(stored.items())), f, indent=1, sort_keys=True)
        return
    assert name in stored, f"no golden metrics for {name}; generate them with JAXRL_UPDATE_GOLDENS=1"
    want = stored[name]
    assert [r["step"] for r in rows] == [r["step"] for r in want], f"{name}: logged steps differ from the golden"
    for got_row, want_row in zip(rows, want):
        assert sorted(got_row) == sorted(want_row), (
            f"{name} step {want_row['step']}: metric keys differ: {sorted(set(got_row) ^ set(want_row))}")
        for key, value in want_row.items():
            np.testing.assert_allclose(got_row[key], value, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name} step {want_row['step']} {key}")


def _policy_leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params["policy"])]


@pytest.mark.parametrize("module,arg", METHODS)
def test_every_method_trains_with_finite_loss_and_changing_params(module, arg, tmp_path, monkeypatch):
    """Also a golden run: every metric of the 2 iterations (and the evaluations) must match
    tests/goldens/method_metrics.json to rtol 1e-4, so a refactor that moves any method's numbers fails here.

    After a change that is meant to move the numbers, regenerate with
      JAXRL_UPDATE_GOLDENS=1 python -m pytest tests/test_rl_loop.py -k every_method
    and say in the commit message why they moved.
    """
    config = tiny_config(module, arg)
    seen = {}
    real_init = loop._initial_state

    def spy(*args, **kwargs):
        state, tx, sh = real_init(*args, **kwargs)
        seen["init"] = _policy_leaves(state)
        return state, tx, sh

    monkeypatch.setattr(loop, "_initial_state", spy)
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    out = loop.run(config, str(tmp_path))
    assert out["iterations"] == 2
    rows = read_metrics(str(tmp_path))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    with Checkpointer(os.path.join(str(tmp_path), "checkpoints")) as ckpt:
        assert ckpt.latest_step() == 2
    final = final_policy_params(str(tmp_path))
    changed = [not np.array_equal(a, b) for a, b in zip(seen["init"], final)]
    assert any(changed), f"{module}: no parameter changed"
    _check_goldens(f"{module}:{arg}", rows)


def test_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    """Also runs the rollout sampler in 2 lanes (rollout.lanes), which must be as deterministic as one."""
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    kw = dict(train__eval_every=2, rollout__lanes=2)
    straight = tiny_config("dapo", train__num_steps=3, **kw)
    loop.run(straight, str(tmp_path / "a"))
    first = tiny_config("dapo", train__num_steps=1, **kw)
    loop.run(first, str(tmp_path / "b"))
    resumed = tiny_config("dapo", train__num_steps=3, **kw)
    loop.run(resumed, str(tmp_path / "b"))
    for x, y in zip(final_policy_params(str(tmp_path / "a")), final_policy_params(str(tmp_path / "b"))):
        np.testing.assert_allclose(x, y, atol=1e-6)
    ma = [r for r in read_metrics(str(tmp_path / "a")) if "train/loss" in r]
    mb = [r for r in read_metrics(str(tmp_path / "b")) if "train/loss" in r]
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3]
    for ra, rb in zip(ma, mb):
        np.testing.assert_allclose(ra["train/loss"], rb["train/loss"], atol=1e-6)
        assert ra["reward/accuracy"] == rb["reward/accuracy"]
    # train.eval_every=2: before (0), at iteration 2, after (4); the resumed run logs the same evaluation
    ea, eb = ([r for r in read_metrics(str(tmp_path / d)) if "eval/pass@1" in r] for d in "ab")
    assert [r["step"] for r in ea] == [r["step"] for r in eb] == [0, 2, 4]
    assert ea[1] == eb[1]


def test_sigterm_during_first_evaluation_exits_cleanly_and_keeps_the_evaluation(tmp_path, monkeypatch):
    """SIGTERM before training starts (here: inside the first evaluation) saves that evaluation and returns; the
    restart goes straight to training (no second 'before' evaluation) and finishes."""
    import signal

    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    handler_before = signal.getsignal(signal.SIGTERM)
    calls = []
    real_evaluate = loop.evaluate

    def evaluate_then_sigterm(*args, **kwargs):
        calls.append(kwargs["key"])
        out = real_evaluate(*args, **kwargs)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's handler: a flag, not a kill
        return out

    monkeypatch.setattr(loop, "evaluate", evaluate_then_sigterm)
    config = tiny_config("grpo", train__num_steps=2)
    assert loop.run(config, str(tmp_path)) == {"preempted": True}
    with Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [0]
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0]
    out = loop.run(tiny_config("grpo", train__num_steps=2), str(tmp_path))
    assert out["iterations"] == 2 and len(calls) == 2  # the restart evaluated only after training
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [0, 1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) == handler_before  # the run's handler is uninstalled


@pytest.mark.parametrize("field,value,sentence", [
    ("algorithm", "grpoo", "unknown algorithm 'grpoo'"),
    ("advantage__estimator", "gea", "unknown advantage estimator 'gea'"),
    ("optim__mini_batches", 3, "do not split into 3 mini-batches"),
    ("optim__micro_batches", 5, "does not split into 5 micro-batches"),
    ("mesh__fsdp", 3, f"does not cover the {jax.device_count()} available devices"),
    ("loss__agg", "token_mean", "unknown loss aggregation"),
    ("rollout__lanes", 3, "must be >= 1 and divide rollout.group_size"),
    ("rollout__share_prefix", True, "rollout.share_prefix needs rollout.share_prefill=True"),
])
def test_invalid_config_fails_with_one_sentence_before_compiling(field, value, sentence):
    if field == "algorithm":
        config = tiny_config()
        config.algorithm = value
    else:
        config = tiny_config(**{field: value})
    with pytest.raises(ValueError, match=sentence):
        build.validate_config(config)


@pytest.mark.devices(8)
@pytest.mark.parametrize("overrides,sentence", [
    (dict(rollout__compact_rows=True), "rollout.share_prefix and rollout.compact_rows do not combine"),
    (dict(rollout__lanes=2, rollout__sample_batch_rows=4), "whole groups of 4 rows in each of the 2 lanes"),
    (dict(rollout__sample_batch_rows=8, mesh__data=1, mesh__fsdp=-1), "whole groups of 4 rows on each of the 8 row"),
])
def test_share_prefix_needs_whole_groups_and_no_compaction(overrides, sentence):
    base = dict(rollout__share_prefix=True, rollout__share_prefill=True, rollout__group_size=4)
    build.validate_config(tiny_config(**base, rollout__prompts_per_step=8, mesh__data=1, mesh__fsdp=-1))  # 1 / shard
    with pytest.raises(ValueError, match=sentence):
        build.validate_config(tiny_config(**base | overrides))


def test_missing_sft_checkpoint_is_one_sentence(tmp_path):
    config = tiny_config(model__init="sft", model__sft_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds no checkpoint; run experiments/sft.py"):
        build.validate_config(config)
