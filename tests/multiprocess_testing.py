"""Launching several JAX CPU processes from a test (`tests/test_multiprocess.py`, `tests/test_multiprocess_loop.py`).

Nothing may hang: every worker runs in its own process group with a deadline, and on a deadline, or as soon as
one worker fails, all groups are SIGKILLed (SIGTERM is not enough: `jax.distributed` installs a preemption
notifier that catches it). Workers exit with code 77 (`PLATFORM_EXIT`) when this platform cannot start
`jax.distributed` or run a cross-process CPU collective; the test is then skipped.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLATFORM_EXIT = 77  # = multiprocess_worker.PLATFORM_EXIT (the workers are scripts, not imported here)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the worker retries if it is taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 8 devices; the worker sets its own count
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's own process group (it was started with start_new_session=True)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def launch(commands: list[list[str]], log_dir, timeout_s: float, procs: list | None = None,
           kill_when=None) -> list[tuple[int, str]]:
    """Runs the commands concurrently; returns [(returncode, output tail)] once all exit.

    The first worker to fail gets every other group killed (its peers would only wait for it). On the deadline
    every group is killed and TimeoutError is raised. `procs`, if given, receives the Popen objects. `kill_when`,
    if given, is polled with the index of each running worker: once it returns True that worker's group is
    SIGKILLed on purpose (a kill the test asked for, not a failure: the other workers go on).
    """
    procs, logs, killed = ([] if procs is None else procs), [], set()
    for i, cmd in enumerate(commands):
        log = open(os.path.join(log_dir, f"worker{i}.log"), "w+")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_env(), cwd=ROOT,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"multi-process workers still running after {timeout_s:.0f}s; killed them.")
            for i, p in enumerate(procs):
                if kill_when is not None and p.poll() is None and kill_when(i):
                    kill_group(p)
                    killed.add(i)
            if any(p.poll() not in (None, 0) for i, p in enumerate(procs) if i not in killed):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            kill_group(p)
    out = []
    for p, log in zip(procs, logs):
        log.seek(0)
        out.append((p.returncode, log.read()[-3000:]))
        log.close()
    return out


def launch_joined(make_commands, log_dir, timeout_s: float, kill_when=None) -> list[tuple[int, str]]:
    """`launch(make_commands(port), ..., kill_when)` for workers joined through a coordinator on a free loopback
    `port`; returns [(returncode, output tail)] when every worker succeeded: exited 0, or was SIGKILLed while
    `kill_when(i)` held (it must stay True once True, e.g. a marker file the worker wrote).

    A coordinator port taken between choosing it and binding it is retried on a new port (`make_commands` is called
    again); a worker reporting that this platform cannot run CPU multi-process collectives (exit code 77) skips the
    test; any other failure raises AssertionError with the log of the worker that failed by itself (not of the peers
    the launcher killed because of it).
    """
    for attempt in range(3):
        results = launch(make_commands(free_port()), log_dir, timeout_s, kill_when=kill_when)
        failed = [(i, rc, log) for i, (rc, log) in enumerate(results)
                  if rc != 0 and not (rc == -signal.SIGKILL and kill_when is not None and kill_when(i))]
        if not failed:
            return results
        i, rc, log = ([f for f in failed if f[1] != -signal.SIGKILL] or failed)[0]
        if rc == PLATFORM_EXIT and "Failed to start RPC server" in log and attempt < 2:
            continue
        if rc == PLATFORM_EXIT:
            reason = [line for line in log.splitlines() if line.startswith("PLATFORM:")]
            pytest.skip(f"this platform cannot run CPU multi-process collectives ({(reason or [log])[-1]})")
        raise AssertionError(f"worker {i} exited with {rc}:\n{log}")
    raise AssertionError("unreachable")
