"""JSONL / parquet loaders: verl fields, GSM8K / MATH normalization, skip counts and error line numbers."""
import json

import pytest

from jaxrl_reason.data.example import Example
from jaxrl_reason.data.loaders import load_examples, normalize_answer, row_to_example

ROWS = [
    # 1: verl layout, chat prompt, reward_model.ground_truth, extra_info kept
    {"data_source": "openai/gsm8k", "prompt": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "What is 6*7?"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": "42"}, "extra_info": {"index": 0}},
    # 2: GSM8K raw: answer with reasoning and '#### 1,234'
    {"question": "Add them.", "answer": "600+634 = 1,234\n#### 1,234"},
    "BROKEN",                                         # 3: invalid JSON
    # 4: MATH raw: solution with a nested \boxed{}
    {"problem": "Half?", "solution": "So it is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
    {"prompt": "no answer here"},                     # 5: missing answer
    None,                                             # 6: blank line (ignored, not counted)
    [1, 2],                                           # 7: not an object
    {"prompt": "Numeric?", "ground_truth": 7},        # 8: numeric answer
    {"prompt": [{"role": "system", "content": "x"}], "answer": "1"},   # 9: chat without a user message
    {"prompt": "Empty?", "answer": "####  "},         # 10: empty after normalization
]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write("\n" if r is None else (r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_jsonl_normalization_and_skip_count(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "mix.jsonl", ROWS)
    examples, n_skipped = load_examples(path)
    assert n_skipped == 5                     # lines 3, 5, 7, 9, 10 (the blank line 6 is not counted)
    assert [e.answer for e in examples] == ["42", "1234", "\\frac{1}{2}", "7"]
    assert [e.prompt for e in examples] == ["What is 6*7?", "Add them.", "Half?", "Numeric?"]
    assert [e.data_source for e in examples] == ["openai/gsm8k", "mix", "mix", "mix"]
    e0 = examples[0]
    assert e0.extra == {"ability": "math", "reward_model": {"style": "rule"}, "extra_info": {"index": 0},
                        "messages": ROWS[0]["prompt"]}
    assert examples[1].extra == {"raw_answer": "600+634 = 1,234\n#### 1,234"}
    assert examples[2].extra == {"level": "Level 1", "raw_answer": ROWS[3]["solution"]}
    assert examples[3].extra == {}                   # "7" == str(7): nothing was changed
    assert "skipped 5 malformed rows of 9" in caplog.text


@pytest.mark.parametrize("rows, line, reason", [
    (ROWS, 3, "invalid JSON"),
    (ROWS[3:], 2, "no answer field"),
    ([ROWS[0], None, ROWS[6]], 3, "row is a list, not an object"),
    ([ROWS[8]], 1, "no user message"),
    ([ROWS[9]], 1, "empty after normalization"),
    ([{"text": "x", "answer": "1"}], 1, "no prompt field"),
])
def test_jsonl_raise_names_file_and_line(tmp_path, rows, line, reason):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=f"bad.jsonl:line {line}: .*{reason}"):
        load_examples(path, on_error="raise")


def test_parquet_verl_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"data_source": "lighteval/MATH", "prompt": [{"role": "user", "content": "1+1?"}],
         "reward_model": {"style": "rule", "ground_truth": "2"}, "extra_info": {"index": 5, "split": "test"}},
        {"data_source": "lighteval/MATH", "prompt": [{"role": "user", "content": "Empty?"}],
         "reward_model": {"style": "rule", "ground_truth": ""}, "extra_info": {"index": 6, "split": "test"}},
        {"data_source": None, "prompt": [{"role": "user", "content": "x?"}],
         "reward_model": {"style": "rule", "ground_truth": "\\boxed{x^{2}}"}, "extra_info": None},
    ])
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path)
    examples, n_skipped = load_examples(path)
    assert n_skipped == 1
    assert examples[0] == Example("1+1?", "2", "lighteval/MATH", {
        "reward_model": {"style": "rule"}, "extra_info": {"index": 5, "split": "test"},
        "messages": [{"role": "user", "content": "1+1?"}]})
    assert (examples[1].answer, examples[1].data_source) == ("x^{2}", "t")
    with pytest.raises(ValueError, match="t.parquet:row 2: answer '' is empty"):
        load_examples(path, on_error="raise")


def test_missing_file_bad_extension_bad_switch(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="extension"):
        load_examples(str(tmp_path / "a.csv"))
    with pytest.raises(ValueError, match="on_error"):
        load_examples(str(tmp_path / "a.csv"), on_error="ignore")


@pytest.mark.parametrize("raw, expected", [
    ("Janet ... so 18.\n#### 18", "18"),
    ("#### 1,000,000", "1000000"),
    ("a #### 1 b #### -5.", "-5"),
    ("$\\boxed{\\dfrac{3}{4}}$", "\\dfrac{3}{4}"),
    ("\\boxed{1} and \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("  (3, 4) ", "(3, 4)"),
    (12, "12"),
    (0.5, "0.5"),
    ("\\boxed{unbalanced", None),
    ("   ", None),
    (None, None),
    (True, None),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_row_to_example_reason():
    with pytest.raises(ValueError, match="prompt must be a string"):
        row_to_example({"prompt": 5, "answer": "1"}, "src")
