"""Answer extraction (hand cases, adversarial inputs), math-verify equivalence, format rewards."""
import pytest

from jaxrl_reason.rewards.math import (MAX_ANSWER_CHARS, extract_answer, format_reward, hash_answer, last_boxed,
                                       math_equal, math_score)


@pytest.mark.parametrize("text, expected", [
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{1} first, then \\boxed{x^{2}+\\{3\\}}", "x^{2}+\\{3\\}"),          # last box, nested braces
    ("\\fbox{7}", "7"),
    ("\\boxed{1} and then a cut-off \\boxed{2", None),                          # last box unbalanced
    ("\\boxed 5", None),                                                        # a box without braces
    ("#### 72", "72"),
    ("reasoning #### 1,000.\nmore text", "1000"),
    ("#### 3 then #### (1,2)", "(1,2)"),
    ("####   \n42", None),                                                      # empty after ####
    ("it costs 12 dollars, total 3.5", "3.5"),
    ("x = 5-3 so 12,345 apples", "12345"),
    ("the answer is -7", "-7"),
    ("we get 2/3", "2/3"),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer_hand_cases(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", [
    "x" * 10**6,                                              # a megabyte without an answer
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",     # 10k nested braces: content too long
    "\\boxed{" * 100_000,                                     # many unbalanced boxes
    "{" * 10**6 + "\\boxed{" + "}" * 10**6,
    "7" * 10**6,                                              # one huge number
    "#### " + "9" * (MAX_ANSWER_CHARS + 5),
])
def test_extract_answer_adversarial_returns_none(text):
    assert extract_answer(text) is None


def test_bounded_answers_and_last_boxed_limits():
    assert extract_answer("a" * 10**6 + " 42") == "42"                      # megabyte with a final number
    assert last_boxed("\\boxed{" + "1" * 20 + "}", max_chars=20) == "1" * 20
    assert last_boxed("\\boxed{" + "1" * 21 + "}", max_chars=20) is None
    assert hash_answer("no hashes") is None and hash_answer("#### 1,234,567.") == "1234567"


@pytest.mark.parametrize("pred, gold, expected", [
    ("0.5", "\\frac12", True),
    ("\\frac{1}{2}", "1/2", True),
    ("1/3", "0.5", False),
    ("x^2+2x", "x(x+2)", True),
    ("1,000", "1000", True),
    ("72", "72", True),
    ("-7", "7", False),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    (None, "1", False),
    ("1" * (MAX_ANSWER_CHARS + 1), "1", False),                            # too long: False, not parsed
])
def test_math_equal(pred, gold, expected):
    pytest.importorskip("math_verify")
    assert math_equal(pred, gold) is expected


def test_math_equal_with_math_verify_timers_in_main_thread():
    pytest.importorskip("math_verify")
    assert math_equal("0.25", "\\frac{1}{4}", timeout_s=5) is True


def test_math_score():
    pytest.importorskip("math_verify")
    assert math_score("We find $\\boxed{\\dfrac{3}{4}}$.", "0.75") == 1.0
    assert math_score("so #### 18", "18") == 1.0
    assert math_score("total is 19", "18") == 0.0
    assert math_score("nothing", "18") == 0.0


@pytest.mark.parametrize("text, style, expected", [
    ("so \\boxed{3}", "boxed", 1.0),
    ("so \\boxed{3", "boxed", 0.0),
    ("3", "boxed", 0.0),
    ("work\n#### 3", "hash", 1.0),
    ("work\n####", "hash", 0.0),
    ("<think>a</think> <answer>3</answer>", "think_answer", 1.0),
    ("  <think>a\nb</think>\n<answer>3</answer>\n", "think_answer", 1.0),
    ("<think>a</think> x <answer>3</answer>", "think_answer", 0.0),          # text between the blocks
    ("<think>a</think><answer>3</answer> more", "think_answer", 0.0),        # text after </answer>
    ("<answer>3</answer><think>a</think>", "think_answer", 0.0),             # wrong order
    ("<think>a</think><think>b</think><answer>3</answer>", "think_answer", 0.0),
    ("<think>" + "a" * 10**6 + "</think><answer>3</answer>", "think_answer", 1.0),
])
def test_format_reward(text, style, expected):
    assert format_reward(text, style) == expected


def test_format_reward_bad_style():
    with pytest.raises(ValueError, match="style"):
        format_reward("x", "xml")
