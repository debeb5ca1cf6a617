"""Rewards by name: a registry, weighted sums of its entries, and user functions by import path.

`reward.fn` (config) is a comma-separated list of terms `[weight*]name`:

  math           math-verify equivalence of the response's final answer with `example.answer`
                 (`rewards.math.math_score`: last `\\boxed{}`, else `####`, else the last number);
  format         1.0 if the response states its answer as `\\boxed{...}` or a `#### x` line (`format_reward`);
  code           the fraction of the example's tests the last ```python block passes, run in the sandbox
                 (`rewards.code.code_score`; tests from `example.extra["tests"]`, else `example.answer`, a JSON
                 list of assert lines or one string of them);
  reasoning_gym  the reasoning-gym task's own `score_answer` (`data.reasoning_gym_tasks.score`);
  pkg.mod:fn     a user function `fn(completion: str, example: Example) -> float` imported by path.

e.g. `math`, `0.9*math,0.1*format`, `my_pkg.rewards:score`. The score of a response is the weighted sum of its
terms. `make_scorer` returns a `Scorer`, called as `scorer(texts, golds)` where each gold is the `Example` the
text answers (rollout and evaluation pass examples when `scorer.accepts_examples`) or just its answer string.
"""
from __future__ import annotations

import importlib
import json
import math
from typing import Callable

import numpy as np

from jaxrl_reason.data.example import Example


def _math(completion: str, ex: Example) -> float:
    from jaxrl_reason.rewards.math import math_score

    return math_score(completion, ex.answer)


def _format(completion: str, ex: Example) -> float:
    from jaxrl_reason.rewards.math import format_reward

    del ex
    return max(format_reward(completion, "boxed"), format_reward(completion, "hash"))


def _tests_of(ex: Example):
    tests = ex.extra.get("tests", ex.answer)
    if isinstance(tests, str) and tests.lstrip().startswith("["):
        try:
            return json.loads(tests)
        except json.JSONDecodeError:
            pass
    return tests


def _code(completion: str, ex: Example) -> float:
    from jaxrl_reason.rewards.code import code_score

    return code_score(completion, _tests_of(ex))


def _reasoning_gym(completion: str, ex: Example) -> float:
    from jaxrl_reason.data.reasoning_gym_tasks import score

    return score(completion, ex.extra)


REWARDS: dict[str, Callable[[str, Example], float]] = {
    "math": _math, "format": _format, "code": _code, "reasoning_gym": _reasoning_gym}


def import_function(path: str) -> Callable:
    """`pkg.module:function` -> the function; one sentence when it cannot be imported."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"a reward function path must look like 'my_pkg.rewards:score', got {path!r}.")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise ValueError(f"reward function {path!r}: cannot import module {module!r} ({e}).") from None
    except AttributeError:
        raise ValueError(f"reward function {path!r}: module {module!r} has no {name!r}.") from None
    if not callable(fn):
        raise ValueError(f"reward function {path!r} is not callable.")
    return fn


def parse_reward_spec(spec: str) -> list[tuple[float, str]]:
    """`"0.9*math,0.1*format"` -> [(0.9, "math"), (0.1, "format")]; one sentence for a malformed spec."""
    terms = []
    for term in (t.strip() for t in spec.split(",")):
        weight, _, name = term.rpartition("*") if "*" in term else ("1", "", term)
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"reward.fn term {term!r}: the weight {weight!r} is not a number.") from None
        name = name.strip()
        if not name or not math.isfinite(w):
            raise ValueError(f"reward.fn term {term!r} needs a name and a finite weight.")
        if name not in REWARDS and ":" not in name:
            raise ValueError(f"unknown reward {name!r}; use one of {sorted(REWARDS)} or 'my_pkg.module:function'.")
        terms.append((w, name))
    return terms


class Scorer:
    """Weighted sum of reward terms; `scorer(texts, golds) -> score_N` float32 (golds: Examples or answers)."""

    accepts_examples = True

    @staticmethod
    def final_answer(text: str) -> str:
        """The answer a majority vote (maj@k) counts: `rewards.math.extract_answer`, "" when there is none."""
        from jaxrl_reason.rewards.math import extract_answer

        return extract_answer(text) or ""

    def __init__(self, spec: str):
        self.spec = spec
        self.terms = [(w, REWARDS[n] if n in REWARDS else import_function(n), n) for w, n in parse_reward_spec(spec)]

    def score_one(self, text: str, gold) -> float:
        ex = gold if isinstance(gold, Example) else Example(prompt="", answer=str(gold), data_source="")
        total = 0.0
        for w, fn, name in self.terms:
            value = float(fn(text, ex))
            if not math.isfinite(value):
                raise ValueError(f"reward {name!r} returned {value} for a response of {ex.data_source or 'the task'}.")
            total += w * value
        return total

    def __call__(self, texts, golds) -> np.ndarray:
        return np.asarray([self.score_one(t, g) for t, g in zip(texts, golds)], np.float32)


def make_scorer(spec: str) -> Scorer:
    return Scorer(spec)
