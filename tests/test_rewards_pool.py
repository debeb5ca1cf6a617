"""VerifierPool: adversarial inputs time out or fail with score 0, the pool survives and scores the next item."""
import os
import time

import numpy as np
import pytest

from jaxrl_reason.rewards.pool import VerifierPool, resolve_verifier


def flaky_verifier(response, gold):
    """Test verifier: crashes, hangs, raises or returns NaN on command; else exact match."""
    if response == "crash":
        os._exit(3)
    if response == "hang":
        time.sleep(600)
    if response == "raise":
        raise RuntimeError("boom")
    if response == "nan":
        return float("nan")
    if response == "alloc":
        return float(len(bytearray(2**31)) > 0)
    return float(response == gold)


@pytest.fixture(scope="module")
def math_pool():
    pytest.importorskip("math_verify")
    with VerifierPool(num_workers=2, timeout_s=1.0) as pool:
        yield pool


def test_math_adversarial_inputs_score_zero_and_pool_survives(math_pool):
    responses = [
        "so \\boxed{\\frac{1}{2}}",                                   # normal, correct
        "\\boxed{10^{10^{10}}}",                                      # sympy would evaluate forever
        "x" * 10**6,                                                  # a megabyte string
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",         # 10k nested braces
        "the answer is \\boxed{{{1}",                                 # unbalanced braces
        "#### 10**10**10",                                            # python-style tower, as text
        "so #### 18",                                                 # normal, correct
    ]
    golds = ["0.5", "5", "1", "1", "1", "7", "18"]
    # A cheap numeric warm-up (the default one also warms sympy's symbolic paths, ~1 s more per worker).
    scores, info = math_pool.score_batch("math", responses, golds, warmup=("\\boxed{1}", "1"))
    assert scores.dtype == np.float32
    assert scores.tolist() == [1, 0, 0, 0, 0, 0, 1]
    assert info["timeouts"] == 1 and info["restarts"] == 1 and info["errors"] == 0
    # The pool replaced the killed worker and still scores normal items.
    scores, info = math_pool.score_batch("math", ["so \\boxed{0.25}", "so 17"], ["\\frac14", "18"])
    assert scores.tolist() == [1.0, 0.0] and info["timeouts"] == info["restarts"] == 0
    assert all(w.proc.is_alive() for w in math_pool._workers)
    assert math_pool.totals["timeouts"] == 1 and math_pool.totals["items"] == 9


def test_crash_hang_raise_nan_are_counted_and_replaced():
    with VerifierPool(num_workers=2, timeout_s=0.5) as pool:
        responses = ["a", "crash", "hang", "raise", "nan", "b", "c"]
        golds = ["a", "x", "x", "x", "x", "b", "x"]
        scores, info = pool.score_batch(flaky_verifier, responses, golds)
        assert scores.tolist() == [1, 0, 0, 0, 0, 1, 0]
        assert (info["timeouts"], info["errors"], info["restarts"]) == (1, 3, 2)   # crash + hang restart
        scores, info = pool.score_batch(flaky_verifier, ["z"], ["z"])
        assert scores.tolist() == [1.0] and info == {**info, "timeouts": 0, "errors": 0, "restarts": 0}
        # The same function by "module:function" path (a different cache key: loaded again).
        scores, _ = pool.score_batch(f"{__name__}:flaky_verifier", ["q", "nan"], ["q", "q"])
        assert scores.tolist() == [1.0, 0.0]
        workers = list(pool._workers)
    assert not any(w.proc.is_alive() for w in workers)          # closed on exit


def test_memory_limit_makes_an_error_not_a_dead_machine():
    with VerifierPool(num_workers=1, timeout_s=5.0, max_memory_mb=1024) as pool:
        scores, info = pool.score_batch(flaky_verifier, ["alloc", "ok"], ["x", "ok"])
        assert scores.tolist() == [0.0, 1.0] and info["errors"] == 1 and info["restarts"] == 0
    with pytest.raises(ValueError, match="closed"):
        pool.score_batch(flaky_verifier, ["ok"], ["ok"])


def test_in_process_mode_arithmetic():
    pool = VerifierPool(num_workers=0)
    responses = ["1+2=3 3+4=7 #### 7", "#### 8", "#### 7 check", "#### 7"]
    scores, info = pool.score_batch("arithmetic", responses, ["7", "7", "7", "not-an-int"])
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.0] and info["errors"] == 1 and info["timeouts"] == 0
    scores, info = pool.score_batch(flaky_verifier, ["raise", "nan", "k"], ["k", "k", "k"])
    assert scores.tolist() == [0.0, 0.0, 1.0] and info["errors"] == 2


def test_bad_arguments():
    pool = VerifierPool(num_workers=0)
    with pytest.raises(ValueError, match="responses but"):
        pool.score_batch("arithmetic", ["a"], [])
    with pytest.raises(ValueError, match="unknown verifier"):
        pool.score_batch("no_such_verifier", ["a"], ["a"])
    with pytest.raises(ValueError, match="cannot import"):
        resolve_verifier("jaxrl_reason.rewards.math:no_such_fn")
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool(num_workers=-1)
    with VerifierPool(num_workers=1, timeout_s=1.0) as pool:
        with pytest.raises(ValueError, match="cannot be pickled"):
            pool.score_batch(lambda r, g: 1.0, ["a"], ["a"])
