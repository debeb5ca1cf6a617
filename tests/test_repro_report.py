"""The reproduction study's report (study/report.py, plots.py, table.py): statistics, verdicts, tables and plot
data against numpy / hand-computed references on synthetic results, and the generated claims table of
study/README.md against the committed results JSON."""
import os
import re

import numpy as np
import pytest

from study import plots, report
from study import table as results_table


def test_tradeoff_points_keep_same_named_runs_of_different_work_dirs_apart():
    def seeds(workdir, acc, length):
        return [{"workdir": workdir, "eval_after": {"pass@1": acc, "length_mean": length}} for _ in range(2)]

    run = {"status": "run"}
    points, _ = plots.tradeoff_points({
        "lspo": {**run, "results": {"grpo": seeds("w/grpo", 0.5, 40.0), "dapo": seeds("w/dapo4", 0.6, 50.0)}},
        "lspo_fill": {**run, "results": {"grpo": seeds("w/grpo", 0.5, 40.0), "dapo": seeds("w/dapo12", 0.7, 30.0)}}})
    assert points == {"grpo": (40.0, 0.0, 0.5, 0.0), "dapo": (50.0, 0.0, 0.6, 0.0),
                      "dapo (lspo_fill)": (30.0, 0.0, 0.7, 0.0)}


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


def test_tracerl_claims_and_the_paper_numbers_once_under_both_diffusion_studies(tmp_path):
    """Both TraceRL studies get a section with before -> after claims; the paper's numbers appear once."""
    settings = {"rl_steps": 4, "eval_problems": 500, "eval_samples": 2, "greedy": False, "smoke": False}
    loss = lambda xs: [{"train/loss": x, "reward/accuracy": 0.5} for x in xs]  # noqa: E731
    tracerl = {"block_tracerl": [_seed(a, 70.0, loss([0.0, 0.2]), before=0.75) for a in (0.66, 0.67, 0.68)],
               "block_onestep": [_seed(a, 70.0, loss([0.0, 0.1]), before=0.75) for a in (0.64, 0.67, 0.70)],
               "block_tracerl_value": [_seed(0.6, 70.0, loss([0.0, 0.1]), before=0.75) for _ in range(3)],
               "full_tracerl": [_seed(a, 90.0, loss([0.1, 0.1]), before=0.08) for a in (0.12, 0.13, 0.14)]}
    lr = {"block_tracerl_lr1e-5": [_seed(a, 70.0, loss([0.0, 0.0]), before=b)
                                   for a, b in ((0.76, 0.74), (0.75, 0.74), (0.77, 0.75))]}
    run = lambda res: {"status": "run", "settings": settings, "seeds": [0, 1, 2], "results": res}  # noqa: E731
    report.write_report({"tracerl": run(tracerl), "tracerl_lr": run(lr)}, str(tmp_path), {"claim": "number"})
    summary = (tmp_path / "summary.md").read_text()
    # before 75 -> after 67 +- 1: lower -> no; 8 -> 13 +- 1: SE = 0.58 -> yes; 66.0 vs 67.0, SE = 1.9: inconclusive.
    assert _row(summary, "block_tracerl: RL raises accuracy")[2:] == ["75.0 ± 0.0 → 67.0 ± 1.0",
                                                                      "see the paper's numbers below", "no"]
    assert _row(summary, "full_tracerl: RL raises accuracy")[-1] == "yes"
    assert _row(summary, "TraceRL beats the one-step estimator")[-1].startswith("inconclusive")
    assert _row(summary, "the value model stabilises training")[-1] == "yes"  # std 0.1 vs 0.05, no spread
    # lr 1e-5: 74.3 +- 0.6 -> 76.0 +- 1.0: difference 1.7 > 2 SE = 2 * sqrt((0.33 + 1) / 3) = 1.33 -> yes
    assert re.search(r"## Block TraceRL at lr 1e-5.*\n\nSeeds \[0, 1, 2\]", summary)
    assert _row(summary, "block_tracerl_lr1e-5: RL raises accuracy")[-1] == "yes"
    assert summary.count("- claim: number") == 1 and summary.index("- claim: number") < summary.index("lr 1e-5")
    assert {os.path.basename(p) for p in os.listdir(tmp_path)} == {"summary.md", "tracerl_curves.png",
                                                                    "tracerl_lr_curves.png"}
    tracerl_st, lr_st = ({"study": name, **run(res)} for name, res in (("tracerl", tracerl), ("tracerl_lr", lr)))
    tracerl_st["settings"] = dict(settings, sft_start={"block": "b", "full": "f"})
    lr_st["settings"] = dict(settings, sft_start={"block": "b"})
    block = results_table.table_block([("results/g", tracerl_st), ("results/g", lr_st)], {"claim": "number"})
    assert _row(block, "TraceRL (lr 1e-5)")[1:3] == ["block_tracerl_lr1e-5: RL raises accuracy", "diffusion SFT"]
    assert block.endswith("- claim: number") and block.count("- claim: number") == 1
    protocol = "results in `results/g`; 3 seeds, 4 RL iterations, 500 problems × 2 samples"
    assert [x for x in block.splitlines() if x.startswith("- **")] == [  # the two starts told apart by study
        f"- **diffusion SFT**, TraceRL: `b`, `f`, {protocol}",
        f"- **diffusion SFT**, TraceRL (lr 1e-5): `b`, {protocol}"]


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
