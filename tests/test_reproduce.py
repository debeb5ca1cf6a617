"""experiments/reproduce.py: the study machinery at micro scale, and the summary's statistics and verdicts against
numpy / hand-computed references on synthetic results."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rl_testing import ROOT, digit_scorer

sys.path.insert(0, os.path.join(ROOT, "experiments"))

import _repro_dler as dler  # noqa: E402
import _repro_plots as plots  # noqa: E402
import _repro_pool as pool  # noqa: E402
import _repro_report as report  # noqa: E402
import _repro_studies as studies  # noqa: E402
import reproduce  # noqa: E402
import results_table  # noqa: E402

from jaxrl_reason.train import build, loop  # noqa: E402
from jaxrl_reason.train.evaluation import evaluate  # noqa: E402
from jaxrl_reason.train.metrics import read_metrics  # noqa: E402


# ------------------------------------------------------------------------------------- micro-scale end to end
def test_smoke_dler_study_writes_json_plots_summary_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)  # a reward a random policy can earn
    monkeypatch.setitem(studies.STUDIES, "dler", (studies.RunSpec("dler", "dler"),))
    argv = ["reproduce.py", "--smoke", "--rl_steps=2", "--studies=dler,tracerl", f"--out={tmp_path}",
            "--jax_cache=none"]
    monkeypatch.setattr(studies, "tracerl_module", lambda: None)  # TraceRL is the other helper's test
    reproduce.main(argv)
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
        n = {t: sum(1 for lv in studies.TIERS[t] if f"pass@1/level{lv}" in tiers[t]) for t in studies.TIERS}
        want = sum(n[t] * tiers[t]["pass@1"] for t in n) / sum(n.values())  # 9 problems: one per level
        np.testing.assert_allclose(tiers["all"]["pass@1"], want, atol=1e-9)
    merge = data["results"]["dler_merged"][0]["merge"]
    assert 0 < merge["changed"] <= merge["numel"]
    assert json.loads((tmp_path / "tracerl.json").read_text())["status"] == "not run"
    for name in ("summary.md", "dler_curves.png", "tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| dler_merged |" in summary and "DLER halves the length" in summary and "not run" in summary

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "run", no_training)
    reproduce.main(argv)  # restart: every run, evaluation and merge is read back from disk
    assert json.loads((tmp_path / "dler.json").read_text())["results"] == data["results"]


def test_runs_are_shared_by_key_and_configs_get_the_study_budget(tmp_path):
    s = studies.Settings(rl_steps=7, eval_problems=50, eval_samples=3, greedy=False)
    grpo = studies.RunSpec("grpo", "grpo")
    assert grpo in studies.STUDIES["dler"] and grpo in studies.STUDIES["lspo"] and grpo in studies.STUDIES["repro"]
    assert studies.run_key(grpo, 0, s) == studies.run_key(studies.RunSpec("other_name", "grpo"), 0, s)
    keys = {studies.run_key(grpo, 1, s), studies.run_key(grpo, 0, s._replace(rl_steps=8)),
            studies.run_key(studies.RunSpec("grpo", "grpo", "tiny", (("loss.kl_coef", 0.1),)), 0, s)}
    assert len(keys | {studies.run_key(grpo, 0, s)}) == 4
    # a rebuilt warm start (other bytes at the same path) is a new run, never the old run's result
    ckpt = tmp_path / "sft"
    ckpt.mkdir()
    on_ckpt = studies.RunSpec("grpo", "grpo", "tiny", (("model.sft_dir", str(ckpt)),))
    (ckpt / "model.safetensors").write_bytes(b"weights v1")
    first = studies.run_key(on_ckpt, 0, s)
    (ckpt / "model.safetensors").write_bytes(b"weights v2")
    assert studies.run_key(on_ckpt, 0, s) != first
    # --start: every AR run starts there; its key follows the weights, not the path
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes(b"weights v2")
    on_start = s._replace(ar_start=str(copy))
    assert studies.make_config(grpo, 0, on_start).model.sft_dir == str(copy)
    at_ckpt = studies.run_key(grpo, 0, s._replace(ar_start=str(ckpt)))  # same bytes, another path
    assert studies.run_key(grpo, 0, on_start) == at_ckpt != studies.run_key(grpo, 0, s)
    spec = dict((r.name, r) for r in studies.STUDIES["hapo"])["hapo_no_A_temperature"]
    c = studies.make_config(spec, 2, s)
    assert c.rollout.hapo_tau == 0.0 and c.loss.hapo_redistribute and c.seed == 2
    # §4.5: several updates per rollout batch, so HAPO's clip bounds can bind (the DAPO control too)
    assert {studies.make_config(r, 0, s).optim.mini_batches for r in studies.STUDIES["hapo"]} == {4}
    assert (c.train.num_steps, c.train.time_budget_s, c.eval.num_problems, c.eval.samples) == (7, 0.0, 50, 3)
    assert os.path.isabs(c.model.sft_dir) and c.model.init == "sft"
    lspo_grpo = dict((r.name, r) for r in studies.STUDIES["lspo"])["lspo_grpo"]
    assert studies.make_config(lspo_grpo, 0, s).loss.kl_coef == studies.make_config(grpo, 0, s).loss.kl_coef == 0.0


def test_lspo_fill_raises_the_round_cap_of_exactly_the_filtered_runs():
    """The lspo_fill study is lspo with filter.max_rounds = 12 where a filter draws rounds (its config has one),
    and the unfiltered runs are lspo's own (same key: trained once); every study has a report section and a name
    in the README table."""
    s = studies.Settings(rl_steps=7, eval_problems=50, eval_samples=3, greedy=False)
    base, fill = studies.STUDIES["lspo"], studies.STUDIES["lspo_fill"]
    assert [r.name for r in base] == [r.name for r in fill]
    for b, f in zip(base, fill):
        cb, cf = studies.make_config(b, 0, s), studies.make_config(f, 0, s)
        if cb.filter.kind == "none":
            assert f == b and studies.run_key(f, 0, s) == studies.run_key(b, 0, s)
        else:
            assert (cb.filter.max_rounds, cf.filter.max_rounds) == (4, 12)
            assert studies.run_key(f, 0, s) != studies.run_key(b, 0, s)
            cf.filter.max_rounds = 4
            assert cf.to_dict() == cb.to_dict()  # nothing else differs
    assert {r.name for r in fill if studies.make_config(r, 0, s).filter.kind != "none"} == {
        "dapo", "lspo_grpo", "lspo_dapo", "lspo_gspo"}
    ar = [n for n in studies.ALL_STUDIES if n != "tracerl"]
    assert set(report.SECTIONS) == set(studies.ALL_STUDIES) == set(results_table.NAMES) and set(ar) <= set(
        studies.STUDIES)


def test_tradeoff_points_keep_same_named_runs_of_different_work_dirs_apart():
    def seeds(workdir, acc, length):
        return [{"workdir": workdir, "eval_after": {"pass@1": acc, "length_mean": length}} for _ in range(2)]

    run = {"status": "run"}
    points, _ = plots.tradeoff_points({
        "lspo": {**run, "results": {"grpo": seeds("w/grpo", 0.5, 40.0), "dapo": seeds("w/dapo4", 0.6, 50.0)}},
        "lspo_fill": {**run, "results": {"grpo": seeds("w/grpo", 0.5, 40.0), "dapo": seeds("w/dapo12", 0.7, 30.0)}}})
    assert points == {"grpo": (40.0, 0.0, 0.5, 0.0), "dapo": (50.0, 0.0, 0.6, 0.0),
                      "dapo (lspo_fill)": (30.0, 0.0, 0.7, 0.0)}


def test_start_evaluation_is_computed_once_per_start_and_budget(tmp_path, monkeypatch):
    """Runs from one start with one evaluation budget share the start policy's evaluation (eval_before_key): two
    methods computing it give equal numbers, and a third run gets the stored one instead of evaluating."""
    full = studies.Settings(rl_steps=7, eval_problems=50, eval_samples=3, greedy=False)
    grpo, dapo = studies.RunSpec("grpo", "grpo"), studies.RunSpec("dapo", "dapo")

    def key(spec, seed=0, s=full):
        return studies.eval_before_key(studies.make_config(spec, seed, s))

    hapo_no_a = dict((r.name, r) for r in studies.STUDIES["hapo"])["hapo_no_A_temperature"]
    assert key(grpo) == key(dapo) == key(studies.RunSpec("lspo_gspo", "lspo", "gspo,tiny")) == key(hapo_no_a)
    others = {key(grpo, 1), key(grpo, s=full._replace(eval_samples=4)), key(studies.RunSpec("dler", "dler"))}
    assert len(others | {key(grpo)}) == 4  # another seed, another eval budget, DLER's 64-token budget

    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    smoke = studies.Settings(rl_steps=1, eval_problems=9, eval_samples=2, greedy=False, smoke=True)
    a = studies.run_one(grpo, 0, smoke, str(tmp_path / "a"))
    b = studies.run_one(dapo, 0, smoke, str(tmp_path / "b"))
    assert a["eval_before"] == b["eval_before"] and a["eval_before"]["pass@1"] >= 0.0  # computed twice: equal
    stored = tmp_path / "a" / studies.EVAL_BEFORE_DIR / (key(dapo, s=smoke) + ".json")
    assert json.loads(stored.read_text()) == a["eval_before"]
    calls = []
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: calls.append(k["key"]) or evaluate(*a, **k))
    c = studies.run_one(dapo, 0, smoke, str(tmp_path / "a"))  # the stored evaluation: only the final one runs
    assert len(calls) == 1 and c["eval_before"] == a["eval_before"] and c["iterations"] == 1
    step0 = [r for r in read_metrics(c["workdir"]) if r["step"] == 0]
    assert step0[0]["eval/pass@1"] == a["eval_before"]["pass@1"]  # logged as if computed
    monkeypatch.setattr(loop, "run", lambda config, workdir, eval_before=None: {"preempted": True})
    with pytest.raises(SystemExit, match="preempted; the same command resumes it"):
        studies.run_one(grpo, 1, smoke, str(tmp_path / "a"))


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
    smoke = studies.Settings(rl_steps=1, eval_problems=9, eval_samples=2, greedy=False, smoke=True)
    grpo = studies.RunSpec("grpo", "grpo")
    monkeypatch.setitem(studies.STUDIES, "lspo", (grpo,))
    monkeypatch.setitem(studies.STUDIES, "repro", (studies.RunSpec("also_grpo", "grpo"),))
    root = str(tmp_path / "pooled")
    first, second = pool.plan(["lspo", "repro"], [0, 1], smoke, 2, root)
    assert [(j[0], j[1]["seed"]) for j in first] == [("ar", 0), ("ar", 1)] and second == []
    full = studies.Settings(rl_steps=7, eval_problems=50, eval_samples=3, greedy=False)
    one, none = pool.plan(["tracerl", "lspo"], [0], full, 2, str(tmp_path / "planned"))  # shipped starts
    assert [j[0] for j in one] == ["tracerl"] * 4 + ["ar"] and none == []  # longest first, one phase
    builds, later = pool.plan(["tracerl"], [0], smoke, 2, str(tmp_path / "planned"))  # smoke builds its starts
    assert [j[0] for j in builds] == ["sft", "sft"] and [j[0] for j in later] == ["tracerl"] * 4
    with pytest.raises(RuntimeError, match="a study job failed"):  # seed 1's run, then a job that fails
        pool.run_jobs([first[1], ("no_such_job", {})], workers=1, cache_dir=worker_cache)
    assert pool.plan(["lspo"], [1], smoke, 2, root) == ([], [])  # a finished run is not planned again
    monkeypatch.setattr(loop, "run", lambda *a, **k: pytest.fail("the pool's run was trained again"))
    pooled = studies.run_study("lspo", [1], smoke, root)["grpo"][0]
    monkeypatch.undo()
    alone = studies.run_one(grpo, 1, smoke, str(tmp_path / "alone"))
    drop_times = lambda curve: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in curve]  # noqa
    assert pooled["eval_after"] == alone["eval_after"] and pooled["eval_before"] == alone["eval_before"]
    assert drop_times(pooled["curve"]) == drop_times(alone["curve"]) and len(pooled["curve"]) == 1
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        reproduce.parse_flags(["reproduce.py", "--workers=0"])


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
        assert not (run / studies.RESULT_FILE).exists() and any((run / "checkpoints").iterdir())


def test_flags_reject_bad_values():
    with pytest.raises(ValueError, match="unknown studies"):
        reproduce.parse_flags(["r", "--studies=dler,nope"])
    with pytest.raises(ValueError, match="--seeds must be >= 1"):
        reproduce.resolve(reproduce.parse_flags(["r", "--quick", "--seeds=0"]))
    seeds, s, sft = reproduce.resolve(reproduce.parse_flags(["r", "--quick"]))
    assert seeds == [0] and not s.greedy and s.eval_problems == 100 and s.rl_steps == reproduce.QUICK["rl_steps"]
    assert s.tracerl_prompts == 4 and studies.run_key(studies.RunSpec("grpo", "grpo"), 0, s) == studies.run_key(
        studies.RunSpec("grpo", "grpo"), 0, s._replace(tracerl_prompts=0))  # a TraceRL-only setting
    cfg = studies.tracerl_module().rl_config("block_tracerl", seed=0, rl_steps=2, eval_problems=9, eval_samples=2,
                                             sft_dir="x", prompts_per_step=s.tracerl_prompts)
    assert cfg.rollout.prompts_per_step == 4
    seeds, s, _ = reproduce.resolve(reproduce.parse_flags(["r", "--rl_steps=9"]))
    assert seeds == [0, 1, 2] and s.eval_problems == 500 and s.rl_steps == 9 and s.greedy and s.ar_start == ""
    with pytest.raises(ValueError, match="is not an SFT checkpoint directory"):
        reproduce.parse_flags(["r", "--start=checkpoints/nope"])
    _, s, _ = reproduce.resolve(reproduce.parse_flags(["r", f"--start={ROOT}/checkpoints/arith_tiny_sft"]))
    assert s.ar_start == os.path.join("checkpoints", "arith_tiny_sft")  # repository-relative in results/*.json


def test_runs_flag_restricts_the_plan_and_the_json_to_the_named_runs(tmp_path):
    fv = reproduce.parse_flags(["r", "--studies=lspo,dler", "--runs=grpo,lspo_grpo"])
    _, s, _ = reproduce.resolve(fv)
    phase1, phase2 = pool.plan(fv.studies, [0, 1], s, 1, str(tmp_path), fv.runs)
    assert phase2 == [] and [(kw["spec"].name, kw["seed"]) for _, kw in phase1] == [
        ("grpo", 0), ("grpo", 1), ("lspo_grpo", 0), ("lspo_grpo", 1)]  # grpo of both studies: trained once
    assert list(studies.study_json("lspo", {}, s, [0], fv.runs)["runs"]) == ["grpo", "lspo_grpo"]
    assert list(studies.study_json("dler", {}, s, [0], fv.runs)["runs"]) == ["grpo"]  # no DLER: no merge entries
    assert len(studies.study_json("dler", {}, s, [0])["runs"]) == 6
    with pytest.raises(ValueError, match=r"\['hapo'\] are not runs of lspo"):
        reproduce.parse_flags(["r", "--studies=lspo", "--runs=grpo,hapo"])
    with pytest.raises(ValueError, match="not tracerl"):
        reproduce.parse_flags(["r", "--runs=grpo"])  # the default studies include tracerl


# ------------------------------------------------------------------------------------- statistics and verdicts
def test_combine_tiers_is_the_problem_weighted_mean():
    parts = {"easy": (2, {"pass@1": 0.5, "length_mean": 10.0, "pass@1/level0": 0.5}),
             "medium": (0, {}),
             "hard": (1, {"pass@1": 0.2, "length_mean": 40.0, "pass@1/level2": 0.2})}
    out = dler.combine_tiers(parts)
    assert set(out) == {"easy", "hard", "all"}
    assert out["all"] == pytest.approx({"pass@1": 0.4, "length_mean": 20.0, "pass@1/level0": 0.5,
                                        "pass@1/level2": 0.2})


def test_mean_std_fmt_and_verdicts_by_hand():
    v = [0.5, 0.6, 0.7]
    m, s, n = report.mean_std(v + [float("nan")])
    assert (m, n) == (pytest.approx(0.6), 3) and s == pytest.approx(np.std(v, ddof=1))
    assert report.fmt(v, 100) == "60.0 ± 10.0" and report.fmt([0.25], 100) == "25.0 (n=1)" and report.fmt([]) == "–"
    powered = {"powered": True, "seeds": 3, "problems": 500}
    # diff 0.1, SE = sqrt(0.01/3 + 0.01/3) = 0.0816: 0.1 < 2 SE -> inconclusive; diff 0.3 > 0.163 -> yes.
    assert report.verdict_greater([0.6, 0.7, 0.8], [0.5, 0.6, 0.7], powered) == "inconclusive (difference < 2 SE)"
    assert report.verdict_greater([0.8, 0.9, 1.0], [0.5, 0.6, 0.7], powered) == "yes"
    assert report.verdict_greater([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], powered) == "no"
    weak = {"powered": False, "seeds": 1, "problems": 100}
    assert report.verdict_greater([0.9], [0.1], weak) == "inconclusive (met at n=1, 100 problems)"
    assert report.verdict_if(False, powered) == "no" and report.verdict_if(None, powered).startswith("inconclusive")
    assert report.context({"eval_problems": 500}, [0, 1, 2])["powered"]
    assert not report.context({"eval_problems": 499}, [0, 1, 2])["powered"]


def test_curve_series_and_stats_match_numpy():
    runs = [{"curve": [{"step": 1, "x": 1.0}, {"step": 2, "x": 3.0}, {"step": 3, "x": 5.0}]},
            {"curve": [{"step": 1, "x": 2.0}, {"step": 2, "x": None}, {"step": 3, "x": 9.0}]}]
    steps, mean, std = plots.curve_series(runs, "x")
    np.testing.assert_array_equal(steps, [1, 3])
    np.testing.assert_allclose(mean, [1.5, 7.0])
    np.testing.assert_allclose(std, np.std([[1.0, 5.0], [2.0, 9.0]], axis=0, ddof=1))
    assert report.curve_stat(runs, "x", "mean") == pytest.approx([3.0, 5.5])
    assert report.curve_stat(runs, "x", "last") == [5.0, 9.0]
    assert report.curve_stat(runs, "x", "std") == pytest.approx([np.std([1, 3, 5]), np.std([2, 9])])


def _seed(acc, length, curve=(), tiers=None, before=0.3):
    r = {"eval_before": {"pass@1": before, "length_mean": 60.0}, "eval_after": {"pass@1": acc, "length_mean": length},
         "iterations": len(curve), "curve": [{"step": i + 1, **c} for i, c in enumerate(curve)]}
    if tiers is not None:
        r["eval_common"] = tiers
    return r


def _row(summary: str, first_cell: str) -> list[str]:
    line = next(x for x in summary.splitlines() if x.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_summary_tables_and_verdicts_from_synthetic_results(tmp_path):
    rng = np.random.default_rng(0)
    acc = {"grpo": [0.40, 0.42, 0.44], "lspo_grpo": [0.50, 0.52, 0.51], "dapo": [0.45, 0.47, 0.46],
           "lspo_dapo": [0.41, 0.44, 0.43], "gspo": [0.40, 0.45, 0.50], "lspo_gspo": [0.43, 0.47, 0.51]}
    # per step: mean over its rounds of kept / 16 groups and of the candidates; rounds 1..3
    kept, cand, rounds = (rng.uniform(0.1, 0.4, size=(3, 4)), rng.uniform(6, 12, size=(3, 4)),
                          rng.integers(1, 4, size=(3, 4)))

    def curve(i, a):
        return [{"lspo_kept_fraction": kept[i, t], "lspo_num_candidates": cand[i, t], "num_groups": 16.0,
                 "rollout/rounds": int(rounds[i, t]), "rollout/kept_frac": kept[i, t] / 2, "reward/accuracy": a}
                for t in range(4)]

    lspo = {n: [_seed(a, 30.0 + i, curve(i, a) if n.startswith("lspo") else []) for i, a in enumerate(v)]
            for n, v in acc.items()}
    settings = {"rl_steps": 4, "eval_problems": 500, "eval_samples": 4, "greedy": True, "smoke": False}
    tiers = lambda p, L: {"all": {"pass@1": p, "length_mean": L}, "easy": {"pass@1": p, "length_mean": L / 2},  # noqa
                          "hard": {"pass@1": p / 2, "length_mean": 2 * L}}
    dler = {"sft": [_seed(0, 0, tiers=tiers(0.50, 60.0 + i)) for i in range(3)],
            "grpo": [_seed(0, 0, tiers=tiers(0.55, 50.0)) for _ in range(3)],
            "dler": [_seed(0, 0, tiers=tiers(0.54, 25.0)) for _ in range(3)],
            "da_dler": [_seed(0, 0, tiers=tiers(0.52, 28.0)) for _ in range(3)],
            "dler_merged": [_seed(0, 0, tiers=tiers(0.53, 30.0)) for _ in range(3)]}
    studies_json = {"lspo": {"status": "run", "settings": settings, "seeds": [0, 1, 2], "results": lspo},
                    "dler": {"status": "run", "settings": settings, "seeds": [0, 1, 2], "results": dler},
                    "tracerl": {"status": "not run", "settings": settings, "seeds": [0], "results": {}}}
    paths = report.write_report(studies_json, str(tmp_path))
    assert {os.path.basename(p) for p in paths} == {"summary.md", "lspo_curves.png", "tradeoff.png"}
    summary = (tmp_path / "summary.md").read_text()
    row = _row(summary, "lspo_grpo")
    a = np.asarray(acc["lspo_grpo"]) * 100
    assert row[2] == f"{a.mean():.1f} ± {a.std(ddof=1):.1f}"
    by_len = 100 * (1 - (kept * 16 * rounds).sum(1) / (cand * rounds).sum(1))
    total = 100 * (1 - (kept * 16 * rounds).sum(1) / (16 * rounds).sum(1))
    assert row[4] == f"{by_len.mean():.1f} ± {by_len.std(ddof=1):.1f}"
    assert row[5] == f"{total.mean():.1f} ± {total.std(ddof=1):.1f}"
    groups = (kept / 2 * rounds * 16).mean(1)  # groups an update trained on, mean over steps
    assert row[6] == f"{groups.mean():.1f} ± {groups.std(ddof=1):.1f}"
    assert _row(summary[summary.index("## LSPO"):], "grpo")[4] == "–"  # the run without LSPO filters nothing
    # grpo: +9.0 points >> 2 SE -> yes; dapo: LSPO lower -> no; gspo: +2.0 < 2 SE (= 7.4) -> inconclusive.
    assert _row(summary, "LSPO on GRPO raises accuracy at equal updates")[-1] == "yes"
    assert _row(summary, "LSPO on DAPO raises accuracy at equal updates")[-1] == "no"
    assert _row(summary, "LSPO on GSPO raises accuracy at equal updates")[-1].startswith("inconclusive")
    # DLER: 25 <= 0.5 * 61 yes; 25 <= 0.8 * 50 yes; 54 >= 55 - 2 yes; DA-DLER easy 14 < 12.5 no; hard 26 >= 27-2 yes;
    # merge: loss 50-54 < 0 -> nothing to recover.
    verdicts = {"DLER halves the length of the SFT policy": "yes",
                "DLER clearly shorter than the correctness-only GRPO at the same step": "yes",
                "DLER accuracy within 2 points of GRPO": "yes", "DA-DLER shorter than DLER on easy problems": "no",
                "DA-DLER keeps accuracy on hard problems": "yes",
                "update-selective merge recovers accuracy lost to over-shortening":
                    "inconclusive (DLER lost no accuracy to recover)"}
    for text, want in verdicts.items():
        assert _row(summary, text)[-1] == want, text
    assert _row(summary, "sft")[2] == f"{np.mean([60, 61, 62]):.1f} ± {np.std([60, 61, 62], ddof=1):.1f}"
    assert re.search(r"## TraceRL.*\n\nnot run", summary)


def test_results_table_puts_a_claims_rows_from_each_start_together():
    settings = {"rl_steps": 4, "eval_problems": 500, "eval_samples": 2, "greedy": True, "smoke": False}

    def lspo_study(start, base, lspo):
        res = {"grpo": [_seed(a, 30.0) for a in base], "lspo_grpo": [_seed(a, 30.0) for a in lspo]}
        return {"study": "lspo", "status": "run", "settings": dict(settings, ar_start=start), "seeds": [0, 1, 2],
                "results": res}

    plateau = lspo_study("checkpoints/x", [0.80, 0.81, 0.82], [0.90, 0.91, 0.92])  # +10 points >> 2 SE: yes
    mid = lspo_study("", [0.50, 0.51, 0.52], [0.49, 0.50, 0.51])  # LSPO lower: no
    hapo_not_run = {"study": "hapo", "status": "not run", "settings": settings, "seeds": [0], "results": {}}
    block = results_table.table_block([("results/p", plateau), ("results/m", hapo_not_run), ("results/m", mid)])
    rows = [_row(block, "LSPO")] + [[c.strip() for c in x.strip("|").split("|")]
                                    for x in block.splitlines() if x.startswith("| LSPO |")][1:]
    assert [(r[2], r[3], r[5]) for r in rows] == [("plateaued SFT", "81.0 ± 1.0 → 91.0 ± 1.0; filtered – %", "yes"),
                                                  ("mid-SFT", "51.0 ± 1.0 → 50.0 ± 1.0; filtered – %", "no")]
    assert rows[0][4] == report.PAPER["lspo_grpo"] and rows[1][4] == "(same)"
    legend = [x for x in block.splitlines() if x.startswith("- ")]
    assert legend == ["- **plateaued SFT**: `checkpoints/x`, results in `results/p`; 3 seeds, 4 RL iterations, "
                      "500 problems × 2 samples",
                      "- **mid-SFT**: shipped `checkpoints/arith_tiny_sft`, results in `results/m`; 3 seeds, 4 RL "
                      "iterations, 500 problems × 2 samples"]
    readme = f"a\n{results_table.BEGIN}\nold\n{results_table.END}\nb\n"
    assert results_table.replace_block(readme, "new") == f"a\n{results_table.BEGIN}\nnew\n{results_table.END}\nb\n"
    with pytest.raises(ValueError, match="exactly one"):
        results_table.replace_block("no markers", "new")


def test_readme_results_table_is_what_the_committed_results_json_give(capsys):
    assert results_table.main(["--check"]) == 0, capsys.readouterr().out
