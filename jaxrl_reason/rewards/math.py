"""Math answers: extraction with bounded work, equivalence via math-verify, format rewards.

`extract_answer` never does more than O(len(text)) C-speed scanning plus O(MAX_ANSWER_CHARS) Python work,
so a megabyte string or 10k nested braces return at once. `math_equal` calls math-verify, which can hang
(sympy evaluating `10^{10^{10}}`): math-verify's own guard is `signal.alarm`, which works only in a main
thread. Hence the `timeout_s` switch: `None` turns math-verify's timers off
(`parsing_timeout=None`, `timeout_seconds=None`) and the caller enforces the limit, as
`rewards.pool.VerifierPool` does by killing the worker process; an int uses math-verify's alarm timers.
"""
import re

MAX_ANSWER_CHARS = 1000
_BOXED_PREFIXES = ("\\boxed{", "\\fbox{")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")   # the comma of 1,000 (not of (1,2))
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if unbalanced, empty or long.

    Only the LAST box is considered (a cut-off final box means no answer, as in verl's
    `last_boxed_only_string`). The content must close within `max_chars` characters.
    """
    start = max(text.rfind(p) for p in _BOXED_PREFIXES)
    if start < 0:
        return None
    start = text.index("{", start) + 1
    depth = 1
    for j, ch in enumerate(text[start:start + max_chars + 1]):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:start + j].strip() or None
    return None


def extract_answer(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """The final answer of a response, or None.

    Priority by format: if the text contains `\\boxed`/`\\fbox`, the content of the last box (None if it is
    unbalanced); else if it contains `####`, the rest of that line after the last `####` (thousands
    commas and a final period dropped, None if empty); else the last number (`-12`, `3.5`, `1,000` ->
    `1000`, `2/3`; a `-` right after a letter, digit or bracket is an operator, not a sign). Answers longer
    than `max_chars` give None.
    """
    if "\\boxed" in text or "\\fbox" in text:
        return last_boxed(text, max_chars)
    if "####" in text:
        return hash_answer(text, max_chars)
    tail = text[-(max_chars + 1):]
    match = None
    for match in _NUMBER_RE.finditer(tail):
        pass
    if match is None or (match.start() == 0 and len(text) > len(tail)):   # may continue past the window
        return None
    return match.group(0).replace(",", "")


def hash_answer(text: str, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    """Rest of the line after the last `####`, thousands commas and a final period dropped; None if empty/long."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    end = text.find("\n", idx + 4)
    line = text[idx + 4:end if end >= 0 else len(text)].strip()
    if not line or len(line) > max_chars:
        return None
    return _THOUSANDS_RE.sub("", line).rstrip(".").strip() or None


def math_equal(pred: str | None, gold: str, timeout_s: int | None = None,
               max_chars: int = MAX_ANSWER_CHARS) -> bool:
    """Whether `pred` and `gold` denote the same mathematical object, via math-verify.

    Both are parsed as the content of a `\\boxed{}` (so `\\frac12`, `0.5` and `1/2` all parse), then
    `verify(gold, pred)` (math-verify's argument order).

    Args:
      timeout_s: [switch] None: no internal timers, the CALLER must bound the wall time (run it
        in a `VerifierPool` worker); an int: math-verify's `signal.alarm` timers (main thread only).
      max_chars: a longer `pred` is False without parsing.
    """
    if pred is None or len(pred) > max_chars:
        return False
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)   # "Timeout is disabled" on every call
    gold_p = parse("\\boxed{" + gold + "}", parsing_timeout=timeout_s)
    pred_p = parse("\\boxed{" + pred + "}", parsing_timeout=timeout_s)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=timeout_s))


def math_score(response_text: str, gold: str) -> float:
    """1.0 if `extract_answer(response_text)` is `math_equal` to `gold`, else 0.0 (for `VerifierPool`).

    Runs math-verify without internal timers (`timeout_s=None`): call it through `VerifierPool` with
    `num_workers >= 1` so a hanging item is killed at the pool's wall-clock limit.
    """
    return float(math_equal(extract_answer(response_text), str(gold), timeout_s=None))


def format_reward(text: str, style: str = "boxed") -> float:
    """1.0 if the response gives its answer in the expected format, else 0.0.

    Styles:
      "boxed"         a last `\\boxed{...}` with balanced braces exists.
      "hash"          a `#### <answer>` line exists (GSM8K style), answer non-empty.
      "think_answer"  DeepSeek-R1 template: the stripped text is `<think>...</think>` then `<answer>...</answer>`
                      with exactly one of each tag and nothing after `</answer>`.
    """
    if style == "boxed":
        return float(last_boxed(text) is not None)
    if style == "hash":
        return float(hash_answer(text, MAX_ANSWER_CHARS) is not None)
    if style == "think_answer":
        t = text.strip()
        tags = ("<think>", "</think>", "<answer>", "</answer>")
        if any(t.count(tag) != 1 for tag in tags):
            return 0.0
        pos = [t.index(tag) for tag in tags]
        ok = (pos[0] == 0 and pos == sorted(pos) and t[pos[1] + 8:pos[2]].strip() == ""
              and t.endswith("</answer>"))
        return float(ok)
    raise ValueError(f"style must be 'boxed', 'hash' or 'think_answer', got {style!r}.")
