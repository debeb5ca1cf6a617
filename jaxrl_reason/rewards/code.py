"""Code-execution reward: untrusted model-written Python run against its test asserts in a sandbox.

`extract_code(text)` takes the last ```python block. `run_tests(code, tests)` runs the code, then each test,
in a SEPARATE fresh interpreter (`rewards/sandbox.py`: "namespaces" or audit-hook "guard" isolation, rlimits,
wall-clock and output caps; its docstring says what is and is not isolated) and returns
`ExecResult(passed, total, status, stdout_tail, stderr_tail)`. `code_reward` makes it a float;
`code_score(response, gold)` / `code_rewards` are the per-item and batch forms for
`rewards.pool.VerifierPool` (gold = the tests, or {"tests": ..., limits...}).

Not protected: the pass count: the harness shares the interpreter with the code, so code that deliberately
introspects it (frames, gc, file descriptors) can forge results; printing "passed" or exiting early cannot
(a run scores only the passes the harness reported, tagged with a per-run nonce).
"""
import dataclasses
import functools
import re
import secrets
import signal
import sys
import warnings

import numpy as np

from jaxrl_reason.rewards import sandbox
from jaxrl_reason.rewards.pool import VerifierPool
from jaxrl_reason.rewards.sandbox import SANDBOX_TAG  # noqa: F401 (re-exported)
from jaxrl_reason.rewards.sandbox_watch import TAIL_BYTES

MAX_CODE_CHARS = 100_000
STATUSES = ("ok", "syntax_error", "runtime_error", "timeout", "output_limit", "crash")
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n", re.IGNORECASE)
_STARTUP_MARGIN_S = 2.0                      # a pool's timeout must exceed the sandbox's by this much


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """passed/total tests; status in STATUSES ("ok" = every test ran); the last TAIL_BYTES of each stream."""
    passed: int
    total: int
    status: str
    stdout_tail: str
    stderr_tail: str


def extract_code(text: str, max_chars: int = MAX_CODE_CHARS) -> str | None:
    """Body of the LAST ```python (or ```py, ```python3) block; None if there is none, if that block is not
    closed (a cut-off response), or if it is blank or longer than `max_chars`.

    Work: one linear C-speed regex scan and one `str.find`, so megabyte inputs return at once.
    """
    last = None
    for last in _FENCE_RE.finditer(text):
        pass
    if last is None:
        return None
    end = text.find("```", last.end())
    if end < 0 or end - last.end() > max_chars:
        return None
    code = text[last.end():end]
    return code if code.strip() else None


# The harness: the script `sandbox.run_sandboxed` runs, after its audit-hook guard source. Reads {nonce,
# code, tests, guard} from an inherited file, waits for the parent's "go" byte, then reports
# "<nonce> syntax_error|runtime_error|test <i> <0|1>|done" lines.
_HARNESS = sandbox.GUARD_SOURCE + r'''
import json, linecache, os, sys, traceback

def _run(src, name, env):
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    exec(compile(src, name, "exec"), env)

def _main(payload_fd, go_fd, res_fd):
    with open(payload_fd, "rb") as f:
        payload = json.loads(f.read())
    os.read(go_fd, 1)
    os.close(go_fd)
    nonce, write = payload["nonce"], os.write
    def report(msg):
        write(res_fd, (nonce + " " + msg + "\n").encode())
    if payload["guard"]:
        _guard(os.path.realpath(os.getcwd()))
    env = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        _run(payload["code"], "solution.py", env)
    except BaseException as e:
        tb = e.__traceback__.tb_next.tb_next
        traceback.print_exception(type(e), e, tb, limit=0 if tb is None else None)
        return report("runtime_error" if tb is not None else "syntax_error")
    for i, test in enumerate(payload["tests"]):
        try:
            _run(test, "test_%d" % i, env)
            ok = 1
        except BaseException as e:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next.tb_next)
            ok = 0
        report("test %d %d" % (i, ok))
    report("done")

_main(*map(int, sys.argv[2:5]))
'''


def _result(res_text: str, nonce: str, total: int, status, returncode, out: str, err: str) -> ExecResult:
    """Parses the harness's report lines (only those with this run's nonce) into an ExecResult."""
    msgs, passed = set(), set()
    for line in res_text.splitlines():
        head, _, msg = line.partition(" ")
        parts = msg.split()
        if head != nonce or not parts:
            continue
        msgs.add(parts[0])
        if len(parts) == 3 and parts[0] == "test" and parts[1].isdigit() and parts[2] == "1":
            passed.add(int(parts[1]))
    if status is None:
        status = next((s for s in ("syntax_error", "runtime_error", "done") if s in msgs), None)
        died = "timeout" if returncode == -signal.SIGXCPU else "crash"
        status = {"done": "ok", None: died}.get(status, status)
    return ExecResult(len({i for i in passed if i < total}), total, status, out, err)


def run_tests(code: str, tests: list[str] | str, *, timeout_s: float = 5.0, memory_mb: int = 512,
              max_output_bytes: int = 64_000, max_processes: int = 32, max_open_files: int = 64,
              max_file_mb: int = 16, isolation: str = "auto") -> ExecResult:
    """Runs `code`, then each test (an assert statement or any snippet; a str is ONE test), in a sandbox.

    The code runs as module `solution` (so an `if __name__ == "__main__":` block does not run), the tests
    in its globals, one after another; a test passes if it raises nothing. Limits are per run: the wall
    clock `timeout_s` covers start-up, code and all tests. See `rewards/sandbox.py` for what is isolated.

    Args:
      isolation: "namespaces", "guard", or "auto" (namespaces if a probe run works here, else guard with a
        warning).

    Returns:
      ExecResult(passed, total=len(tests), status, stdout_tail, stderr_tail); status "ok" means every test
      ran; "syntax_error", "runtime_error" (the code raised, e.g. MemoryError), "timeout", "output_limit"
      and "crash" (the process died or exited early) keep the passes reported before.
    """
    tests = [tests] if isinstance(tests, str) else list(tests)
    if not tests or not all(isinstance(t, str) for t in tests) or not isinstance(code, str):
        raise ValueError("code must be a str and tests a non-empty str or list of str.")
    if isolation not in ("auto", "namespaces", "guard"):
        raise ValueError(f"isolation must be 'auto', 'namespaces' or 'guard', got {isolation!r}.")
    namespaces = _namespaces_available() if isolation == "auto" else isolation == "namespaces"
    nonce = secrets.token_hex(16)
    out, err, res, status, returncode = sandbox.run_sandboxed(
        _HARNESS, {"nonce": nonce, "code": code, "tests": tests}, namespaces=namespaces, timeout_s=timeout_s,
        memory_mb=memory_mb, max_output_bytes=max_output_bytes, max_processes=max_processes,
        max_open_files=max_open_files, max_file_mb=max_file_mb)
    return _result(res, nonce, len(tests), status, returncode, out, err)


@functools.lru_cache(maxsize=None)
def _namespaces_available() -> bool:
    """Whether a namespace sandbox can be made here (one probe run per process); warns when it cannot."""
    ok = False
    if sys.platform.startswith("linux"):   # as sandbox._LIBC
        try:
            r = run_tests("x = 1", ["assert x == 1"], timeout_s=30.0, isolation="namespaces")
            ok = r.status == "ok" and r.passed == 1
        except (RuntimeError, OSError):
            ok = False
    if not ok:
        warnings.warn("namespaces are not permitted here: the code sandbox falls back to the audit-hook "
                      "guard, which is not a security boundary.", RuntimeWarning, stacklevel=3)
    return ok


def code_reward(response_text: str, tests: list[str] | str, *, partial_credit: bool = True,
                **limits) -> float:
    """Reward of a response on its tests: the fraction of tests passed (`partial_credit=True`), or 1.0 only
    if the code ran every test and all passed (`partial_credit=False`). No ```python block scores 0.0.

    `limits` are `run_tests`' keyword arguments (timeout_s, memory_mb, ..., isolation).
    """
    code = extract_code(response_text)
    if code is None:
        return 0.0
    r = run_tests(code, tests, **limits)
    if partial_credit:
        return r.passed / max(r.total, 1)
    return float(r.status == "ok" and r.passed == r.total)


def code_score(response: str, gold) -> float:
    """`VerifierPool` form, `fn(response, gold)`: gold is the tests, or a dict {"tests": ..., and optional
    "partial_credit" and `run_tests` limits}."""
    if isinstance(gold, dict):
        gold = dict(gold)
        return code_reward(response, gold.pop("tests"), **gold)
    return code_reward(response, gold)


def code_rewards(responses, tests_N, *, pool=None, partial_credit: bool = True, **limits):
    """Batch form: scores_N float32 and the pool's info {"timeouts", "errors", "restarts", "seconds"}.

    Each item runs in its own sandbox; with a `rewards.pool.VerifierPool` several run at once (its worker
    processes are single-threaded, as `preexec_fn` wants). The pool's per-item `timeout_s` must exceed the
    sandbox's by _STARTUP_MARGIN_S, so the sandbox's own limit (which also reaps its children) fires first.
    """
    timeout_s = limits.get("timeout_s", 5.0)
    if pool is not None and pool.num_workers and pool.timeout_s < timeout_s + _STARTUP_MARGIN_S:
        raise ValueError(f"the pool's timeout_s ({pool.timeout_s}) must be at least the sandbox's "
                         f"timeout_s + {_STARTUP_MARGIN_S} = {timeout_s + _STARTUP_MARGIN_S}.")
    golds = [{"tests": t, "partial_credit": partial_credit, **limits} for t in tests_N]
    if pool is None:
        pool = VerifierPool(num_workers=0)
    scores_N, info = pool.score_batch("jaxrl_reason.rewards.code:code_score", responses, golds)
    return np.asarray(scores_N, np.float32), info
