"""Multi-term addition: the project's own verifiable task ("Task and model that were measured").

Format (one line, steps separated by single spaces; the EOS token is NOT part of the text, the tokenizer
helpers in `data.tokenizer` append it):
  prompt    `12+7+30:`
  response  `12+7=19 19+30=49 #### 49`
  with re-checks  `12+7=19 check 12+7=19 19+30=49 #### 49`

Difficulty: 3, 4 or 5 terms of at most 1, 2 or 3 digits -> 9 levels,
  level = (n_terms - 3) * 3 + (digits - 1),   i.e. n_terms = 3 + level // 3, digits = 1 + level % 3.
Each term is uniform on [1, 10**digits - 1] (so a 2-digit level mostly, not only, has 2-digit terms).

Every function is deterministic given its seed / `np.random.Generator`; the order of random draws is part
of the contract (documented per function) so that golden traces stay fixed.
"""
import dataclasses
import re

import numpy as np

from jaxrl_reason.data.example import Example

LEVELS = tuple(range(9))
DATA_SOURCE = "arithmetic"
_MAX_ANSWER_DIGITS = 32
_CHECK_RE = re.compile(r"\bcheck\b")
_STEP_RE = re.compile(r"(check )?(-?\d{1,32})\+(-?\d{1,32})=(-?\d{1,32})")


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    level: int
    terms: tuple[int, ...]


def level_spec(level: int) -> tuple[int, int]:
    """Maps a difficulty level in 0..8 to `(n_terms, digits)`."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}.")
    return 3 + level // 3, 1 + level % 3


def make_problem(rng: np.random.Generator, level: int) -> Problem:
    """One problem of `level`; draws `rng.integers(1, 10**digits, size=n_terms)` once."""
    n_terms, digits = level_spec(level)
    terms = tuple(int(t) for t in rng.integers(1, 10**digits, size=n_terms))
    return Problem(prompt="+".join(map(str, terms)) + ":", answer=str(sum(terms)), level=level, terms=terms)


def steps(terms) -> list[tuple[int, int, int]]:
    """The running-sum steps `[(a, b, a + b), ...]` of a sum: `len(terms) - 1` of them."""
    terms = [int(t) for t in terms]
    if len(terms) < 2:
        raise ValueError(f"a sum needs at least 2 terms, got {len(terms)}.")
    out, running = [], terms[0]
    for t in terms[1:]:
        out.append((running, t, running + t))
        running += t
    return out


def solution_trace(problem: Problem, rng: np.random.Generator, recheck_prob: float = 0.9,
                   max_rechecks: int = 4, error_prob: float = 0.0) -> str:
    """An SFT response for `problem` (no EOS), optionally with redundant re-checks and noisy steps.

    Random draws, in this order:
      1. only if `error_prob > 0`, per step: `rng.random() < error_prob` makes the step's result wrong by
         `±rng.integers(1, 10)` (the sign from `rng.random() < 0.5`; flipped to + if the result would go
         negative). Later steps continue from the wrong running sum, so the final answer is wrong too.
      2. `rng.random() < recheck_prob` adds `k = rng.integers(1, max_rechecks + 1)` re-check segments
         `check a+b=c`, each after step `rng.integers(0, n_steps)` (drawn as one array of size k), each
         repeating that step exactly as written. Keep `recheck_prob` high (0.9): with re-checks in only half
         of the traces no single step makes `check` the likeliest token, so greedy decoding would hide the
         overthinking that length penalties should remove.
    """
    if not 0.0 <= recheck_prob <= 1.0 or not 0.0 <= error_prob <= 1.0:
        raise ValueError(f"recheck_prob and error_prob must be in [0, 1], got {recheck_prob}, {error_prob}.")
    if max_rechecks < 1:
        raise ValueError(f"max_rechecks must be >= 1, got {max_rechecks}.")
    written, running = [], problem.terms[0]
    for t in problem.terms[1:]:
        c = running + t
        if error_prob > 0 and rng.random() < error_prob:
            delta = int(rng.integers(1, 10)) * (-1 if rng.random() < 0.5 else 1)
            c = c + delta if c + delta >= 0 else c + abs(delta)
        written.append((running, t, c))
        running = c
    segments = [[f"{a}+{b}={c}"] for a, b, c in written]
    if rng.random() < recheck_prob:
        k = int(rng.integers(1, max_rechecks + 1))
        for i in rng.integers(0, len(written), size=k):
            segments[i].append("check " + segments[i][0])
    return " ".join(s for seg in segments for s in seg) + f" #### {running}"


def score(response_text: str, answer) -> float:
    """1.0 iff the text after the LAST `####` is exactly an integer equal to `answer`, else 0.0.

    Surrounding whitespace is ignored; anything else after the last `####` (a second number, a `check`,
    punctuation) scores 0. Work is bounded: integers longer than 32 digits score 0.
    """
    gold = str(answer).strip()
    if not re.fullmatch(r"[+-]?\d{1,%d}" % _MAX_ANSWER_DIGITS, gold):
        raise ValueError(f"answer must be an integer string, got {answer!r}.")
    idx = response_text.rfind("####")
    if idx < 0:
        return 0.0
    pred = response_text[idx + 4:].strip()
    if not re.fullmatch(r"[+-]?\d{1,%d}" % _MAX_ANSWER_DIGITS, pred):
        return 0.0
    return float(int(pred) == int(gold))


def recheck_count(response_text: str) -> int:
    """Number of `check` words in a response (numerator of the re-check-rate metric)."""
    return len(_CHECK_RE.findall(response_text))


def parse_steps(response_text: str) -> list[tuple[int, int, int, bool]]:
    """Every `a+b=c` equation in a response as `(a, b, c, is_check)`, in order (`c` as written)."""
    return [(int(m[2]), int(m[3]), int(m[4]), bool(m[1])) for m in _STEP_RE.finditer(response_text)]


def sample_problems(seed: int, n: int, levels=LEVELS) -> list[Problem]:
    """`n` problems; draws all levels first (`rng.choice(levels, size=n)`), then the terms in order."""
    levels = _check_levels(levels)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.asarray(levels), size=n)
    return [make_problem(rng, int(lv)) for lv in chosen]


def split_disjoint(n_train: int, n_heldout: int, levels=LEVELS, train_seed: int = 0,
                   heldout_seed: int = 1234, max_tries_per_item: int = 100):
    """Train and held-out problems that never share a prompt.

    The held-out set depends only on `(heldout_seed, n_heldout, levels)`: `n_heldout` DISTINCT problems,
    levels assigned round-robin (`levels[i % len(levels)]`, balanced for per-level accuracy). Train problems
    are drawn like `sample_problems(train_seed, ...)` but any whose prompt is held out is redrawn; train
    problems may repeat among themselves.

    Returns:
      (train: list[Problem] of length n_train, heldout: list[Problem] of length n_heldout).
    """
    levels = _check_levels(levels)
    rng = np.random.default_rng(heldout_seed)
    heldout, seen = [], set()
    for i in range(n_heldout):
        for _ in range(max_tries_per_item):
            p = make_problem(rng, levels[i % len(levels)])
            if p.prompt not in seen:
                break
        else:
            raise ValueError(f"could not draw {n_heldout} distinct held-out problems from levels {levels}.")
        heldout.append(p)
        seen.add(p.prompt)
    rng = np.random.default_rng(train_seed)
    chosen = rng.choice(np.asarray(levels), size=n_train)
    train = []
    for lv in chosen:
        for _ in range(max_tries_per_item):
            p = make_problem(rng, int(lv))
            if p.prompt not in seen:
                break
        else:
            raise ValueError(f"level {int(lv)} has no problems left outside the held-out set.")
        train.append(p)
    return train, heldout


def to_example(problem: Problem) -> Example:
    """`Example(prompt, answer, "arithmetic", {"level", "terms"})` for the generic data pipeline."""
    return Example(prompt=problem.prompt, answer=problem.answer, data_source=DATA_SOURCE,
                   extra={"level": problem.level, "terms": list(problem.terms)})


def _check_levels(levels) -> tuple[int, ...]:
    levels = tuple(int(lv) for lv in levels)
    if not levels or any(lv not in LEVELS for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}.")
    return levels
