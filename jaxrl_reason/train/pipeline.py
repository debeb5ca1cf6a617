"""Rollout pipelining (`rollout.staleness`): the rollout of iteration k+1 samples while iteration k updates.

    staleness 0  rows_k = rollout(params_k) at the start of iteration k, then the update (synchronous).
    staleness 1  rows_k ready (sampled in the background during update k-1 by params_{k-1}; synchronously at the
                 first iteration) -> build_batch(rows_k, params_k) -> method state -> rollout of k+1 starts in a
                 background thread on a copy of params_k -> update k -> params_{k+1}.

With staleness 1 every batch after the first is off-policy by one update. The old log-probs are recomputed with
params_k, so the PPO ratio stays pi_theta / pi_k, and the rollout importance weights of `train/mismatch.py` compare
those old log-probs with the sampler's raw ones, i.e. pi_k / pi_{k-1} per token (or per row), truncated or masked
at `rollout.is_cap`: the decoupled behaviour-policy correction for the one-update lag (plus the numerical
mismatch it corrects anyway). Both sides are temperature-1 log-probs, as in the synchronous correction. That is
why staleness 1 requires `rollout.is_correction`.

Resume: a checkpoint written while a rollout is pending waits for it and stores its rows, metrics and the prompt
stream position after them in `<workdir>/pending_rollout/<step>.npz` (written before the orbax save
starts; the meta names it under "pending_rollout"), so a restart trains on the same stale rows as the uninterrupted
run. The meta's "stream_position" stays the position after the rows already trained on; a run resumed with
staleness 0, or one whose file is missing, samples that iteration's rows again with the restored parameters.

Threads: only the background thread touches the prompt stream while it runs; its exception re-raises in the main
thread at the next `take` or `wait`; `close` joins it (a jitted rollout cannot be cancelled: it finishes). A
preemption or the time budget saves the checkpoint after the update as usual, waiting for the pending rollout to
store it. One process only: several hosts could each launch the two threads' programs in a different order.
"""
from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jaxrl_reason.train.contracts import Rows
from jaxrl_reason.train.sampler_layout import sampler_copy

STALENESS = (0, 1)
PENDING_DIR = "pending_rollout"


def validate(config) -> None:
    """One ValueError sentence for a `rollout.staleness` the loop cannot serve."""
    r = config.rollout
    s = r.get("staleness", 0)
    if isinstance(s, bool) or s not in STALENESS:
        raise ValueError(f"rollout.staleness must be 0 (synchronous) or 1 (the next rollout samples during the "
                         f"update), got {s!r}.")
    if s == 0:
        return
    if config.model.attention != "causal":
        raise ValueError("rollout.staleness 1 is for autoregressive (causal) policies: masked-diffusion rows have "
                         "no sampler log-probs to correct stale rows with.")
    if r.is_correction == "none":
        raise ValueError("rollout.staleness 1 trains on rows sampled by the previous parameters: set "
                         "rollout.is_correction (e.g. 'token_tis') so they are weighted by new / sampler log-probs.")
    if r.exact_logprobs:
        raise ValueError("rollout.exact_logprobs makes sampler and trainer log-probs equal bit for bit, which rows "
                         "sampled by the previous parameters cannot be: use it with rollout.staleness 0.")
    if jax.process_count() > 1:
        raise ValueError("rollout.staleness 1 runs in one process: with several, each host's two threads could "
                         "launch their programs in a different order and the hosts' collectives would wait on "
                         "each other.")


@dataclasses.dataclass
class Collected:
    """One iteration's rollout: its rows, metrics, own wall seconds, staleness and the stream position after it."""

    iteration: int
    rows: Rows
    metrics: dict
    seconds: float
    staleness: int
    stream_after: int


def detached(copy, source):
    """`copy` with every leaf that is one of `source`'s own arrays replaced by a fresh device copy: `sampler_copy`
    returns the trainer's arrays when no cast or reshard is needed, and the update step donates (deletes) those."""
    own = {id(x) for x in jax.tree.leaves(source)}
    return jax.tree.map(lambda x: jnp.copy(x) if id(x) in own else x, copy)


class RolloutPipeline:
    """Hands the loop each iteration's rollout, sampled at once or prefetched in a background thread.

    `collect(sampler_params, iteration, sampler_args) -> (rows, metrics)` samples one iteration from `stream`.
    """

    def __init__(self, config, collect: Callable, stream, pending_dir):
        self.config, self.staleness = config, config.rollout.get("staleness", 0)
        self._collect, self.stream, self.pending_dir = collect, stream, epath.Path(pending_dir)
        self.position = stream.position  # prompts consumed by the rows handed out so far
        self._ready: Collected | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _run(self, params, it: int, sampler_args: tuple, staleness: int) -> Collected:
        t0 = time.time()
        rows, metrics = self._collect(params, it, sampler_args)
        return Collected(it, rows, metrics, time.time() - t0, staleness, self.stream.position)

    def take(self, it: int, params, sampler_args: tuple) -> tuple[Rows, dict, dict]:
        """(rows, metrics, time metrics) of iteration `it`: the prefetched rollout (waited for), or sampled now
        with `params` (the trainer's policy params) when none is pending."""
        t0 = time.time()
        got = self.wait()
        self._ready = None
        if got is None:
            got = self._run(sampler_copy(self.config, params), it, sampler_args, 0)
            got.seconds = time.time() - t0  # with the sampler copy, as the wait counts it
        elif got.iteration != it:
            raise RuntimeError(f"the pending rollout is iteration {got.iteration}'s, not {it}'s.")
        self.position = got.stream_after
        metrics = dict(got.metrics)
        if self.staleness:
            metrics["rollout/staleness"] = got.staleness
        return got.rows, metrics, {"time/rollout_s": got.seconds, "time/rollout_wait_s": time.time() - t0}

    def prefetch(self, it: int, params, sampler_args: tuple, num_steps: int) -> None:
        """With staleness 1 and `it` < `num_steps`: starts iteration `it`'s rollout in a background thread on a
        copy of `params` that the update cannot donate (ready on device before this returns)."""
        if self.staleness == 0 or it >= num_steps:
            return
        if self._thread is not None or self._ready is not None:
            raise RuntimeError(f"a rollout is already pending when iteration {it}'s is started.")
        copy = jax.block_until_ready(detached(sampler_copy(self.config, params), params))

        def work():
            try:
                self._ready = self._run(copy, it, sampler_args, 1)
            except BaseException as e:  # re-raised in the main thread by `wait`
                self._error = e

        self._thread = threading.Thread(target=work, name=f"rollout-{it}", daemon=True)
        self._thread.start()

    def wait(self) -> Collected | None:
        """The pending rollout once its thread has finished (None when none is pending); re-raises its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._ready

    def close(self) -> None:
        """Joins a running background rollout (its result or error is dropped)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._ready, self._error = None, None

    # ----------------------------------------------------------------------------------------- checkpointing
    def _path(self, step: int) -> epath.Path:
        return self.pending_dir / f"{step}.npz"

    def checkpoint_meta(self, step: int, meta: dict, kept_steps: Callable[[], list]) -> dict:
        """`meta` for the checkpoint of `step`: waits for a pending rollout, writes it (atomically) and names it
        under "pending_rollout"; removes the files of steps not in `kept_steps()` (the checkpoints on disk)."""
        meta = {k: v for k, v in meta.items() if k != "pending_rollout"}
        got = self.wait()
        if got is None:
            return meta
        path = self._path(step)
        save_collected(path, got)
        self._prune(set(kept_steps()) | {step})
        return {**meta, "pending_rollout": path.name}

    def _prune(self, keep: set) -> None:
        for f in self.pending_dir.glob("*.npz"):
            step = f.name[:-len(".npz")]
            if step.isdigit() and int(step) not in keep:
                f.unlink()

    def restore(self, meta: dict) -> dict:
        """Takes the pending rollout a restored checkpoint's `meta` names (with staleness 1), so the next `take`
        returns its rows; returns `meta` without its name."""
        name = meta.get("pending_rollout")
        meta = {k: v for k, v in meta.items() if k != "pending_rollout"}
        if not name or self.staleness == 0:
            return meta
        path = self._path(meta["iteration"])
        if not path.exists():
            print(f"warning: {path} is missing; iteration {meta['iteration'] + 1} samples its rows again with the "
                  f"restored parameters.", flush=True)
            return meta
        self._ready = load_collected(path)
        self.stream.position = self._ready.stream_after
        return meta


def save_collected(path: epath.Path, got: Collected) -> None:
    """Writes `got` to `path` (.npz, no pickles) through a temporary file renamed into place."""
    arrays = {f"rows/{f.name}": np.asarray(getattr(got.rows, f.name)) for f in dataclasses.fields(got.rows)
              if getattr(got.rows, f.name) is not None}
    info = {"iteration": got.iteration, "metrics": got.metrics, "seconds": got.seconds, "staleness": got.staleness,
            "stream_after": got.stream_after}
    buf = io.BytesIO()  # numpy scalars among the metrics are stored as the Python numbers they hold
    np.savez(buf, info=np.asarray(json.dumps(info, default=lambda x: x.item())), **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def load_collected(path: epath.Path) -> Collected:
    """The `Collected` that `save_collected` wrote to `path`."""
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
        info = json.loads(str(z["info"]))
        rows = Rows(**{k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("rows/")})
    return Collected(info["iteration"], rows, info["metrics"], info["seconds"], info["staleness"],
                     info["stream_after"])
