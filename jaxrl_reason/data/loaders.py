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

Column mapping: `prompt_key` / `answer_key` (a dotted path such as `reward_model.ground_truth`) replace the
searched fields above.

Malformed rows (invalid JSON, not an object, no prompt, no answer, an empty answer after normalization):
`on_error="skip"` skips them, counts them and logs one warning with the count and the first reasons with their
lines; `on_error="raise"` raises ValueError naming the file and line (JSONL, 1-based) or row (parquet, saved
`datasets` directory; 1-based). Blank JSONL lines are ignored.
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


def _prompt_of(row: dict, prompt_key: str = ""):
    """(prompt text, messages or None); raises ValueError with the reason."""
    keys = (prompt_key,) if prompt_key else _PROMPT_KEYS
    key = next((k for k in keys if k in row), None)
    if key is None:
        raise ValueError(f"no prompt field (one of {keys})")
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


def _answer_of(row: dict, answer_key: str = ""):
    """(answer keys used, raw answer); raises ValueError with the reason."""
    if answer_key:
        node = row
        for k in answer_key.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        if node is None:
            raise ValueError(f"no answer field {answer_key!r}")
        return tuple(answer_key.split(".")), node
    for keys in _ANSWER_KEYS:
        node = row
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if node is not None:
            return keys, node
    raise ValueError("no answer field (reward_model.ground_truth, ground_truth, answer or solution)")


def row_to_example(row, default_data_source: str, prompt_key: str = "", answer_key: str = "") -> Example:
    """One verl-style row (a dict) -> `Example`; raises ValueError with the reason if malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    prompt_key, prompt, messages = _prompt_of(row, prompt_key)
    answer_keys, raw = _answer_of(row, answer_key)
    answer = normalize_answer(raw)
    if answer is None:
        raise ValueError(f"answer {str(raw)[:50]!r} is empty after normalization or not a string/number")
    extra = {k: v for k, v in row.items() if k not in (prompt_key, answer_keys[0], "data_source")}
    if len(answer_keys) == 2 and isinstance(row[answer_keys[0]], dict):
        rest = {k: v for k, v in row[answer_keys[0]].items() if k != answer_keys[1]}
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


def _rows_saved_dataset(path):
    """Rows of a `datasets.Dataset.save_to_disk` directory (a DatasetDict: its only split, or 'train')."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path!r} is a directory; reading a saved `datasets` directory needs the `datasets` "
                         f"package (pip install datasets), or give a .jsonl or .parquet file.") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1 and "train" not in ds:
            raise ValueError(f"{path!r} holds the splits {sorted(ds)}; point to one split's directory.")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for rowno, row in enumerate(ds, start=1):
        yield rowno, row, None


def load_examples(path: str, on_error: str = "skip", default_data_source: str | None = None, *,
                  prompt_key: str = "", answer_key: str = "", positions: list | None = None):
    """Reads a `.jsonl` (one object per line) or `.parquet` file, or a saved `datasets` directory, into `Example`s.

    Args:
      on_error: "skip" (skip and count malformed rows) or "raise" (ValueError naming file and line/row).
      default_data_source: for rows without `data_source`; defaults to the file's stem.
      prompt_key, answer_key: column mapping (module docstring); "" searches the usual fields.
      positions: when given, gets "line N" / "row N" of each returned example appended (for later reports).

    Returns:
      (examples: list[Example], n_skipped: int).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}.")
    if os.path.isdir(path):
        rows, where = _rows_saved_dataset(path), "row"
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    elif path.lower().endswith(".jsonl"):
        rows, where = _rows_jsonl(path), "line"
    elif path.lower().endswith(".parquet"):
        rows, where = _rows_parquet(path), "row"
    else:
        ext = os.path.splitext(path)[1].lower()
        raise ValueError(f"unsupported data file extension {ext!r} (use .jsonl, .parquet or a saved `datasets` "
                         f"directory).")
    source = default_data_source or os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    examples, reasons = [], []
    for n, row, err in rows:
        try:
            if err is not None:
                raise ValueError(err)
            examples.append(row_to_example(row, source, prompt_key, answer_key))
            if positions is not None:
                positions.append(f"{where} {n}")
        except ValueError as e:
            if on_error == "raise":
                raise ValueError(f"{path}:{where} {n}: {e}.") from None
            reasons.append(f"{where} {n}: {e}")
    if reasons:
        more = f"; {len(reasons) - 3} more" if len(reasons) > 3 else ""
        logging.warning("%s: skipped %d malformed rows of %d (%s%s).", path, len(reasons),
                        len(reasons) + len(examples), "; ".join(reasons[:3]), more)
    return examples, len(reasons)
