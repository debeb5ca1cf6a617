"""Tests for jaxrl_reason.train.metrics: JSONL + TensorBoard round trips, non-finite values, (sum, count) reduction."""
import io
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from jaxrl_reason.train.metrics import (MeanAccumulator, MetricsWriter, ProgressBar, read_metrics,
                                        reduce_metrics)


def _tb_events(workdir) -> list:
    """Parses TFRecord event files by hand (u64 length, u32 crc, payload, u32 crc) into Event protos."""
    events = []
    tb = os.path.join(workdir, "tensorboard")
    for name in sorted(os.listdir(tb)):
        with open(os.path.join(tb, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
            pos += 12 + n + 4
    return events


def _tb_scalars(workdir) -> list[tuple[int, str, float]]:
    return [(e.step, v.tag, v.simple_value) for e in _tb_events(workdir) for v in e.summary.value]


def test_jsonl_round_trip_with_jax_numpy_and_nonfinite_values(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=True) as writer:
        rec = writer.write(1, {"loss": jnp.float32(0.5), "reward": np.float64(0.25), "n_tokens": jnp.int32(7),
                               "filtered": np.bool_(True), "lr": 1e-3})
        assert rec == {"step": 1, "loss": 0.5, "reward": 0.25, "n_tokens": 7, "filtered": 1, "lr": 1e-3}
        # flushed on every write: readable while the writer is still open
        assert read_metrics(tmp_path) == [rec]
        writer.write(2, {"loss": jnp.array([jnp.nan]), "kl": float("inf"), "reward": 0.75})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[1] == {"step": 2, "loss": None, "kl": None, "reward": 0.75, "nonfinite": ["loss", "kl"]}
    assert isinstance(records[0]["n_tokens"], int) and "nonfinite" not in records[0]
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text and text.count("\n") == 2
    scalars = _tb_scalars(tmp_path)
    assert (1, "loss", 0.5) in scalars and (2, "reward", 0.75) in scalars and (1, "n_tokens", 7.0) in scalars
    assert not [s for s in scalars if s[0] == 2 and s[1] in ("loss", "kl")]  # non-finite values skip TensorBoard


def test_writer_errors_and_disabled(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="Metric name 'step' is reserved"):
            writer.write(1, {"step": 3})
        with pytest.raises(ValueError, match=r"Metric 'x' has shape \(2,\); only scalars"):
            writer.write(1, {"x": np.ones(2)})
        with pytest.raises(ValueError, match="only real numbers"):
            writer.write(1, {"x": "high"})
    with pytest.raises(ValueError, match="is closed"):
        writer.write(1, {"x": 1.0})
    quiet = MetricsWriter(tmp_path / "other", enabled=False)
    assert quiet.write(1, {"x": 2.0}) == {"step": 1, "x": 2.0}
    quiet.close()
    assert not (tmp_path / "other").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_metrics(tmp_path / "other")


def test_torn_last_line_and_resume_truncation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 5):
            writer.write(step, {"loss": float(step)})
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # a writer killed mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    with MetricsWriter(tmp_path, tensorboard=True, truncate_after=2) as writer:  # resumed from checkpoint step 2
        writer.write(3, {"loss": 30.0})
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
    starts = [e.step for e in _tb_events(tmp_path) if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [3]  # TensorBoard hides events at step >= 3 written before the resume
    with MetricsWriter(tmp_path, tensorboard=False) as writer:  # plain reopen appends
        writer.write(4, {"loss": 40.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="Line 2 of .* is not valid JSON"):
        read_metrics(path)


def test_reduce_metrics_against_hand_computation():
    micro = [{"loss": 1.0, "reward": 0.0, "clip": (3.0, 10.0)},
             {"loss": jnp.float32(3.0), "reward": np.float64(1.0), "clip": (1.0, 30.0)},
             {"loss": 5.0, "kl": 0.2}]
    # unweighted: loss (1+3+5)/3, reward (0+1)/2, kl 0.2/1, clip pair (3+1)/(10+30)
    assert reduce_metrics(micro) == pytest.approx({"loss": 3.0, "reward": 0.5, "kl": 0.2, "clip": 0.1})
    # weighted by tokens 2, 6, 0: loss (2*1+6*3)/8, reward 6/8, kl has total weight 0 -> guarded to 0.0
    got = reduce_metrics(micro, weights=[2, 6, 0])
    assert got == pytest.approx({"loss": 2.5, "reward": 0.75, "kl": 0.0, "clip": 0.1})
    assert reduce_metrics([]) == {}
    assert math.isnan(reduce_metrics([{"x": 1.0}, {"x": float("nan")}])["x"])
    assert reduce_metrics([{"x": 1.0}, {"x": float("nan")}], weights=[1, 0]) == {"x": 1.0}
    with pytest.raises(ValueError, match="2 metric dicts but 1 weights"):
        reduce_metrics([{}, {}], weights=[1.0])
    with pytest.raises(ValueError, match="non-negative"):
        reduce_metrics([{"x": 1.0}], weights=[-1.0])
    with pytest.raises(ValueError, match=r"expected \(sum, count\)"):
        reduce_metrics([{"x": (1.0, 2.0, 3.0)}])


def test_mean_accumulator_matches_numpy_reference():
    rng = np.random.default_rng(0)
    values, weights = rng.normal(size=6), rng.uniform(0.5, 2.0, size=6)
    acc = MeanAccumulator()
    for v, w in zip(values, weights):
        acc.add({"a": v, "b": (v * w, w)}, weight=w)
    ref = np.sum(values * weights) / np.sum(weights)
    assert acc.result() == pytest.approx({"a": ref, "b": ref})
    acc.reset()
    assert acc.result() == {}


def test_progress_bar_postfix_and_silence():
    quiet = io.StringIO()  # not a TTY: silent unless asked
    with ProgressBar(10, "rl", file=quiet) as bar:
        assert not bar.enabled
        assert bar.update(3, {"reward": 0.5}) == {"step": "3", "reward": "0.5"}
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    with ProgressBar(10, "rl", file=loud, enabled=True, initial=2) as bar:
        shown = bar.update(4, {"reward": jnp.float32(0.25), "accuracy": 0.875, "loss": 1.0})
    assert shown == {"step": "4", "reward": "0.25", "accuracy": "0.875"}
    out = loud.getvalue()
    assert "rl" in out and "4/10" in out and "reward=0.25" in out and "accuracy=0.875" in out
    kw = io.StringIO()
    with ProgressBar(5, file=kw, enabled=True) as bar:
        assert bar.update(1, reward=np.float32(0.5), length=12) == {"step": "1", "reward": "0.5", "length": "12"}
    assert "1/5" in kw.getvalue() and "length=12" in kw.getvalue()


def test_jsonl_lines_are_plain_json(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(7, {"a": np.float32(0.1)})
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert json.loads(line) == {"step": 7, "a": float(np.float32(0.1))}
