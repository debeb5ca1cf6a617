"""study/tracerl.py: the TraceRL study end to end at smoke size, SFT reuse, result.json skip / staleness.

One real smoke study (1 seed, 2 SFT steps, 2 RL steps, 8 eval problems) is shared by the tests; the reward is
tests/rl_testing.py:digit_scorer so a near-random policy gets a varying reward and every run really updates.
Independent checks: the block runs start from the same SFT checkpoint with the same eval key and sampler, so their
`eval_before` must be identical; re-runs must not call training at all (patched to raise) and must leave the SFT
checkpoint files untouched (mtimes).
"""
import json
import math
import os
import shutil

import pytest

from rl_testing import digit_scorer

from jaxrl_reason.train import build, diffusion_sft, loop
from study import tracerl
from study.runs import TRACERL_RUNS

# Two of the four runs (the other two are the configs tests/test_rl_loop.py trains): keeps the suite < 10 min.
RUNS = ("block_onestep", "block_tracerl_value")
SMOKE = dict(seeds=(0,), rl_steps=2, eval_problems=8, eval_samples=2, sft_steps=2, smoke=True, runs=RUNS)
CHECKPOINT_FILES = ("sft_done.json", "config.json", "model.safetensors")


def _forbid(*_, **__):
    raise AssertionError("training was called although its result exists")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tracerl_study"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "arithmetic_scorer", digit_scorer)
        results = tracerl.run_tracerl_study(workroot=root, **SMOKE)
    return root, results


def _mtimes(root):
    return {(k, f): os.stat(os.path.join(root, f"sft_{k}", f)).st_mtime_ns
            for k in ("block",) for f in CHECKPOINT_FILES}


def test_smoke_study_returns_every_run_with_finite_metrics(smoke_run):
    root, results = smoke_run
    assert list(results) == list(RUNS)
    for run, records in results.items():
        assert [r["seed"] for r in records] == [0]
        rec = records[0]
        assert rec["iterations"] == 2
        assert [row["step"] for row in rec["curve"]] == [1, 2]
        for row in rec["curve"]:
            assert math.isfinite(row["train/loss"]) and math.isfinite(row["reward/accuracy"])
        for when in ("eval_before", "eval_after"):
            assert 0.0 <= rec[when]["pass@1"] <= 1.0
        with open(os.path.join(root, run, "seed0", "result.json")) as f:
            stored = json.load(f)["config"]
        kind = TRACERL_RUNS[run].split(",")[0]
        assert stored["model"]["sft_dir"] == f"sft_{kind}"  # relative to the workroot
        assert stored["train"]["num_steps"] == 2 and stored["eval"]["num_problems"] == 8
        assert stored["tracerl"]["estimator"] == ("onestep" if run == "block_onestep" else "trace")
        assert stored["advantage"]["estimator"] == ("gae" if run == "block_tracerl_value" else "grpo")
    same_start = [json.dumps(results[r][0]["eval_before"]) for r in RUNS]
    assert len(set(same_start)) == 1
    assert not os.path.exists(os.path.join(root, "sft_full"))  # only the SFT checkpoints the runs need
    for kind in ("block",):
        with open(os.path.join(root, f"sft_{kind}", "sft_done.json")) as f:
            done = json.load(f)
        assert done["config"]["model"]["attention"] == {"block": "block", "full": "bidirectional"}[kind]
        assert all(math.isfinite(h["loss"]) for h in done["history"])


def test_second_call_reuses_sft_checkpoints_and_finished_runs(smoke_run, monkeypatch):
    root, results = smoke_run
    before = _mtimes(root)
    monkeypatch.setattr(diffusion_sft, "train_diffusion_sft", _forbid)
    monkeypatch.setattr(loop, "run", _forbid)
    again = tracerl.run_tracerl_study(workroot=root, log_fn=lambda *_: None, **SMOKE)
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)
    assert _mtimes(root) == before


def test_only_runs_without_result_json_are_run_again(smoke_run, tmp_path, monkeypatch):
    root = str(tmp_path / "copy")
    shutil.copytree(smoke_run[0], root)
    os.remove(os.path.join(root, "block_tracerl_value", "seed0", "result.json"))
    calls = []

    def fake_run(config, workdir):
        calls.append((workdir, config.model.sft_dir, config.tracerl.llada_block_len))
        return {"eval_before": {"pass@1": 0.25}, "eval_after": {"pass@1": 0.5}, "iterations": 2}

    monkeypatch.setattr(diffusion_sft, "train_diffusion_sft", _forbid)
    monkeypatch.setattr(loop, "run", fake_run)
    out = tracerl.run_tracerl_study(workroot=root, log_fn=lambda *_: None, **SMOKE)
    assert [c[:2] for c in calls] == [(os.path.join(root, "block_tracerl_value", "seed0"),
                                       os.path.join(root, "sft_block"))]
    assert out["block_tracerl_value"][0]["eval_after"] == {"pass@1": 0.5}
    # the curve is read back from the workdir's metrics
    assert out["block_tracerl_value"][0]["curve"] == smoke_run[1]["block_tracerl_value"][0]["curve"]
    assert json.dumps(out["block_onestep"]) == json.dumps(smoke_run[1]["block_onestep"])
    assert os.path.exists(os.path.join(root, "block_tracerl_value", "seed0", "result.json"))


@pytest.mark.parametrize("change,what", [({"rl_steps": 3}, "different RL config"),
                                         ({"sft_steps": 3}, "different SFT config")])
def test_results_made_with_other_settings_are_not_reused(smoke_run, monkeypatch, change, what):
    monkeypatch.setattr(diffusion_sft, "train_diffusion_sft", _forbid)
    monkeypatch.setattr(loop, "run", _forbid)
    with pytest.raises(ValueError, match=what):
        tracerl.run_tracerl_study(workroot=smoke_run[0], log_fn=lambda *_: None, **{**SMOKE, **change})


@pytest.mark.parametrize("kwargs,sentence", [({"seeds": ()}, "at least one seed"),
                                             ({"runs": ("block_ppo",)}, "unknown TraceRL study runs")])
def test_bad_arguments_are_one_sentence(tmp_path, kwargs, sentence):
    with pytest.raises(ValueError, match=sentence):
        tracerl.run_tracerl_study(workroot=str(tmp_path), **{**SMOKE, **kwargs})
