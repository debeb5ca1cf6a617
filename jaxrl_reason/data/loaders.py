"""Local JSONL / parquet prompt sets with verl-style fields, normalized into `Example`s.

Row fields understood (verl's `RLHFDataset` layout and the usual GSM8K / MATH dumps):
  prompt       a string, or a chat list of {"role", "content"}: `Example.prompt` is then the content of the
               LAST user message and the full list is kept in `extra["messages"]` (apply a chat template later);
               a row with `question` or `problem` instead of `prompt` also works.
  answer       the first present of `reward_model.ground_truth`, `ground_truth`, `answer`, `solution`;
               numbers become strings. Normalization (`normalize_answer`): text with `####` -> what follows
               the last `####` (GSM8K: `"... #### 1,000"` -> `"1000"`); text with `\\boxed{}` -> the last box's
               content (MATH: `solution`); anything else stripped.
  data_source  the row's `data_source`, else `default_data_source` (the file's stem).
  extra        every other field, plus `messages` for chat prompts and `raw_answer` when normalization
               changed the answer.

Malformed rows (invalid JSON, not an object, no prompt, no answer, an empty answer after normalization):
`on_error="skip"` skips them, counts them and logs one warning with the count; `on_error="raise"` raises
ValueError naming the file and line (JSONL, 1-based) or row (parquet, 1-based). Blank JSONL lines are ignored.
"""
import json
import logging
import os

from jaxrl_reason.data.example import Example
from jaxrl_reason.rewards.math import hash_answer, last_boxed

_PROMPT_KEYS = ("prompt", "question", "problem")
_ANSWER_KEYS = (("reward_model", "ground_truth"), ("ground_truth",), ("answer",), ("solution",))


def normalize_answer(text) -> str | None:
    """GSM8K `#### x` -> x, MATH `\\boxed{x}` -> x, else the stripped text; None if nothing is left."""
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        return None
    text = str(text)
    if "####" in text:
        return hash_answer(text, max_chars=len(text))
    if "\\boxed" in text or "\\fbox" in text:
        return last_boxed(text, max_chars=len(text))
    return text.strip() or None


def _prompt_of(row: dict):
    """(prompt text, messages or None); raises ValueError with the reason."""
    key = next((k for k in _PROMPT_KEYS if k in row), None)
    if key is None:
        raise ValueError(f"no prompt field (one of {_PROMPT_KEYS})")
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty prompt")
        return key, value, None
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        users = [m["content"] for m in value if m["role"] == "user"]
        if not users:
            raise ValueError("chat prompt has no user message")
        return key, users[-1], [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError("prompt must be a string or a list of {role, content} messages")


def _answer_of(row: dict):
    """(answer keys used, raw answer); raises ValueError with the reason."""
    for keys in _ANSWER_KEYS:
        node = row
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            return keys, node
    raise ValueError("no answer field (reward_model.ground_truth, ground_truth, answer or solution)")


def row_to_example(row, default_data_source: str) -> Example:
    """One verl-style row (a dict) -> `Example`; raises ValueError with the reason if malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    prompt_key, prompt, messages = _prompt_of(row)
    answer_keys, raw = _answer_of(row)
    answer = normalize_answer(raw)
    if answer is None:
        raise ValueError(f"answer {str(raw)[:50]!r} is empty after normalization or not a string/number")
    extra = {k: v for k, v in row.items() if k not in (prompt_key, answer_keys[0], "data_source")}
    if answer_keys[0] == "reward_model":
        rest = {k: v for k, v in row["reward_model"].items() if k != "ground_truth"}
        if rest:
            extra["reward_model"] = rest
    if messages is not None:
        extra["messages"] = messages
    if answer != str(raw):
        extra["raw_answer"] = raw
    source = row.get("data_source")
    return Example(prompt=prompt, answer=answer,
                   data_source=source if isinstance(source, str) and source else default_data_source,
                   extra=extra)


def _rows_jsonl(path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e.msg})"


def _rows_parquet(path):
    import pyarrow.parquet as pq

    for rowno, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield rowno, row, None


def load_examples(path: str, on_error: str = "skip", default_data_source: str | None = None):
    """Reads a `.jsonl` (one object per line) or `.parquet` file into `Example`s.

    Args:
      on_error: "skip" (skip and count malformed rows) or "raise" (ValueError naming file and line/row).
      default_data_source: for rows without `data_source`; defaults to the file's stem.

    Returns:
      (examples: list[Example], n_skipped: int).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        rows, where = _rows_jsonl(path), "line"
    elif ext == ".parquet":
        rows, where = _rows_parquet(path), "row"
    else:
        raise ValueError(f"unsupported data file extension {ext!r} (use .jsonl or .parquet).")
    source = default_data_source or os.path.splitext(os.path.basename(path))[0]
    examples, n_skipped = [], 0
    for n, row, err in rows:
        try:
            if err is not None:
                raise ValueError(err)
            examples.append(row_to_example(row, source))
        except ValueError as e:
            if on_error == "raise":
                raise ValueError(f"{path}:{where} {n}: {e}.") from None
            n_skipped += 1
    if n_skipped:
        logging.warning("%s: skipped %d malformed rows of %d.", path, n_skipped, n_skipped + len(examples))
    return examples, n_skipped
