"""Code sandbox: correct code scores 1, wrong / broken / hostile code scores 0, and every attack is contained.

Attacks run in both isolation modes ("namespaces" is skipped where this machine does not permit it):
an infinite loop, a fork bomb that also leaves its process group, a huge allocation, writes outside the
sandbox, reading an environment secret, a TCP connection to a port this test listens on, and a flood of
output. Each must score 0, leave no process behind and leave this process working.
"""
import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

from jaxrl_reason.rewards import code as code_lib
from jaxrl_reason.rewards import sandbox as sandbox_lib
from jaxrl_reason.rewards import sandbox_watch
from jaxrl_reason.rewards.code import (SANDBOX_TAG, TAIL_BYTES, code_reward, code_rewards, extract_code,
                                       run_tests)
from jaxrl_reason.rewards.pool import VerifierPool

SLOW_OK = 30.0   # a generous limit for code that must finish (the machine is shared and loaded)
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def _modes():
    return ["guard", pytest.param("namespaces", marks=pytest.mark.skipif(
        not code_lib._namespaces_available(), reason="namespaces are not permitted on this machine"))]


def _fenced(code):
    return f"Here is my solution.\n```python\n{code}```\nDone."


def _running(pid):
    """A live (not zombie) sandbox interpreter with this pid."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X") and SANDBOX_TAG in Path(f"/proc/{pid}/cmdline").read_text()
    except (OSError, IndexError):
        return False


# ------------------------------------------------------------------ extraction

def test_extract_code_takes_the_last_closed_python_block():
    text = "```python\nx = 1\n```\nthen\n```py\ny = 2\n```\n```text\nnot code\n```"
    assert extract_code(text) == "y = 2\n"
    assert extract_code("```Python3 \nz = 3\n```") == "z = 3\n"
    assert extract_code("```python\nx = 1\n```\n```python\ncut off") is None   # the last block is open
    assert extract_code("no code at all") is None
    assert extract_code("```python\n   \n```") is None
    assert extract_code("```python\n" + "x" * 50 + "\n```", max_chars=10) is None


def test_extract_code_on_huge_adversarial_input():
    assert extract_code("`" * 1_000_000) is None
    assert extract_code("```python\n" * 100_000) is None
    assert extract_code("```python\n" * 1000 + "a = 1\n```" + "x" * 1_000_000) == "a = 1\n"


# ------------------------------------------------------------------ scoring

@pytest.mark.parametrize("isolation", _modes())
def test_correct_wrong_and_broken_code(isolation):
    kw = dict(timeout_s=SLOW_OK, isolation=isolation)
    r = run_tests(ADD, ADD_TESTS, **kw)
    assert (r.passed, r.total, r.status) == (3, 3, "ok")
    assert code_reward(_fenced(ADD), ADD_TESTS, **kw) == 1.0
    wrong = "def add(a, b):\n    return a - b\n"                 # fails all three
    r = run_tests(wrong, ADD_TESTS, **kw)
    assert (r.passed, r.status) == (0, "ok") and "AssertionError" in r.stderr_tail
    assert code_reward(_fenced(wrong), ADD_TESTS, **kw) == 0.0
    r = run_tests("def add(a, b)\n    return a + b\n", ADD_TESTS, **kw)
    assert (r.passed, r.status) == (0, "syntax_error") and "SyntaxError" in r.stderr_tail
    r = run_tests("raise ValueError('boom')\n" + ADD, ADD_TESTS, **kw)
    assert (r.passed, r.status) == (0, "runtime_error") and "boom" in r.stderr_tail
    assert code_reward("I think the answer is add.", ADD_TESTS, **kw) == 0.0


@pytest.mark.parametrize("isolation", _modes())
def test_partial_credit_switch_and_forged_reports(isolation):
    kw = dict(timeout_s=SLOW_OK, isolation=isolation)
    half = _fenced("def add(a, b):\n    return a * b if a == b else a + b\n")   # 2*2 == 2+2; 1*1 != 2
    tests = ["assert add(1, 2) == 3", "assert add(1, 1) == 2", "assert add(2, 2) == 4",
             "assert add(0, 5) == 5"]
    assert code_reward(half, tests, **kw) == 0.75
    assert code_reward(half, tests, partial_credit=False, **kw) == 0.0
    # A str is one test (a HumanEval-style check program).
    assert run_tests(ADD, "for a in range(3):\n    assert add(a, 1) == a + 1\n", **kw).total == 1
    # Printing fake harness lines, writing to every descriptor, or exiting early earns nothing.
    forge = ("import os\nprint('done')\nfor fd in range(3, 20):\n    try:\n"
             "        os.write(fd, b'x test 0 1\\nx done\\n')\n    except OSError:\n        pass\n")
    assert run_tests(forge, ["assert False"], **kw).passed == 0
    r = run_tests("import os\nos._exit(0)\n" + ADD, ADD_TESTS, **kw)
    assert (r.passed, r.status) == (0, "crash")


# ------------------------------------------------------------------ attacks: each contained, scored 0

@pytest.mark.parametrize("isolation", _modes())
def test_infinite_loop_times_out(isolation):
    response = _fenced("def add(a, b):\n    while True:\n        pass\n")
    assert code_reward(response, ADD_TESTS, timeout_s=1.0, isolation=isolation) == 0.0
    r = run_tests("while True:\n    pass\n", ["assert True"], timeout_s=1.0, isolation=isolation)
    assert (r.passed, r.status) == (0, "timeout")


@pytest.mark.parametrize("isolation", _modes())
def test_fork_bomb_is_bounded_and_fully_reaped(isolation):
    bomb = ("import os\nprint(os.getpid(), flush=True)\nwhile True:\n    try:\n        if os.fork() == 0:\n"
            "            os.setsid()\n            print(os.getpid(), flush=True)\n    except OSError:\n"
            "        pass\n")
    r = run_tests(bomb, ["assert True"], timeout_s=4.0, max_processes=8, isolation=isolation)
    assert (r.passed, r.status) == (0, "timeout")
    pids = [int(p) for p in r.stdout_tail.split()]
    assert 1 <= len(pids) <= 8                    # RLIMIT_NPROC (namespaces) or the guard (no fork at all)
    assert not [p for p in pids if _running(p)]   # the group and the setsid() escapees are all dead
    assert run_tests(ADD, ADD_TESTS, timeout_s=SLOW_OK, isolation=isolation).passed == 3   # still works


@pytest.mark.parametrize("isolation", _modes())
def test_huge_allocation_fails_inside_the_sandbox(isolation):
    hog = _fenced("blob = bytearray(8 * 1024 ** 3)\n" + ADD)
    assert code_reward(hog, ADD_TESTS, memory_mb=256, timeout_s=SLOW_OK, isolation=isolation) == 0.0
    r = run_tests("blob = bytearray(8 * 1024 ** 3)\n", ["assert True"], memory_mb=256, timeout_s=SLOW_OK,
                  isolation=isolation)
    assert r.status == "runtime_error" and "MemoryError" in r.stderr_tail


def _writer(*paths):
    lines = ["import os", "def write_all():", "    ok = True"]
    for p in paths:
        lines += ["    try:", f"        open({str(p)!r}, 'w').write('escaped')",
                  "    except OSError as e:", "        print('blocked', e.errno)", "        ok = False"]
    return "\n".join(lines + ["    return ok", ""])


@pytest.mark.parametrize("isolation", _modes())
def test_writes_outside_the_sandbox_do_not_land(isolation, tmp_path):
    os.chmod(tmp_path, 0o777)
    targets = [tmp_path / "escape.txt", Path(__file__).resolve().parent / f"_escape_{uuid.uuid4().hex}.txt"]
    try:
        r = run_tests(_writer(*targets), ["assert write_all()"], timeout_s=SLOW_OK, isolation=isolation)
        assert r.passed == 0 and r.stdout_tail.count("blocked") == 2
        assert not any(t.exists() for t in targets)
        r = run_tests(_writer("inside.txt"),
                      ["assert write_all()", "assert open('inside.txt').read() == 'escaped'"],
                      timeout_s=SLOW_OK, isolation=isolation)
        assert r.passed == 2                       # its own directory is writable
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


@pytest.mark.parametrize("isolation", _modes())
def test_environment_secret_is_not_visible(isolation, monkeypatch):
    secret = "tok-" + uuid.uuid4().hex
    monkeypatch.setenv("SECRET_TOKEN", secret)
    leak = ("import os\ndef leak():\n    found = os.environ.get('SECRET_TOKEN')\n"
            "    for pid in (os.listdir('/proc') if os.path.isdir('/proc') else []):\n        try:\n"
            "            env = open('/proc/%s/environ' % pid, 'rb').read().decode(errors='replace')\n"
            "        except OSError:\n            continue\n"
            "        found = found or next((v.split('=', 1)[1] for v in env.split('\\0')\n"
            "                               if v.startswith('SECRET_TOKEN=')), None)\n"
            "    print('found', found)\n    return found\n")
    r = run_tests(leak, ["assert leak() is not None"], timeout_s=SLOW_OK, isolation=isolation)
    assert (r.passed, r.status) == (0, "ok") and "found None" in r.stdout_tail
    assert secret not in r.stdout_tail + r.stderr_tail


@pytest.mark.parametrize("isolation", _modes())
def test_no_connection_reaches_a_local_listener(isolation):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        client = (f"import socket\ndef talk():\n"
                  f"    with socket.create_connection(('127.0.0.1', {port}), timeout=2) as s:\n"
                  "        s.sendall(b'exfiltrated')\n    return True\n")
        r = run_tests(client, ["assert talk()"], timeout_s=SLOW_OK, isolation=isolation)
        assert (r.passed, r.status) == (0, "ok")
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()
    assert code_reward(_fenced(client), ["assert talk()"], timeout_s=SLOW_OK, isolation=isolation) == 0.0


@pytest.mark.parametrize("isolation", _modes())
def test_output_flood_is_capped(isolation):
    flood = _fenced("import sys\nfor _ in range(3000):\n    sys.stdout.write('y' * 4096)\n" + ADD)  # 12 MB
    kw = dict(max_output_bytes=100_000, timeout_s=SLOW_OK, isolation=isolation)
    assert code_reward(flood, ADD_TESTS, **kw) == 0.0
    r = run_tests("import os\nos.write(2, b'z' * 50_000_000)\n", ["assert True"], max_output_bytes=100_000,
                  timeout_s=SLOW_OK, isolation=isolation)
    assert (r.passed, r.status) == (0, "output_limit") and r.stderr_tail == "z" * TAIL_BYTES


@pytest.mark.skipif(os.geteuid() != 0, reason="as non-root the user-namespace path is the default one")
def test_user_namespace_path_blocks_network_and_writes(monkeypatch):
    """The path a non-root caller takes (user namespace; here mapped to uid 0 outside, so file permissions
    would allow the write and only the read-only mount stops it)."""
    if not code_lib._namespaces_available():
        pytest.skip("namespaces are not permitted on this machine")
    monkeypatch.setattr(sandbox_lib, "_is_root", lambda: False)
    # The standard library's directory is on the read-only tree wherever the repository is cloned (a clone under
    # /tmp or /home would sit under the sandbox's private tmpfs or a hidden directory: ENOENT, not EROFS).
    target = Path(os.__file__).resolve().parent / f"_escape_{uuid.uuid4().hex}.txt"
    probe = _writer(target) + "import socket\ndef talk():\n    socket.create_connection(('127.0.0.1', 9))\n"
    try:
        r = run_tests(probe, ["assert write_all()", "talk()", "import os\nassert os.getuid() == 1000"],
                      timeout_s=SLOW_OK, isolation="namespaces")
        assert (r.passed, r.status) == (1, "ok") and "blocked 30" in r.stdout_tail    # 30 = EROFS
        assert not target.exists()
        assert run_tests(ADD, ADD_TESTS, timeout_s=SLOW_OK, isolation="namespaces").passed == 3
    finally:
        target.unlink(missing_ok=True)


# ------------------------------------------------------------------ batch form and arguments

def test_batch_form_through_the_verifier_pool():
    responses = [_fenced(ADD), _fenced("def add(a, b):\n    return None\n"),
                 _fenced("while True:\n    pass\n"), "no code"]
    # 4 s sandbox limit: a correct solution's interpreter start-up must fit it on a loaded 2-core CI machine
    # (1 s failed there once under `pytest -n 2`); the pool's own limit stays above it.
    with VerifierPool(num_workers=2, timeout_s=12.0) as pool:
        scores_N, info = code_rewards(responses, [ADD_TESTS] * 4, pool=pool, timeout_s=4.0)
        assert scores_N.dtype == np.float32 and scores_N.tolist() == [1.0, 0.0, 0.0, 0.0]
        assert info["timeouts"] == info["errors"] == 0   # the sandbox's own limit fired first
        with pytest.raises(ValueError, match="timeout_s"):
            code_rewards(responses, [ADD_TESTS] * 4, pool=pool, timeout_s=12.0)
    scores_N, _ = code_rewards(responses[:2], [ADD_TESTS, ADD_TESTS[0]], timeout_s=SLOW_OK)
    assert scores_N.tolist() == [1.0, 0.0]


def test_a_sandbox_without_its_own_namespace_is_refused(monkeypatch):
    """If unshare silently gave no new network namespace, the 'kill everything in the sandbox's namespace'
    sweep must not turn on this machine's processes: the run is refused and nothing else is signalled."""
    if not code_lib._namespaces_available():
        pytest.skip("namespaces are not permitted on this machine")
    monkeypatch.setattr(sandbox_lib, "CLONE_NEWNET", 0)
    with pytest.raises(RuntimeError, match="own network namespace"):
        run_tests(ADD, ADD_TESTS, timeout_s=SLOW_OK, isolation="namespaces")
    assert not sandbox_watch.matches(os.getppid(), ("net", os.readlink("/proc/self/ns/net")))


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        run_tests(ADD, [])
    with pytest.raises(ValueError):
        run_tests(ADD, ADD_TESTS, timeout_s=0)
    with pytest.raises(ValueError):
        run_tests(ADD, ADD_TESTS, isolation="docker")
