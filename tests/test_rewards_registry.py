"""Rewards by config: registry names, weighted sums, user functions by import path."""
import numpy as np
import pytest

from jaxrl_reason.data.example import Example
from jaxrl_reason.rewards.registry import import_function, make_scorer, parse_reward_spec

EX = Example(prompt="6*7?", answer="42", data_source="s", extra={"unit": "apples"})


def user_reward(completion, example):
    """A user reward that reads the example: 1 if the completion names the example's unit."""
    return float(example.extra["unit"] in completion)


def test_spec_parsing_and_bad_specs():
    assert parse_reward_spec("math") == [(1.0, "math")]
    assert parse_reward_spec("0.9*math, 0.1*format") == [(0.9, "math"), (0.1, "format")]
    with pytest.raises(ValueError, match="unknown reward 'maths'"):
        parse_reward_spec("maths")
    with pytest.raises(ValueError, match="the weight 'x' is not a number"):
        parse_reward_spec("x*math")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.r'"):
        import_function("no_such_pkg.r:score")
    with pytest.raises(ValueError, match="has no 'nope'"):
        import_function("test_rewards_registry:nope")


def test_weighted_math_and_format_by_hand():
    scorer = make_scorer("0.9*math,0.1*format")
    texts = ["so \\boxed{42}", "#### 41", "the answer is 42", "nothing"]
    # math: 1, 0, 1, 0; format (boxed or ####): 1, 1, 0, 0
    np.testing.assert_allclose(scorer(texts, [EX] * 4), [1.0, 0.1, 0.9, 0.0], rtol=1e-6)
    np.testing.assert_allclose(scorer(texts, ["42"] * 4), [1.0, 0.1, 0.9, 0.0], rtol=1e-6)  # answers also work
    assert scorer.final_answer("x \\boxed{7}") == "7" and scorer.final_answer("none") == ""


def test_user_function_receives_completion_and_example():
    scorer = make_scorer("math,0.5*test_rewards_registry:user_reward")
    np.testing.assert_allclose(scorer(["42 apples", "42 pears"], [EX, EX]), [1.5, 1.0])


def test_user_function_returning_nan_is_one_sentence():
    import test_rewards_registry as me

    me.nan_reward = lambda c, e: float("nan")
    with pytest.raises(ValueError, match="returned nan"):
        make_scorer("test_rewards_registry:nan_reward")(["x"], [EX])


def test_code_reward_runs_the_examples_tests():
    ex = Example(prompt="double", answer="-", data_source="s", extra={"tests": ["assert f(2) == 4", "assert f(0) == 0"]})
    scorer = make_scorer("code")
    good = "```python\ndef f(x):\n    return 2 * x\n```"
    half = "```python\ndef f(x):\n    return x + 2\n```"
    np.testing.assert_allclose(scorer([good, half], [ex, ex]), [1.0, 0.5])
