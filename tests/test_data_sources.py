"""User tasks: files with column mapping, chat rendering, overlong prompts, empty sets, bad task settings."""
import json
import sys

import pytest

from chat_testing import build_chat_tokenizer
from rl_testing import tiny_config

from jaxrl_reason.data import sources
from jaxrl_reason.data.loaders import load_examples


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_chat_tokenizer(str(tmp_path_factory.mktemp("chat_tok")))


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _config(train, heldout, **task):
    c = tiny_config(task__name="jsonl", task__train_path=train, task__eval_path=heldout, rollout__max_prompt_len=64)
    for k, v in task.items():
        c.task[k] = v
    return c


ROWS = [{"q": f"What is {i}+1?", "meta": {"gold": i + 1}} for i in range(4)]


def test_column_mapping_chat_template_and_instruction(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", ROWS)
    c = _config(path, path, prompt_key="q", answer_key="meta.gold", instruction="Box it.", system_prompt="")
    train, heldout = sources.build_examples(c, tok)
    assert [e.answer for e in train] == ["1", "2", "3", "4"] and len(heldout) == 4
    assert train[0].prompt == "<|im_start|>user\nWhat is 0+1? Box it.<|im_end|>\n<|im_start|>assistant\n"
    assert train[0].extra["raw_prompt"] == "What is 0+1?"
    c.task.chat_template = "off"
    assert sources.build_examples(c, tok)[0][1].prompt == "What is 1+1? Box it."


def test_overlong_prompts_filtered_truncated_or_fatal(tmp_path, tok, caplog):
    rows = ROWS + [{"q": "no answer field"}, {"q": "x" * 200, "meta": {"gold": 0}}]  # a skipped row before it
    path = _jsonl(tmp_path / "long.jsonl", rows)
    c = _config(path, path, prompt_key="q", answer_key="meta.gold", chat_template="off")
    train, _ = sources.build_examples(c, tok)
    assert len(train) == 4 and "dropped 1 of 5 prompts longer than rollout.max_prompt_len=64" in caplog.text
    c.task.on_overlong = "truncate"
    train, _ = sources.build_examples(c, tok)
    assert len(train) == 5 and train[4].prompt == "x" * 64
    c.task.on_overlong = "raise"
    # named by its line in the file (6), not its index among the parsed examples (5)
    with pytest.raises(ValueError, match=r"long.jsonl:line 6: the prompt has 200 tokens, more than "
                                         r"rollout.max_prompt_len=64"):
        sources.build_examples(c, tok)


def test_empty_sets_are_one_sentence(tmp_path, tok):
    good = _jsonl(tmp_path / "good.jsonl", ROWS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="the held-out set .*empty.jsonl' is empty"):
        sources.build_examples(_config(good, str(empty), prompt_key="q", answer_key="meta.gold"), tok)
    with pytest.raises(ValueError, match="the training set .*empty.jsonl' is empty"):
        sources.build_examples(_config(str(empty), good, prompt_key="q", answer_key="meta.gold"), tok)


def test_malformed_rows_reported_with_lines_or_fatal(tmp_path, caplog):
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], "{oops", {"q": "no answer"}, ROWS[1]])
    examples, skipped = load_examples(path, prompt_key="q", answer_key="meta.gold")
    assert skipped == 2 and len(examples) == 2
    assert "skipped 2 malformed rows of 4 (line 2: invalid JSON" in caplog.text
    assert "line 3: no answer field 'meta.gold'" in caplog.text
    with pytest.raises(ValueError, match=r"bad.jsonl:line 2: invalid JSON"):
        load_examples(path, on_error="raise", prompt_key="q", answer_key="meta.gold")


def test_saved_datasets_directory_without_the_package_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ValueError, match="needs the `datasets` package"):
        load_examples(str(tmp_path))


@pytest.mark.parametrize("task, sentence", [
    (dict(name="csv"), "unknown task 'csv'"),
    (dict(name="jsonl", train_path=""), "needs task.train_path"),
    (dict(name="jsonl", train_path="nope.jsonl", eval_path="nope.jsonl"), "task.train_path 'nope.jsonl' does not"),
    (dict(name="reasoning_gym", reasoning_gym_task="no_such_task"), "unknown reasoning_gym task 'no_such_task'"),
    (dict(on_overlong="drop"), "task.on_overlong must be one of"),
])
def test_bad_task_settings_fail_at_validation(task, sentence):
    c = tiny_config()
    for k, v in task.items():
        c.task[k] = v
    with pytest.raises(ValueError, match=sentence):
        sources.validate_task(c)


def test_reasoning_gym_task_by_name_builds_and_scores(tok):
    c = tiny_config(task__name="reasoning_gym", task__reasoning_gym_task="chain_sum", eval__num_problems=3,
                    rollout__max_prompt_len=400, task__chat_template="off")
    sources.validate_task(c)
    sources.NUM_REASONING_GYM_TRAIN, old = 5, sources.NUM_REASONING_GYM_TRAIN
    try:
        train, heldout = sources.build_examples(c, tok)
    finally:
        sources.NUM_REASONING_GYM_TRAIN = old
    assert len(train) == 5 and len(heldout) == 3
    scorer = sources.scorer_for(c)
    ex = heldout[0]
    assert list(scorer([f"<answer>{ex.answer}</answer>", "<answer>nonsense</answer>"], [ex, ex])) == [1.0, 0.0]


def test_sft_pairs_from_chat_rows_and_gsm8k_solutions(tmp_path, tok):
    from jaxrl_reason.data.sft_data import sft_pairs

    rows = [{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "1+1?"},
                        {"role": "assistant", "content": "#### 2"}], "answer": "2"},
            {"question": "2+2?", "answer": "2+2=4\n#### 4"},
            {"question": "3+3?", "answer": "6", "completion": "so 6"},
            {"question": "long?", "answer": "1", "completion": "y" * 40}]
    c = _config(_jsonl(tmp_path / "sft.jsonl", rows), "")
    c.rollout.max_new_tokens = 16
    prompts, responses = sft_pairs(c, tok)
    assert responses == ["#### 2", "2+2=4\n#### 4", "so 6"]  # the 41-token response (with EOS) is dropped
    assert prompts[0] == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[1] == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_saved_datasets_directory_reads_like_the_jsonl_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
    rows.append({"question": "no answer here"})  # malformed: skipped and counted in both forms
    jsonl = _jsonl(tmp_path / "gsm.jsonl", rows)
    table = {k: [r.get(k) for r in rows] for k in ("question", "answer")}
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "gsm_ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)}).save_to_disk(str(tmp_path / "gsm_dict"))
    want, skipped = load_examples(jsonl, default_data_source="gsm")
    assert [e.answer for e in want] == ["1", "2", "3"] and skipped == 1
    for d in ("gsm_ds", "gsm_dict"):
        got, skipped = load_examples(str(tmp_path / d), default_data_source="gsm")
        assert skipped == 1 and [(e.prompt, e.answer) for e in got] == [(e.prompt, e.answer) for e in want], d
