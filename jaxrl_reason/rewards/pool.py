"""Scoring in worker processes with a per-item wall-clock limit: a bad answer can never stall training.

`VerifierPool(num_workers, timeout_s).score_batch(fn, responses, golds) -> (scores_N, info)` runs
`fn(response, gold) -> float` for every item. An item that raises, returns a non-finite value, runs past
`timeout_s` (its worker is killed, SIGKILL) or crashes its worker (segfault, `os._exit`, out of memory)
scores 0.0 and is counted in `info` ("errors", "timeouts"); killed or dead workers are replaced, so the
next item is scored normally. This is how math-verify is run with its own `signal.alarm` timers off
: the limit is enforced here, from outside.

`fn` is a registered name (`VERIFIERS`), a `"package.module:function"` path, or a picklable top-level
callable. Workers import it once and score one warm-up pair with it ("load": not counted against
`timeout_s`; math-verify's import and first symbolic comparison cost ~2 s of CPU), then keep it.

`num_workers=0` scores in-process, for cheap verifiers that cannot hang (the arithmetic task): same
results and error counting, but NO time limit.

Workers start with the "forkserver" method by default: a fresh interpreter forks them, so nothing of the
parent's threads (JAX, XLA) is inherited. Replacing a worker costs a fork plus the verifier's load, which
overlaps with the other workers' scoring.
"""
import dataclasses
import importlib
import math
import multiprocessing as mp
import pickle
import signal
import time
import weakref
from collections import deque
from multiprocessing.connection import wait

import numpy as np

# name -> (path, default warm-up (response, gold) pair or None)
VERIFIERS = {
    "arithmetic": ("jaxrl_reason.data.arithmetic:score", ("1+2=3 #### 3", "3")),
    "math": ("jaxrl_reason.rewards.math:math_score", ("so \\boxed{\\frac{x}{2}(x+2)}", "x^2/2+x")),
    "reasoning_gym": ("jaxrl_reason.data.reasoning_gym_tasks:score", None),
    "code": ("jaxrl_reason.rewards.code:code_score", None),  # pool timeout_s >= sandbox timeout + 2 s
}


def resolve_verifier(fn):
    """A callable from a registered name, a `"module:function"` path, or a callable (returned as is)."""
    if callable(fn):
        return fn
    if not isinstance(fn, str):
        raise ValueError(f"verifier must be a name, a 'module:function' path or a callable, got {fn!r}.")
    path = VERIFIERS[fn][0] if fn in VERIFIERS else fn
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"unknown verifier {fn!r}: use one of {sorted(VERIFIERS)} or 'module:function'.")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import verifier {path!r} ({e}).") from e


def _score_one(fn, response, gold) -> float:
    value = float(fn(response, gold))
    if not math.isfinite(value):
        raise ValueError(f"verifier returned a non-finite score {value}.")
    return value


def _worker_main(conn, max_memory_mb):
    """Worker loop: ("load", key, spec, warmup) -> ("loaded" | "load_error", key, msg);
    ("item", key, idx, response, gold) -> ("ok", idx, score) | ("error", idx, msg)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    if max_memory_mb:
        import resource
        limit = int(max_memory_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    fns = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "load":
            try:
                fns[msg[1]] = resolve_verifier(pickle.loads(msg[2]))
                if msg[3] is not None:
                    fns[msg[1]](*msg[3])
                conn.send(("loaded", msg[1], ""))
            except Exception as e:  # noqa: BLE001 - reported to the parent
                conn.send(("load_error", msg[1], repr(e)[:500]))
        elif msg[0] == "item":
            _, key, idx, response, gold = msg
            try:
                conn.send(("ok", idx, _score_one(fns[key], response, gold)))
            except Exception as e:  # noqa: BLE001 - any failure of the verifier scores 0
                conn.send(("error", idx, repr(e)[:500]))
        else:
            return


@dataclasses.dataclass
class _Worker:
    proc: object
    conn: object
    loaded: set
    state: str = "idle"   # idle | loading | busy
    idx: int = -1
    deadline: float = math.inf


def _kill(worker: _Worker):
    try:
        worker.proc.kill()
        worker.proc.join(timeout=5)
    finally:
        worker.conn.close()


def _shutdown(workers):
    for w in workers:
        _kill(w)


class VerifierPool:
    """Worker processes that score `(response, gold)` pairs under a per-item wall-clock limit."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 2.0, *, startup_timeout_s: float = 120.0,
                 start_method: str = "forkserver", max_memory_mb: int | None = None):
        """
        Args:
          num_workers: worker processes; 0 scores in-process without a time limit.
          timeout_s: wall-clock limit per item, from the moment the item is sent to a worker.
          startup_timeout_s: limit for a worker to import a verifier (first use in each worker).
          start_method: multiprocessing start method ("forkserver", "spawn"; "fork" is unsafe under JAX).
          max_memory_mb: optional address-space limit per worker (RLIMIT_AS); exceeding it is an error.
        """
        if num_workers < 0 or timeout_s <= 0 or startup_timeout_s <= 0:
            raise ValueError(f"need num_workers >= 0 and positive timeouts, got {num_workers}, {timeout_s}.")
        self.num_workers, self.timeout_s, self.startup_timeout_s = num_workers, timeout_s, startup_timeout_s
        self.max_memory_mb = max_memory_mb
        self.totals = {"items": 0, "timeouts": 0, "errors": 0, "restarts": 0}
        self._ctx = mp.get_context(start_method) if num_workers else None
        self._workers = [self._spawn() for _ in range(num_workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child_conn, self.max_memory_mb), daemon=True)
        proc.start()
        child_conn.close()
        return _Worker(proc=proc, conn=parent_conn, loaded=set())

    def _replace(self, i: int, info: dict):
        _kill(self._workers[i])
        self._workers[i] = self._spawn()
        info["restarts"] += 1

    def close(self):
        """Kills the workers (also done at garbage collection and interpreter exit)."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def score_batch(self, fn, responses, golds, warmup=None):
        """Scores `fn(responses[i], golds[i])` for every i.

        Args:
          warmup: a `(response, gold)` pair each worker scores once when it first loads `fn` (its result is
            ignored); defaults to the registry's pair for registered names.

        Returns:
          scores_N float32 (0.0 for failed items) and info {"timeouts", "errors", "restarts", "seconds"}.
        """
        responses, golds = list(responses), list(golds)
        if len(responses) != len(golds):
            raise ValueError(f"got {len(responses)} responses but {len(golds)} golds.")
        if self.num_workers and not self._finalizer.alive:
            raise ValueError("this VerifierPool is closed.")
        resolved = resolve_verifier(fn)   # fails here, in the parent, on a bad name
        info = {"timeouts": 0, "errors": 0, "restarts": 0}
        scores_N = np.zeros(len(responses), np.float32)
        t0 = time.monotonic()
        if self.num_workers == 0:
            for i, (r, g) in enumerate(zip(responses, golds)):
                try:
                    scores_N[i] = _score_one(resolved, r, g)
                except Exception:  # noqa: BLE001 - a failing verifier scores 0
                    info["errors"] += 1
        else:
            if callable(fn):
                try:
                    pickle.dumps(fn)
                except Exception as e:
                    raise ValueError(f"verifier {fn!r} cannot be pickled for worker processes ({e}).") from e
            if warmup is None and isinstance(fn, str) and fn in VERIFIERS:
                warmup = VERIFIERS[fn][1]
            self._run((fn, warmup), responses, golds, scores_N, info)
        info["seconds"] = time.monotonic() - t0
        for k in ("timeouts", "errors", "restarts"):
            self.totals[k] += info[k]
        self.totals["items"] += len(responses)
        return scores_N, info

    def _dispatch(self, fn_warmup, key, pending, responses, golds, info):
        """Gives idle workers a load request or the next pending item."""
        for i, w in enumerate(self._workers):
            if w.state != "idle":
                continue
            if key not in w.loaded:
                msg = ("load", key, pickle.dumps(fn_warmup[0]), fn_warmup[1])
                w.state, w.deadline = "loading", time.monotonic() + self.startup_timeout_s
            elif pending:
                w.idx = pending.popleft()
                msg, w.state = ("item", key, w.idx, responses[w.idx], golds[w.idx]), "busy"
                w.deadline = time.monotonic() + self.timeout_s
            else:
                continue
            try:
                w.conn.send(msg)
            except (OSError, pickle.PicklingError, TypeError, AttributeError) as e:
                if msg[0] == "load":   # the verifier itself was checked: the worker is broken
                    raise RuntimeError(f"cannot send the verifier to a worker ({e!r}).") from e
                info["errors"] += 1    # a dead worker or an unpicklable item: the item scores 0
                self._replace(i, info)

    def _run(self, fn_warmup, responses, golds, scores_N, info):
        """Scores all items; on any exception (or Ctrl-C) the workers still holding work are replaced, so
        no stale result can reach a later batch."""
        try:
            self._run_loop(fn_warmup, responses, golds, scores_N, info)
        except BaseException:
            for i, w in enumerate(self._workers):
                if w.state != "idle":
                    self._replace(i, info)
            raise

    def _run_loop(self, fn_warmup, responses, golds, scores_N, info):
        fn = fn_warmup[0]
        key = fn if isinstance(fn, str) else f"{fn.__module__}:{fn.__qualname__}"
        pending = deque(range(len(responses)))
        while True:
            self._dispatch(fn_warmup, key, pending, responses, golds, info)
            active = [w for w in self._workers if w.state != "idle"]
            if not active:
                return
            wait_s = max(0.0, min(w.deadline for w in active) - time.monotonic())
            ready = set(wait([w.conn for w in active], timeout=wait_s))
            for i, w in enumerate(list(self._workers)):
                if w.state == "idle":
                    continue
                if w.conn in ready:
                    self._receive(i, key, scores_N, info)
                elif time.monotonic() >= w.deadline:
                    if w.state == "loading":
                        raise RuntimeError(f"a worker did not load {key!r} within {self.startup_timeout_s} s.")
                    info["timeouts"] += 1   # the item keeps its 0.0
                    self._replace(i, info)

    def _receive(self, i, key, scores_N, info):
        w = self._workers[i]
        try:
            kind, tag, payload = w.conn.recv()
        except (EOFError, OSError):   # the worker died (crash, memory)
            if w.state == "loading":
                raise RuntimeError("a worker died while loading the verifier.") from None
            info["errors"] += 1
            self._replace(i, info)
            return
        if kind == "load_error":
            raise ValueError(f"workers cannot load verifier {key!r}: {payload}")
        if kind == "loaded":
            w.loaded.add(tag)
        elif kind == "ok":
            scores_N[tag] = payload
        else:
            info["errors"] += 1
        w.state, w.idx, w.deadline = "idle", -1, math.inf
