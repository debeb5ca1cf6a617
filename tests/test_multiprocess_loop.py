"""The whole RL loop as two JAX processes == the same loop as one process, including a kill and resume.

Two CPU processes of 2 fake devices each are joined by `jax.distributed` on loopback (gloo collectives) and run
`train/loop.run` through `tests/multiprocess_loop_worker.py`: tiny GRPO with the zero-variance group filter (its
refill rounds are decided from rows sampled on both processes), a checkpoint every iteration and the Hugging Face
export, on a (data=1, fsdp=4, tensor=1) mesh, so every weight matrix is split over both processes and each process
samples and scores its own 2 of the 4 groups of a round. The two-process run (2 iterations) is SIGKILLed, both
process groups, once checkpoint 1 is finalized on disk and before checkpoint 2 is begun (`--hang_after_checkpoint=1`:
each process writes a marker file and blocks there; the kill waits for both markers, so it lands at the same point
on every run). A second launch of the same commands resumes it from checkpoint 1 to iteration 2. Alongside the
first launch one process runs the same config alone on 4 devices with the same mesh, uninterrupted, to iteration 2.

Checked: every line of metrics.jsonl (held-out evaluations, rewards, filter rounds, losses) and the exported
Hugging Face files (weights allclose, the rest byte-equal) of the resumed two-process run equal the uninterrupted
one-process run's (rtol 1e-5, atol 1e-6).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest

from multiprocess_testing import ROOT, launch_joined

WORKER = os.path.join(ROOT, "tests", "multiprocess_loop_worker.py")
DEADLINE_S = 300.0  # generous for a loaded 2-core machine; each launch takes ~20-30 s on an idle one


def _cmd(workdir, *, num_processes: int = 1, process_id: int = 0, port: int = 0) -> list[str]:
    cmd = [sys.executable, WORKER, f"--workdir={workdir}", "--num_steps=2", f"--num_processes={num_processes}",
           f"--process_id={process_id}", f"--local_devices={4 // num_processes}"]
    return cmd + ([f"--coordinator=127.0.0.1:{port}", "--hang_after_checkpoint=1"] if num_processes > 1 else [])


def _fresh(*dirs):
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess_loop")
    two, one = tmp / "two", tmp / "one"
    markers = [two / f"hung_after_checkpoint.process{p}" for p in (0, 1)]

    def two_processes(port):
        return [_cmd(two, num_processes=2, process_id=p, port=port) for p in (0, 1)]

    def first(port):  # a retried launch starts from empty workdirs
        _fresh(two, one)
        return two_processes(port) + [_cmd(one)]

    # both two-process workers are killed together, once both hang after checkpoint 1; the reference runs on
    first_launch = launch_joined(first, str(tmp), DEADLINE_S, kill_when=lambda i: i < 2 and all(
        m.exists() for m in markers))
    after_kill = sorted(os.listdir(two / "checkpoints"))
    second_launch = launch_joined(two_processes, str(tmp), DEADLINE_S)
    return dict(two=two, one=one, first=first_launch, second=second_launch, after_kill=after_kill)


def _metrics(workdir) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


def test_runs_are_what_they_claim(runs):
    (rc0, first0), (rc1, first1), (rc_ref, ref) = runs["first"]
    # the first two-process launch was killed, after both processes had checkpoint 1 on disk and before checkpoint 2
    assert rc0 == rc1 == -signal.SIGKILL and rc_ref == 0
    for p, log in enumerate((first0, first1)):
        assert "WORKER_HANGING after checkpoint 1" in log and "WORKER_DONE" not in log
        assert (runs["two"] / f"hung_after_checkpoint.process{p}").exists()
    assert runs["after_kill"] == ["1"]
    assert "WORKER_DONE process 0/1 iterations=2" in ref
    for p, (rc, log) in enumerate(runs["second"]):  # ... and the same commands resumed from checkpoint 1
        assert rc == 0 and "resumed from" in log and "at iteration 1" in log
        assert f"WORKER_DONE process {p}/2 iterations=2" in log and "WORKER_HANGING" not in log
    for log in (first0, ref):
        assert "mesh: {'data': 1, 'fsdp': 4, 'tensor': 1} over 4 cpu devices" in log
    assert sorted(os.listdir(runs["two"] / "checkpoints")) == ["1", "2"]


def test_two_processes_resumed_match_one_process_metrics(runs):
    ref, got = _metrics(runs["one"]), _metrics(runs["two"])
    assert [r["step"] for r in ref] == [0, 1, 2, 3]  # evaluation, 2 iterations, evaluation
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(ref, got):
        assert sorted(a) == sorted(b), a["step"]
        for k, v in a.items():
            np.testing.assert_allclose(b[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{k} at step {a['step']}")
    # the compared runs did what the test is about: a refill round decided from both processes' rows, real updates
    assert max(r.get("rollout/rounds", 0) for r in ref) == 2
    assert all(r["train/grad_norm"] > 0 for r in ref if "train/grad_norm" in r)
    assert ref[-1]["eval/pass@1"] != ref[0]["eval/pass@1"]


def test_two_processes_export_the_same_hugging_face_checkpoint(runs):
    from safetensors.numpy import load_file

    ref_dir, got_dir = runs["one"] / "hf_export", runs["two"] / "hf_export"
    assert sorted(os.listdir(got_dir)) == sorted(os.listdir(ref_dir))
    ref, got = load_file(str(ref_dir / "model.safetensors")), load_file(str(got_dir / "model.safetensors"))
    assert sorted(got) == sorted(ref) and len(ref) > 5
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for name in os.listdir(ref_dir):
        if name != "model.safetensors":
            assert (got_dir / name).read_bytes() == (ref_dir / name).read_bytes(), name
