"""The study package behind experiments/reproduce.py: run keys, study definitions, resumption, the worker pool,
flags, the DLER study's extras, at micro scale. The report's statistics and tables: tests/test_repro_report.py."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rl_testing import ROOT, digit_scorer

from jaxrl_reason.train import build, loop
from jaxrl_reason.train.metrics import read_metrics
from study import cli, common, dler, pool, report, runner, runs, table, tracerl


# ------------------------------------------------------------------------------------- micro-scale end to end
def test_smoke_dler_study_writes_json_plots_summary_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)  # a reward a random policy can earn
    monkeypatch.setitem(runs.STUDIES, "dler", (runs.RunSpec("dler", "dler"),))
    argv = ["reproduce.py", "--smoke", "--rl_steps=2", "--studies=dler", f"--out={tmp_path}", "--jax_cache=none"]
    cli.main(argv)
    data = json.loads((tmp_path / "dler.json").read_text())
    assert data["status"] == "run" and data["seeds"] == [0] and data["settings"]["rl_steps"] == 2
    assert set(data["results"]) == {"dler", "sft", "dler_merged"}
    (run,) = data["results"]["dler"]
    assert run["iterations"] == 2 and run["module"] == "dler"
    assert [c["step"] for c in run["curve"]] == [1, 2]
    assert {"reward/accuracy", "response/length_mean", "policy/entropy", "train/loss"} <= set(run["curve"][0])
    for entry in (run, data["results"]["sft"][0], data["results"]["dler_merged"][0]):
        tiers = entry["eval_common"]
        assert set(tiers) == {"easy", "medium", "hard", "all"}
        n = {t: sum(1 for lv in runs.TIERS[t] if f"pass@1/level{lv}" in tiers[t]) for t in runs.TIERS}
        want = sum(n[t] * tiers[t]["pass@1"] for t in n) / sum(n.values())  # 9 problems: one per level
        np.testing.assert_allclose(tiers["all"]["pass@1"], want, atol=1e-9)
    merge = data["results"]["dler_merged"][0]["merge"]
    assert 0 < merge["changed"] <= merge["numel"]
    for name in ("summary.md", "dler_curves.png", "tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| dler_merged |" in summary and "DLER halves the length" in summary

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "run", no_training)
    cli.main(argv)  # restart: every run, evaluation and merge is read back from disk
    assert json.loads((tmp_path / "dler.json").read_text())["results"] == data["results"]


def test_runs_are_shared_by_key_and_configs_get_the_study_budget(tmp_path):
    s = runs.Settings(rl_steps=7, eval_problems=50, eval_samples=3, greedy=False)
    grpo = runs.RunSpec("grpo", "grpo")
    assert grpo in runs.STUDIES["dler"] and grpo in runs.STUDIES["lspo"] and grpo in runs.STUDIES["repro"]
    assert common.run_key(grpo, 0, s) == common.run_key(runs.RunSpec("other_name", "grpo"), 0, s)
    keys = {common.run_key(grpo, 1, s), common.run_key(grpo, 0, s._replace(rl_steps=8)),
            common.run_key(runs.RunSpec("grpo", "grpo", "tiny", (("loss.kl_coef", 0.1),)), 0, s)}
    assert len(keys | {common.run_key(grpo, 0, s)}) == 4
    # a rebuilt warm start (other bytes at the same path) is a new run, never the old run's result
    ckpt = tmp_path / "sft"
    ckpt.mkdir()
    on_ckpt = runs.RunSpec("grpo", "grpo", "tiny", (("model.sft_dir", str(ckpt)),))
    (ckpt / "model.safetensors").write_bytes(b"weights v1")
    first = common.run_key(on_ckpt, 0, s)
    (ckpt / "model.safetensors").write_bytes(b"weights v2")
    assert common.run_key(on_ckpt, 0, s) != first
    # --start: every AR run starts there; its key follows the weights, not the path
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes(b"weights v2")
    on_start = s._replace(ar_start=str(copy))
    assert common.make_config(grpo, 0, on_start).model.sft_dir == str(copy)
    at_ckpt = common.run_key(grpo, 0, s._replace(ar_start=str(ckpt)))  # same bytes, another path
    assert common.run_key(grpo, 0, on_start) == at_ckpt != common.run_key(grpo, 0, s)
    spec = dict((r.name, r) for r in runs.STUDIES["hapo"])["hapo_no_A_temperature"]
    c = common.make_config(spec, 2, s)
    assert c.hapo.tau == 0.0 and c.hapo.redistribute and c.seed == 2
    # several updates per rollout batch, so HAPO's clip bounds can bind (the DAPO control too)
    assert {common.make_config(r, 0, s).optim.mini_batches for r in runs.STUDIES["hapo"]} == {4}
    assert (c.train.num_steps, c.train.time_budget_s, c.eval.num_problems, c.eval.samples) == (7, 0.0, 50, 3)
    assert os.path.isabs(c.model.sft_dir) and c.model.init == "sft"
    lspo_grpo = dict((r.name, r) for r in runs.STUDIES["lspo"])["lspo_grpo"]
    assert common.make_config(lspo_grpo, 0, s).loss.kl_coef == common.make_config(grpo, 0, s).loss.kl_coef == 0.0


def test_lspo_fill_raises_the_round_cap_of_exactly_the_filtered_runs():
    """The lspo_fill study is lspo with filter.max_rounds = 12 where a filter draws rounds (its config has one),
    and the unfiltered runs are lspo's own (same key: trained once); every study has a report section and a name
    in the README table."""
    s = runs.Settings(rl_steps=7, eval_problems=50, eval_samples=3, greedy=False)
    base, fill = runs.STUDIES["lspo"], runs.STUDIES["lspo_fill"]
    assert [r.name for r in base] == [r.name for r in fill]
    for b, f in zip(base, fill):
        cb, cf = common.make_config(b, 0, s), common.make_config(f, 0, s)
        if cb.filter.kind == "none":
            assert f == b and common.run_key(f, 0, s) == common.run_key(b, 0, s)
        else:
            assert (cb.filter.max_rounds, cf.filter.max_rounds) == (4, 12)
            assert common.run_key(f, 0, s) != common.run_key(b, 0, s)
            cf.filter.max_rounds = 4
            assert cf.to_dict() == cb.to_dict()  # nothing else differs
    assert {r.name for r in fill if common.make_config(r, 0, s).filter.kind != "none"} == {
        "dapo", "lspo_grpo", "lspo_dapo", "lspo_gspo"}
    ar = [n for n in runs.ALL_STUDIES if n not in runs.TRACERL_STUDIES]
    assert set(runs.TRACERL_STUDIES) == set(runs.TRACERL_STUDY_RUNS)  # each diffusion study has runs
    assert set(report.SECTIONS) == set(runs.ALL_STUDIES) == set(table.NAMES) and set(ar) <= set(
        runs.STUDIES)


def test_runs_from_one_start_record_equal_start_evaluations(tmp_path, monkeypatch):
    """Two methods from one start with one evaluation budget each evaluate the start policy in their own loop: the
    evaluation depends only on the start weights, the eval settings and the seed, so the records are equal; a
    preempted run ends the study with one sentence."""
    grpo, dapo = runs.RunSpec("grpo", "grpo"), runs.RunSpec("dapo", "dapo")
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    smoke = runs.Settings(rl_steps=1, eval_problems=9, eval_samples=2, greedy=False, smoke=True)
    a = runner.run_one(grpo, 0, smoke, str(tmp_path / "a"))
    b = runner.run_one(dapo, 0, smoke, str(tmp_path / "b"))
    assert a["eval_before"] == b["eval_before"] and a["eval_before"]["pass@1"] >= 0.0
    step0 = [r for r in read_metrics(b["workdir"]) if r["step"] == 0]
    assert step0[0]["eval/pass@1"] == b["eval_before"]["pass@1"]
    monkeypatch.setattr(loop, "run", lambda config, workdir: {"preempted": True})
    with pytest.raises(SystemExit, match="preempted; the same command resumes it"):
        runner.run_one(grpo, 1, smoke, str(tmp_path / "a"))


@pytest.fixture(scope="module")
def worker_cache(tmp_path_factory):
    """A persistent XLA cache for the pool tests' worker processes: the SIGTERM test's GRPO workers load what the
    pool test's worker compiled (loadscope runs a module's tests on one xdist worker, in file order)."""
    return str(tmp_path_factory.mktemp("worker_xla_cache"))


def test_pool_trains_each_run_once_and_equals_the_sequential_run(tmp_path, monkeypatch, worker_cache):
    """--workers: a run shared by two studies is one job; a spawned, pinned worker trains it, the study then reads
    it back without training (loop.run raises in this process), and the worker's run equals the same run trained
    sequentially here; a failing job makes the pool raise after its worker stops. (Two workers side by side:
    the SIGTERM test below.)"""
    smoke = runs.Settings(rl_steps=1, eval_problems=9, eval_samples=2, greedy=False, smoke=True)
    grpo = runs.RunSpec("grpo", "grpo")
    monkeypatch.setitem(runs.STUDIES, "lspo", (grpo,))
    monkeypatch.setitem(runs.STUDIES, "repro", (runs.RunSpec("also_grpo", "grpo"),))
    root = str(tmp_path / "pooled")
    first, second = pool.plan(["lspo", "repro"], [0, 1], smoke, 2, root)
    assert [(j[0], j[1]["seed"]) for j in first] == [("ar", 0), ("ar", 1)] and second == []
    full = runs.Settings(rl_steps=7, eval_problems=50, eval_samples=3, greedy=False)
    one, none = pool.plan(["tracerl", "lspo"], [0], full, 2, str(tmp_path / "planned"))  # shipped starts
    assert [j[0] for j in one] == ["tracerl"] * 4 + ["ar"] and none == []  # longest first, one phase
    builds, later = pool.plan(["tracerl"], [0], smoke, 2, str(tmp_path / "planned"))  # smoke builds its starts
    assert [j[0] for j in builds] == ["sft", "sft"] and [j[0] for j in later] == ["tracerl"] * 4
    lr_only, _ = pool.plan(["tracerl_lr"], [0], smoke, 2, str(tmp_path / "planned"))  # block runs: block start only
    assert [(j[0], j[1]["kind"]) for j in lr_only] == [("sft", "block")]
    both, _ = pool.plan(["tracerl", "tracerl_lr"], [0, 1], full, 2, str(tmp_path / "planned"))
    assert [(j[1]["run"], j[1]["seed"]) for j in both if j[0] == "tracerl"] == [
        (run, seed) for seed in (0, 1) for run in ("block_tracerl", "block_onestep", "block_tracerl_value",
                                                   "full_tracerl", "block_tracerl_lr1e-5")]
    with pytest.raises(RuntimeError, match="a study job failed"):  # seed 1's run, then a job that fails
        pool.run_jobs([first[1], ("no_such_job", {})], workers=1, cache_dir=worker_cache)
    assert pool.plan(["lspo"], [1], smoke, 2, root) == ([], [])  # a finished run is not planned again
    monkeypatch.setattr(loop, "run", lambda *a, **k: pytest.fail("the pool's run was trained again"))
    pooled = runner.run_study("lspo", [1], smoke, root)["grpo"][0]
    monkeypatch.undo()
    alone = runner.run_one(grpo, 1, smoke, str(tmp_path / "alone"))
    drop_times = lambda curve: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in curve]  # noqa
    assert pooled["eval_after"] == alone["eval_after"] and pooled["eval_before"] == alone["eval_before"]
    assert drop_times(pooled["curve"]) == drop_times(alone["curve"]) and len(pooled["curve"]) == 1
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        cli.parse_flags(["reproduce.py", "--workers=0"])


def test_sigterm_to_the_pool_saves_each_workers_run_and_starts_no_other(tmp_path, worker_cache):
    """SIGTERM to `reproduce.py --workers=2` (what a preempted machine sends): both workers save the run they are
    training and take no new job; the command exits with the one-sentence resume message. (5000 iterations: no run
    can finish before the signal, so the two runs the workers started are the only ones.)"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "reproduce.py"), "--smoke", "--studies=lspo",
           "--rl_steps=5000", "--workers=2", f"--out={tmp_path}", f"--jax_cache={worker_cache}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    runs, deadline = tmp_path / "work" / "runs", time.time() + 600

    def training():  # runs that have logged an RL iteration
        return [p for p in runs.glob("*/seed0/metrics.jsonl") if '"train/loss"' in p.read_text()]

    while len(training()) < 2:
        assert proc.poll() is None and time.time() < deadline, "the pool stopped before both workers trained"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and "preempted; the same command resumes" in out, out[-2000:]
    started = sorted(runs.glob("*/seed0"))
    assert len(started) == 2  # the lspo study has 6 runs: no worker took a third
    for run in started:
        assert not (run / common.RESULT_FILE).exists() and any((run / "checkpoints").iterdir())


def test_flags_reject_bad_values():
    with pytest.raises(ValueError, match="unknown studies"):
        cli.parse_flags(["r", "--studies=dler,nope"])
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        cli.resolve(cli.parse_flags(["r", "--quick", "--seeds=0"]))
    seeds, s, sft = cli.resolve(cli.parse_flags(["r", "--quick"]))
    assert seeds == [0] and not s.greedy and s.eval_problems == 100 and s.rl_steps == cli.QUICK["rl_steps"]
    assert s.tracerl_prompts == 4 and common.run_key(runs.RunSpec("grpo", "grpo"), 0, s) == common.run_key(
        runs.RunSpec("grpo", "grpo"), 0, s._replace(tracerl_prompts=0))  # a TraceRL-only setting
    cfg = tracerl.rl_config("block_tracerl", seed=0, rl_steps=2, eval_problems=9, eval_samples=2,
                                             sft_dir="x", prompts_per_step=s.tracerl_prompts)
    assert cfg.rollout.prompts_per_step == 4
    seeds, s, _ = cli.resolve(cli.parse_flags(["r", "--rl_steps=9"]))
    assert seeds == [0, 1, 2] and s.eval_problems == 500 and s.rl_steps == 9 and s.greedy and s.ar_start == ""
    with pytest.raises(ValueError, match="is not an SFT checkpoint directory"):
        cli.parse_flags(["r", "--start=checkpoints/nope"])
    _, s, _ = cli.resolve(cli.parse_flags(["r", f"--start={ROOT}/checkpoints/arith_tiny_sft"]))
    assert s.ar_start == os.path.join("checkpoints", "arith_tiny_sft")  # repository-relative in results/*.json


def test_runs_flag_restricts_the_plan_and_the_json_to_the_named_runs(tmp_path):
    fv = cli.parse_flags(["r", "--studies=lspo,dler", "--runs=grpo,lspo_grpo"])
    _, s, _ = cli.resolve(fv)
    phase1, phase2 = pool.plan(fv.studies, [0, 1], s, 1, str(tmp_path), fv.runs)
    assert phase2 == [] and [(kw["spec"].name, kw["seed"]) for _, kw in phase1] == [
        ("grpo", 0), ("grpo", 1), ("lspo_grpo", 0), ("lspo_grpo", 1)]  # grpo of both studies: trained once
    assert list(runner.study_json("lspo", {}, s, [0], fv.runs)["runs"]) == ["grpo", "lspo_grpo"]
    assert list(runner.study_json("dler", {}, s, [0], fv.runs)["runs"]) == ["grpo"]  # no DLER: no merge entries
    assert len(runner.study_json("dler", {}, s, [0])["runs"]) == 6
    with pytest.raises(ValueError, match=r"\['hapo'\] are not runs of lspo"):
        cli.parse_flags(["r", "--studies=lspo", "--runs=grpo,hapo"])
    with pytest.raises(ValueError, match="not tracerl"):
        cli.parse_flags(["r", "--runs=grpo"])  # the default studies include tracerl
    with pytest.raises(ValueError, match="not tracerl_lr"):
        cli.parse_flags(["r", "--studies=lspo,tracerl_lr", "--runs=grpo"])
    # the default: one study per claim; lspo_fill and tracerl_lr run when named; lspo_fill has its own plan (dapo at
    # 12 rounds, not lspo's)
    assert cli.parse_flags(["r"]).studies == ["dler", "lspo", "hapo", "repro", "tracerl"]
    fv = cli.parse_flags(["r", "--studies=lspo,lspo_fill", "--runs=dapo"])
    phase1, _ = pool.plan(fv.studies, [0], cli.resolve(fv)[1], 1, str(tmp_path), fv.runs)
    assert [kw["spec"].overrides for _, kw in phase1] == [(), (("filter.max_rounds", 12),)]


# ------------------------------------------------------------------------------------- the DLER study's extras
def test_combine_tiers_is_the_problem_weighted_mean():
    parts = {"easy": (2, {"pass@1": 0.5, "length_mean": 10.0, "pass@1/level0": 0.5}),
             "medium": (0, {}),
             "hard": (1, {"pass@1": 0.2, "length_mean": 40.0, "pass@1/level2": 0.2})}
    out = dler.combine_tiers(parts)
    assert set(out) == {"easy", "hard", "all"}
    assert out["all"] == pytest.approx({"pass@1": 0.4, "length_mean": 20.0, "pass@1/level0": 0.5,
                                        "pass@1/level2": 0.2})


