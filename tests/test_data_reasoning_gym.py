"""reasoning-gym adapter: deterministic examples, answers checked independently, the task's own scorer."""
import json
import re

import pytest

pytest.importorskip("reasoning_gym")

from jaxrl_reason.data import reasoning_gym_tasks as R  # noqa: E402
from jaxrl_reason.rewards.pool import VerifierPool  # noqa: E402


def _make(task, n, seed, **kw):
    try:
        return R.make_examples(task, n, seed, **kw)
    except ImportError as e:   # a task whose optional dependency is missing
        pytest.skip(f"{task} needs something unavailable: {e}")


def test_chain_sum_examples_match_an_independent_evaluation():
    exs = _make("chain_sum", 6, seed=3, min_terms=2, max_terms=4, min_digits=1, max_digits=2)
    assert exs == _make("chain_sum", 6, seed=3, min_terms=2, max_terms=4, min_digits=1, max_digits=2)
    assert exs != _make("chain_sum", 6, seed=4, min_terms=2, max_terms=4, min_digits=1, max_digits=2)
    for ex in exs:
        expr = ex.extra["entry"]["metadata"]["expression"]
        assert re.fullmatch(r"[\d +\-]+", expr) and expr in ex.prompt
        tokens = expr.split()            # "a - b + c": evaluate left to right by hand
        value = int(tokens[0])
        for op, num in zip(tokens[1::2], tokens[2::2]):
            value = value + int(num) if op == "+" else value - int(num)
        assert ex.answer == str(value)
        assert ex.data_source == "reasoning_gym/chain_sum"
        assert ex.extra["task_kwargs"] == {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2}
        json.dumps(ex.extra)             # storable by tfds_builders


@pytest.mark.parametrize("task", ["basic_arithmetic", "chain_sum"])
def test_score_uses_the_task_scorer(task):
    exs = _make(task, 4, seed=0)
    for ex in exs:
        assert R.score(f"thinking...<answer> {ex.answer} </answer>", ex) == 1.0
        assert R.score(f"<answer>{ex.answer}</answer>", ex.extra) == 1.0      # gold as Example.extra
        assert R.score(ex.answer, ex.extra) == 1.0                             # untagged: whole text
        wrong = str(int(ex.answer) + 1)
        assert R.score(f"<answer>{wrong}</answer>", ex) == 0.0
        assert R.score(f"<answer>{wrong}</answer> {ex.answer}", ex) == 0.0     # the tag wins
        assert R.score(f"<answer>{ex.answer}</answer>", ex, answer_tag=None) < 1.0  # task-defined partial credit
    with pytest.raises(ValueError, match="gold"):
        R.score("1", {"entry": {}})


def test_extract_tagged_answer():
    assert R.extract_tagged_answer("a <answer>1</answer> b <answer> 2 </answer>") == "2"
    assert R.extract_tagged_answer("  no tags ") == "no tags"
    assert R.extract_tagged_answer("<answer>open", answer_tag="answer") == "<answer>open"
    assert R.extract_tagged_answer("<ans>3</ans>", answer_tag="ans") == "3"


def test_pool_in_process_with_registered_name():
    exs = _make("chain_sum", 3, seed=1)
    responses = [f"<answer>{exs[0].answer}</answer>", "<answer>nope</answer>", exs[2].answer]
    scores, info = VerifierPool(num_workers=0).score_batch("reasoning_gym", responses, [e.extra for e in exs])
    assert scores.tolist() == [1.0, 0.0, 1.0] and info["errors"] == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown reasoning_gym task"):
        R.make_examples("no_such_task", 2, 0)
    with pytest.raises(ValueError, match="n must be"):
        R.make_examples("chain_sum", 0, 0)


def test_scoring_is_identical_after_tfds_storage(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from jaxrl_reason.data.tfds_builders import build_dataset, load_split

    exs = _make("basic_arithmetic", 3, seed=2)
    src = load_split(build_dataset({"train": exs}, str(tmp_path), "rg_basic"), "train")
    for i, ex in enumerate(exs):
        row = src[i]
        assert (row["prompt"], row["answer"], row["extra"]) == (ex.prompt, ex.answer, ex.extra)
        assert R.score(f"<answer>{ex.answer}</answer>", row["extra"]) == 1.0
