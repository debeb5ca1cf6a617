"""Preemption end to end: the real RL loop in a subprocess, killed with SIGKILL (once during a save) or stopped by
SIGTERM, resumes from its newest complete checkpoint and ends with exactly the uninterrupted run's state.

Every process is `tests/preemption_worker.py` (= `loop.run` on `rl_testing.tiny_config("grpo")` with the digit
reward), on one CPU device, sharing a persistent XLA compilation cache so only the reference run compiles.

How kills are timed: a reader thread collects the child's stdout; once the child has printed its start line
("resumed from ..." or "held-out before RL", both printed after the metrics file is truncated and stale
temporary checkpoint directories are removed), the test polls `metrics.jsonl` and `checkpoints/` every 2 ms.
A "random moment" kill fires a seeded random 0-0.2 s after the child logs a seeded random iteration (beyond
the ones an earlier killed process logged). The kill
during a save runs the child with `--slow_finalize_s` (orbax's commit waits, as on a slow file system), waits for
`<k>.orbax-checkpoint-tmp` to appear and kills at once; the test then checks the directory is still temporary (the
kill really landed inside the save).
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "preemption_worker.py")
NUM_STEPS = 10
TMP_SUFFIX = ".orbax-checkpoint-tmp"
START = re.compile(r"^(resumed from .* at iteration (\d+)|held-out before RL)")
TIMEOUT_S = 600  # per child; only reached if the code under test hangs


class Child:
    """One worker process whose stdout lines are collected by a thread."""

    def __init__(self, workdir, cache_dir, checkpoint_every=1, slow_finalize_s=0.0):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
        env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        self.out = f"{workdir}.npz"
        cmd = [sys.executable, WORKER, f"--workdir={workdir}", f"--out={self.out}", f"--num_steps={NUM_STEPS}",
               f"--checkpoint_every={checkpoint_every}", f"--slow_finalize_s={slow_finalize_s}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.deadline = time.time() + TIMEOUT_S

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def started(self):
        """Resume iteration (0 for a fresh start) once the start line is printed, else None."""
        for line in self.lines:
            m = START.match(line)
            if m:
                return int(m.group(2) or 0)
        return None

    def poll_until(self, condition):
        """Waits (polling every 2 ms) until the child has started and `condition()` holds; fails if it exits."""
        while self.started() is None or not condition():
            assert self.proc.poll() is None, "worker exited before the kill:\n" + self.log()
            assert time.time() < self.deadline, "worker timed out:\n" + self.log()
            time.sleep(0.002 if self.started() is not None else 0.05)  # fast polling only once training runs

    def finish(self, sig=None):
        """Sends `sig` (if any), waits for the exit and returns the exit code."""
        try:
            if sig is not None:
                os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=max(self.deadline - time.time(), 1))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=60)
            self._reader.join(timeout=60)
        return self.proc.returncode

    def log(self):
        return "\n".join(self.lines[-30:])


def train_steps(workdir):
    """Steps of the complete RL-iteration lines of metrics.jsonl (a torn last line is skipped)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")[:-1]
    return [json.loads(ln)["step"] for ln in lines if '"train/loss"' in ln]


def ckpt_dirs(workdir):
    """(finalized steps, steps with a temporary directory) under workdir/checkpoints."""
    root = os.path.join(workdir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    done = sorted(int(n) for n in names if n.isdigit())
    tmp = sorted(int(n.split(".")[0]) for n in names if n.endswith(TMP_SUFFIX))
    return done, tmp


def final_checkpoint(workdir):
    """(flat {path: array} of the TrainState, meta) of the newest finalized step, read with plain orbax."""
    step = ckpt_dirs(workdir)[0][-1]
    path = os.path.join(workdir, "checkpoints", str(step))
    state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
    meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(path, "meta"))
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(state)}
    return step, flat, meta


def assert_same_run(ref_dir, run_dir, ref_out, run_out):
    """Final params, final checkpoint (state + meta) and per-step metrics equal the uninterrupted run's."""
    a, b = np.load(ref_out), np.load(run_out)
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"final parameter {k}")
    step_a, state_a, meta_a = final_checkpoint(ref_dir)
    step_b, state_b, meta_b = final_checkpoint(run_dir)
    assert step_a == step_b == NUM_STEPS and meta_a == meta_b and state_a.keys() == state_b.keys()
    for k in state_a:
        np.testing.assert_array_equal(state_a[k], state_b[k], err_msg=f"checkpointed {k}")
    rows_a = [json.loads(ln) for ln in open(os.path.join(ref_dir, "metrics.jsonl"))]
    rows_b = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == list(range(NUM_STEPS + 2))
    for ra, rb in zip(rows_a, rows_b):
        drop = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
        assert drop(ra) == drop(rb), f"metrics of step {ra['step']} differ"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (checkpoint every iteration); it also fills the shared compilation cache."""
    root = tmp_path_factory.mktemp("preempt")
    child = Child(root / "reference", root / "xla_cache")
    assert child.finish() == 0, child.log()
    assert train_steps(root / "reference") == list(range(1, NUM_STEPS + 1))
    assert ckpt_dirs(root / "reference") == ([NUM_STEPS - 1, NUM_STEPS], [])  # keep_checkpoints = 2
    return root, root / "reference", child.out


def _kill_at_iteration(child, workdir, target, delay):
    """SIGKILL a seeded random `delay` seconds after the child logs iteration `target`."""
    child.poll_until(lambda: max(train_steps(workdir), default=0) >= target)
    time.sleep(delay)
    assert child.finish(signal.SIGKILL) == -signal.SIGKILL, child.log()


def test_sigkill_at_random_moments_and_during_a_save_resumes_exactly(reference):
    root, ref_dir, ref_out = reference
    workdir, rng, cache = root / "killed", random.Random(0), root / "xla_cache"
    children, after_kill = [], []  # after_kill: (finalized steps, last logged iteration, step caught mid-save)

    # 1: a random moment early in training (possibly before the first save is committed)
    children.append(Child(workdir, cache))
    _kill_at_iteration(children[-1], workdir, rng.randint(1, 3), rng.uniform(0.0, 0.2))
    after_kill.append((ckpt_dirs(workdir)[0], max(train_steps(workdir)), None))

    # 2: during the first save of the resumed process: its commit is held back, the kill lands inside it
    child = Child(workdir, cache, slow_finalize_s=120.0)
    children.append(child)
    child.poll_until(lambda: any(s > child.started() for s in ckpt_dirs(workdir)[1]))
    assert child.finish(signal.SIGKILL) == -signal.SIGKILL, child.log()
    done, tmp = ckpt_dirs(workdir)
    assert max(tmp) not in done, "the save was committed before the kill landed"
    after_kill.append((done, max(train_steps(workdir)), max(tmp)))

    # 3: a random moment later in training; the target is past every line the killed runs left (the restart prints
    # "resumed from" just before it truncates them, so a stale line must not trigger the kill)
    children.append(Child(workdir, cache))
    first = min(after_kill[-1][1] + 1, NUM_STEPS - 2)
    _kill_at_iteration(children[-1], workdir, rng.randint(first, NUM_STEPS - 2), rng.uniform(0.0, 0.2))
    after_kill.append((ckpt_dirs(workdir)[0], max(train_steps(workdir)), None))

    # the last restart runs to the end
    children.append(Child(workdir, cache))
    assert children[-1].finish() == 0, children[-1].log()

    print("after each kill (finalized steps, last logged iteration, step caught mid-save):", after_kill,
          "-> resumed at", [c.started() for c in children[1:]])
    # every restart resumed from the newest complete checkpoint and lost at most one save interval (1 iteration)
    for (done, logged, caught), restarted in zip(after_kill, children[1:]):
        start = restarted.started()
        assert start == max(done, default=0), f"resumed at {start}; the newest complete checkpoint is {done}"
        assert logged - start <= 1, f"a kill after iteration {logged} resumed at {start}: more than 1 lost"
        if caught is not None:
            assert start == caught - 1, f"resumed at {start}, not before the half-written step {caught}"
    assert any(c.started() >= 1 for c in children[1:]), "no kill landed after the first committed checkpoint"
    assert ckpt_dirs(workdir)[1] == [], "a temporary checkpoint directory was left behind"
    assert_same_run(ref_dir, workdir, ref_out, children[-1].out)


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(reference):
    root, ref_dir, ref_out = reference
    workdir, every = root / "terminated", 3
    child = Child(workdir, root / "xla_cache", checkpoint_every=every)
    child.poll_until(lambda: every in ckpt_dirs(workdir)[0])  # the first (regular) checkpoint is on disk
    assert child.finish(signal.SIGTERM) == 0, child.log()
    stops = [int(m.group(1)) for m in map(re.compile(r"preempted: saved iteration (\d+), exiting cleanly").match,
                                          child.lines) if m]
    assert len(stops) == 1 and every <= stops[0] < NUM_STEPS, child.log()
    stop = stops[0]
    print(f"SIGTERM after checkpoint {every} exists: saved and stopped at iteration {stop}")
    assert ckpt_dirs(workdir) == ([stop] if stop == every else [every, stop], [])
    assert max(train_steps(workdir)) == stop
    assert not os.path.exists(child.out)  # a preempted run skips the final evaluation and export
    resumed = Child(workdir, root / "xla_cache", checkpoint_every=every)
    assert resumed.finish() == 0, resumed.log()
    assert resumed.started() == stop
    assert_same_run(ref_dir, workdir, ref_out, resumed.out)
