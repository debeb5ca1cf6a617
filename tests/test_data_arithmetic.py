"""The arithmetic task: hand-computed problems, traces, scores, and disjoint splits."""
import numpy as np
import pytest

from jaxrl_reason.data import arithmetic as A

P = A.Problem(prompt="12+7+30:", answer="49", level=1, terms=(12, 7, 30))


def test_level_spec_hand_values():
    assert [A.level_spec(lv) for lv in (0, 1, 2, 3, 4, 8)] == [(3, 1), (3, 2), (3, 3), (4, 1), (4, 2), (5, 3)]
    # The documented inverse: level = (n_terms - 3) * 3 + (digits - 1).
    assert all((n - 3) * 3 + (d - 1) == lv for lv in A.LEVELS for n, d in [A.level_spec(lv)])
    with pytest.raises(ValueError, match="level"):
        A.level_spec(9)


def test_make_problem_format_and_ranges():
    p = A.make_problem(np.random.default_rng(0), 4)
    assert p == A.Problem(prompt="85+64+51+27:", answer="227", level=4, terms=(85, 64, 51, 27))
    rng = np.random.default_rng(1)
    for lv in A.LEVELS:
        n, d = A.level_spec(lv)
        for _ in range(20):
            p = A.make_problem(rng, lv)
            assert len(p.terms) == n and all(1 <= t < 10**d for t in p.terms)
            assert p.prompt == "+".join(map(str, p.terms)) + ":" and p.answer == str(sum(p.terms))


def test_steps_hand_computed():
    assert A.steps((12, 7, 30)) == [(12, 7, 19), (19, 30, 49)]
    assert A.steps([1, 2, 3, 4]) == [(1, 2, 3), (3, 3, 6), (6, 4, 10)]
    with pytest.raises(ValueError):
        A.steps([5])


def test_trace_without_rechecks_is_the_plain_solution():
    for seed in range(3):
        assert A.solution_trace(P, np.random.default_rng(seed), recheck_prob=0.0) == "12+7=19 19+30=49 #### 49"


def test_trace_golden_strings_fixed_seed():
    assert (A.solution_trace(P, np.random.default_rng(0), recheck_prob=1.0)
            == "12+7=19 check 12+7=19 check 12+7=19 check 12+7=19 19+30=49 #### 49")
    assert (A.solution_trace(P, np.random.default_rng(1), recheck_prob=1.0)
            == "12+7=19 check 12+7=19 check 12+7=19 19+30=49 check 19+30=49 check 19+30=49 #### 49")
    assert A.solution_trace(P, np.random.default_rng(0), 0.0, error_prob=1.0) == "12+7=14 14+30=47 #### 47"


def test_trace_follows_the_documented_draw_order():
    """Rebuild traces from the documented random draws with an independent generator of the same seed."""
    problems = A.sample_problems(3, 30)
    for seed, p in enumerate(problems):
        rng = np.random.default_rng(seed)
        segs = [[f"{a}+{b}={c}"] for a, b, c in A.steps(p.terms)]
        if rng.random() < 0.7:
            k = rng.integers(1, 4)
            for i in rng.integers(0, len(segs), size=k):
                segs[i].append("check " + segs[i][0])
        expected = " ".join(s for seg in segs for s in seg) + f" #### {p.answer}"
        got = A.solution_trace(p, np.random.default_rng(seed), recheck_prob=0.7, max_rechecks=3)
        assert got == expected
        assert A.score(got, p.answer) == 1.0


def test_recheck_rate_and_noisy_steps():
    problems = A.sample_problems(0, 400)
    rng = np.random.default_rng(0)
    traces = [A.solution_trace(p, rng, recheck_prob=0.9) for p in problems]
    counts = np.array([A.recheck_count(t) for t in traces])
    assert 0.85 < np.mean(counts > 0) < 0.95                      # binomial(400, 0.9): sd 0.015
    assert counts.max() <= 4 and set(counts[counts > 0]) == {1, 2, 3, 4}
    for t, p in zip(traces, problems):   # every check repeats a correct step, answers stay right
        assert all(a + b == c for a, b, c, _ in A.parse_steps(t)) and A.score(t, p.answer) == 1.0
    noisy = [A.solution_trace(p, rng, recheck_prob=0.0, error_prob=1.0) for p in problems[:50]]
    for t, p in zip(noisy, problems[:50]):
        eqs = A.parse_steps(t)
        assert len(eqs) == len(p.terms) - 1 and all(a + b != c and c >= 0 for a, b, c, _ in eqs)
        assert all(eqs[i][2] == eqs[i + 1][0] for i in range(len(eqs) - 1))   # errors propagate
        assert A.score(t, str(eqs[-1][2])) == 1.0   # the trace's own final; errors may cancel out
    assert np.mean([A.score(t, p.answer) for t, p in zip(noisy, problems[:50])]) < 0.3
    with pytest.raises(ValueError):
        A.solution_trace(P, rng, recheck_prob=1.5)
    with pytest.raises(ValueError):
        A.solution_trace(P, rng, max_rechecks=0)


@pytest.mark.parametrize("text, answer, expected", [
    ("12+7=19 19+30=49 #### 49", "49", 1.0),
    ("12+7=19 19+30=48 #### 48", "49", 0.0),
    ("#### 4 then #### 49", "49", 1.0),         # the LAST #### counts
    ("#### 49 then #### 4", "49", 0.0),
    ("  ####   49 \n", "49", 1.0),
    ("#### 49 check", "49", 0.0),
    ("#### 49.0", "49", 0.0),
    ("#### 049", "49", 1.0),                    # the integer value is compared
    ("#### -3", "-3", 1.0),
    ("49", "49", 0.0),
    ("#### 49 ####", "49", 0.0),
    ("#### " + "0" * 39 + "1", "1", 0.0),         # over 32 digits: bounded, scores 0
    ("#### 7", 7, 1.0),
])
def test_score_crafted(text, answer, expected):
    assert A.score(text, answer) == expected


def test_score_rejects_non_integer_gold():
    with pytest.raises(ValueError, match="integer"):
        A.score("#### 1", "1.5")


def test_recheck_count_and_parse_steps():
    t = "1+2=3 check 1+2=3 3+4=8 check 3+4=8 rechecked checks #### 8"
    assert A.recheck_count(t) == 2
    assert A.parse_steps(t) == [(1, 2, 3, False), (1, 2, 3, True), (3, 4, 8, False), (3, 4, 8, True)]
    assert A.recheck_count("") == 0 and A.parse_steps("#### 3") == []


def test_sample_problems_deterministic_and_levels():
    a, b = A.sample_problems(5, 50, (2, 6)), A.sample_problems(5, 50, (2, 6))
    assert a == b and a != A.sample_problems(6, 50, (2, 6))
    assert {p.level for p in a} == {2, 6}
    assert A.sample_problems(0, 0) == []
    with pytest.raises(ValueError):
        A.sample_problems(0, 3, (9,))


def test_split_disjoint_never_overlaps_and_heldout_is_fixed():
    train, held = A.split_disjoint(2000, 90, levels=(0, 1, 2))
    assert len(train) == 2000 and len(held) == 90
    held_prompts = {p.prompt for p in held}
    assert len(held_prompts) == 90                                  # distinct
    assert not held_prompts & {p.prompt for p in train}             # disjoint
    assert [p.level for p in held] == [0, 1, 2] * 30                # round-robin levels
    # The held-out set depends only on (heldout_seed, n_heldout, levels).
    train2, held2 = A.split_disjoint(10, 90, levels=(0, 1, 2), train_seed=99)
    assert held2 == held and train2 != train[:10]
    assert A.split_disjoint(10, 90, levels=(0, 1, 2), heldout_seed=7)[1] != held
    # Level 0 has only 9**3 = 729 distinct problems.
    with pytest.raises(ValueError, match="distinct"):
        A.split_disjoint(0, 800, levels=(0,), max_tries_per_item=5)


def test_to_example():
    ex = A.to_example(P)
    assert (ex.prompt, ex.answer, ex.data_source, ex.extra) == ("12+7+30:", "49", "arithmetic",
                                                                {"level": 1, "terms": [12, 7, 30]})
