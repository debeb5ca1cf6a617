"""Metric logging: (sum, count) reduction, JSONL + TensorBoard writers, a progress bar.

`reduce_metrics` / `MeanAccumulator` turn per-micro-batch metrics into means over the whole step with explicit
(sum, count) bookkeeping, so a token-level metric weighted by token counts and a sequence-level one weighted by
sequence counts both come out exact regardless of how the batch was split. `MetricsWriter` appends one JSON line
per step to `workdir/metrics.jsonl` (flushed on every write, so a killed run loses nothing it logged) and mirrors
finite scalars to TensorBoard under `workdir/tensorboard`. Host-side only: values are pulled to numpy float64.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "nonfinite")


# --------------------------------------------------------------------------------------------- reduction
class MeanAccumulator:
    """Per-key running (sum, count) of scalar metrics; `result()` gives sum / count per key.

    `add(metrics, weight)`: each value is either a scalar x (adds weight * x to the sum and weight to the count) or
    a pair `(sum, count)` already reduced by the caller (e.g. a masked token sum and its token count), which is
    added as is. A key whose total count is 0 reports 0.0 (guarded denominator).
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, metrics: Mapping[str, Any], weight: float = 1.0) -> None:
        weight = float(weight)
        if not weight >= 0.0:
            raise ValueError(f"Metric weights must be non-negative, got {weight}.")
        for key, value in metrics.items():
            if isinstance(value, tuple):
                if len(value) != 2:
                    raise ValueError(f"Metric '{key}' is a tuple of length {len(value)}; expected (sum, count).")
                s, c = _scalar(key, value[0]), _scalar(key, value[1])
            else:
                v = _scalar(key, value)
                s, c = (weight * v if weight > 0 else 0.0), weight  # weight 0 drops even a NaN value
            self.sums[key] = self.sums.get(key, 0.0) + s
            self.counts[key] = self.counts.get(key, 0.0) + c

    def result(self) -> dict[str, float]:
        return {k: (self.sums[k] / self.counts[k] if self.counts[k] > 0 else 0.0) for k in self.sums}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}


def reduce_metrics(metrics_list: Sequence[Mapping[str, Any]],
                   weights: Sequence[float] | None = None) -> dict[str, float]:
    """Weighted mean of each key over a list of per-micro-batch metric dicts.

    Args:
        metrics_list: N dicts of scalars or `(sum, count)` pairs (see `MeanAccumulator`); keys may differ between
            dicts, each key is averaged over the dicts that contain it.
        weights: N non-negative weights (e.g. token or sequence counts per micro-batch); default all 1.
    Returns:
        {key: sum_i w_i x_i / max-guarded sum_i w_i} as Python floats.
    """
    if weights is None:
        weights = [1.0] * len(metrics_list)
    if len(weights) != len(metrics_list):
        raise ValueError(f"reduce_metrics got {len(metrics_list)} metric dicts but {len(weights)} weights.")
    acc = MeanAccumulator()
    for metrics, w in zip(metrics_list, weights):
        acc.add(metrics, w)
    return acc.result()


def _scalar(key: str, value: Any) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"Metric '{key}' has shape {arr.shape}; only scalars can be logged or reduced.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise ValueError(f"Metric '{key}' has dtype {arr.dtype}; only real numbers can be logged or reduced.")
    return float(arr.reshape(()).astype(np.float64))


# --------------------------------------------------------------------------------------------- writers
def _json_value(key: str, value: Any) -> int | float | None:
    """Python int for integer/bool metrics, float for real ones, None for NaN/inf."""
    arr = np.asarray(value)
    f = _scalar(key, arr)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return int(arr.reshape(()))
    return f if math.isfinite(f) else None


def _drop_torn_tail(path: str, keep_until_step: int | None) -> None:
    """Removes a partial last line left by a killed writer and, if asked, records with step > keep_until_step."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")[:-1]  # the element after the last newline is empty or a torn write
    if keep_until_step is not None:
        try:
            lines = [ln for ln in lines if not ln.strip() or json.loads(ln).get("step", -1) <= keep_until_step]
        except json.JSONDecodeError:
            raise ValueError(f"{path} has a malformed line, so it cannot be truncated for resume.") from None
    new = b"".join(ln + b"\n" for ln in lines)
    if new != data:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class MetricsWriter:
    """Appends `{"step": s, **metrics}` lines to `workdir/metrics.jsonl` and scalars to TensorBoard.

    Non-finite values are written as null and their keys listed under "nonfinite" (that key appears only when
    non-empty); they are not sent to TensorBoard. Integer and bool metrics stay ints.

    Args:
        workdir: directory (created if missing).
        tensorboard: also write `workdir/tensorboard/events.*` through tensorboardX.
        truncate_after: on resume from checkpoint step k, pass k: existing lines with step > k are dropped (they
            would be written again) and TensorBoard purges events after k.
        enabled: write anything at all; default only on process 0 of a multi-host run.
    """

    def __init__(self, workdir, *, tensorboard: bool = True, truncate_after: int | None = None,
                 enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(os.fspath(workdir), exist_ok=True)
        _drop_torn_tail(self.path, truncate_after)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: only writers need it
            purge = None if truncate_after is None else truncate_after + 1
            self._tb = SummaryWriter(os.path.join(os.fspath(workdir), TENSORBOARD_DIR), purge_step=purge,
                                     flush_secs=30)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Writes one record and returns it (as written to JSON)."""
        record: dict[str, Any] = {"step": int(step)}
        nonfinite = []
        for key, value in metrics.items():
            if key in _RESERVED:
                raise ValueError(f"Metric name '{key}' is reserved by MetricsWriter; rename it.")
            record[key] = _json_value(key, value)
            if record[key] is None:
                nonfinite.append(key)
        if nonfinite:
            record["nonfinite"] = nonfinite
        if not self.enabled:
            return record
        if self._file is None:
            raise ValueError(f"MetricsWriter for {self.path} is closed.")
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, v in record.items():
                if key not in _RESERVED and v is not None:
                    self._tb.add_scalar(key, float(v), int(step))
        return record

    def close(self) -> None:
        """Flushes and closes both writers; idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path) -> list[dict]:
    """Records of a metrics JSONL file (or of `path/metrics.jsonl` when `path` is a directory), in file order.

    A partial last line (a writer killed mid-write) is skipped; any other malformed line raises ValueError.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Metrics file {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: torn final write
                break
            raise ValueError(f"Line {i + 1} of {path} is not valid JSON.") from None
    return records


# --------------------------------------------------------------------------------------------- progress bar
class ProgressBar:
    """tqdm bar over training steps whose postfix shows the step and, when present, reward and accuracy.

    Args:
        total: number of steps.
        desc: bar label.
        enabled: show the bar; default only when `file` is a TTY (silent in logs and CI).
        file: output stream, default sys.stdout.
        initial: starting step (for resumed runs).
        postfix_keys: {label shown: metric key} looked up in the metrics passed to `update`.
    """

    def __init__(self, total: int, desc: str = "train", *, enabled: bool | None = None, file=None,
                 initial: int = 0, postfix_keys: Mapping[str, str] | None = None):
        file = sys.stdout if file is None else file
        if enabled is None:
            enabled = bool(getattr(file, "isatty", lambda: False)())
        self.enabled = enabled
        self.step = int(initial)
        self.postfix_keys = dict(postfix_keys or {"reward": "reward", "accuracy": "accuracy"})
        self._bar = tqdm(total=total, desc=desc, file=file, initial=initial, disable=not enabled,
                         dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, Any] | None = None, **shown: Any) -> dict[str, str]:
        """Moves the bar to `step` and sets the postfix; returns the postfix it shows.

        The postfix is the step, then the `postfix_keys` found in `metrics`, then every keyword scalar as given
        (e.g. `update(it, reward=r, length=l)`).
        """
        step = int(step)
        postfix = {"step": str(step)}
        for label, key in self.postfix_keys.items():
            if metrics is not None and key in metrics:
                postfix[label] = f"{_scalar(key, metrics[key]):.4g}"
        for label, value in shown.items():
            postfix[label] = f"{_scalar(label, value):.4g}"
        if self.enabled:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step - self.step)
        self.step = step
        return postfix

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
