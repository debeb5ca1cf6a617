"""Checkpoints that never lose work: orbax CheckpointManager over a `TrainState` plus JSON meta.

Saved: params, optimizer state, step, rng and the data-iterator position. orbax 0.12.8's v0 API (its v1 API is
still experimental); restore targets need concrete NamedShardings: orbax cannot restore into AbstractMesh ones.

A checkpoint step holds two items: `state`, the TrainState leaves stored as a nested dict keyed by their pytree
path (`params/kernel`, `opt_state/0/mu/kernel`; the `.value` of nnx Variables is dropped, so params stored as an
`nnx.State` and as a pure dict of arrays give the same keys), and `meta`, a strict-JSON dict (data-iterator
position, host RNG state as ints, config, metrics history). Writes are atomic: orbax writes into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only after every file is committed, and only renamed
(finalized) steps are ever listed or restored. Leftover temporary directories of a killed run are removed when the
next `Checkpointer` opens the directory.

A checkpoint written with one layer layout (`model.scan_layers`: stacked `layers/<param>` or per-layer
`layers/<i>/<param>`) restores into a target of the other layout, converted on restore.

Multi-host: every process calls `save` / `restore` with its global arrays (orbax writes each shard once).
"""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

_STATE, _META = "state", "meta"


# --------------------------------------------------------------------------------------------- pytree <-> paths
def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # DictKey / GetAttrKey / SequenceKey (FlattenedIndexKey has .key)
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flatten(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """Returns (paths, array leaves, treedef); an nnx Variable counts as one leaf named by its path."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    paths = [tuple(_key_str(k) for k in path) for path, _ in with_path]
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if len(leaves) != len(paths):
        raise ValueError("Every nnx.Variable in a checkpointed state must hold exactly one array.")
    if any(len(p) == 0 for p in paths):
        raise ValueError("A checkpointed state must be a container of arrays, not a single bare array.")
    return paths, leaves, treedef


def _nest(paths: list[tuple[str, ...]], leaves: list[Any]) -> dict:
    nested: dict = {}
    for path, leaf in zip(paths, leaves):
        node = nested
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return nested


def _walk(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Flattens orbax's nested metadata dict into {path: leaf metadata}."""
    if isinstance(tree, dict):
        out: dict = {}
        for k, v in tree.items():
            out.update(_walk(v, prefix + (str(k),)))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_walk(v, prefix + (str(i),)))
        return out
    return {prefix: tree}


def _name(path: tuple[str, ...]) -> str:
    return "/".join(path)


# --------------------------------------------------------------------------------------------- abstract targets
def abstract_like(state: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
    """ShapeDtypeStruct pytree of `state` with concrete shardings, usable as an orbax restore target.

    A target built by `nnx.eval_shape` under `jax.set_mesh` carries NamedShardings on an
    AbstractMesh, and orbax cannot restore into those. With `mesh`, every leaf gets `NamedSharding(mesh, spec)` where
    spec is the leaf's own PartitionSpec (replicated `P()` for leaves without a NamedSharding). Without `mesh`, each
    leaf keeps its concrete sharding, a leaf with no sharding goes to the first local device, and a leaf on an
    AbstractMesh raises ValueError.

    Args:
        state: pytree of jax.Array / np.ndarray / jax.ShapeDtypeStruct leaves (e.g. a TrainState).
        mesh: optional concrete `jax.sharding.Mesh` to place every leaf on.
    Returns:
        the same pytree structure with `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` leaves.
    """
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"abstract_like needs a concrete jax.sharding.Mesh, got {type(mesh).__name__}.")

    def one(x):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            x = np.asarray(x)
        sharding = getattr(x, "sharding", None)
        if mesh is not None:
            spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
            sharding = NamedSharding(mesh, spec)
        elif sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        elif isinstance(sharding, NamedSharding) and not isinstance(sharding.mesh, jax.sharding.Mesh):
            raise ValueError("A leaf is sharded on an AbstractMesh; pass the concrete mesh to abstract_like.")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, state)


# --------------------------------------------------------------------------------------------- finiteness
@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> tuple[jax.Array, ...]:
    # One scalar per leaf: scalars are always replicated, so every host can read them.
    return tuple(jnp.all(jnp.isfinite(x)) for x in leaves)


def _first_nonfinite(paths: list[tuple[str, ...]], leaves: list[Any]) -> str | None:
    """Name of the first floating leaf holding NaN/inf; one jitted check per set of devices the leaves live on."""
    ok = [True] * len(leaves)
    groups: dict[frozenset, list[int]] = {}
    for i, x in enumerate(leaves):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            continue
        if isinstance(x, jax.Array):
            groups.setdefault(frozenset(x.sharding.device_set), []).append(i)
        else:
            ok[i] = bool(np.all(np.isfinite(x)))
    for idx in groups.values():
        for i, flag in zip(idx, jax.device_get(_finite_flags([leaves[i] for i in idx]))):
            ok[i] = bool(flag)
    bad = [i for i, good in enumerate(ok) if not good]
    return _name(paths[bad[0]]) if bad else None


def _check_matches(stored: dict, paths: list, target: list, where: str, strict_dtypes: bool) -> None:
    """Raises ValueError naming the first key whose presence, shape or dtype differs between checkpoint and target."""
    for path, t in zip(paths, target):
        if path not in stored:
            raise ValueError(f"Checkpoint {where} has no entry '{_name(path)}' that the restore target expects.")
        m = stored[path]
        if tuple(m.shape) != tuple(t.shape):
            raise ValueError(
                f"Checkpoint {where} stores '{_name(path)}' with shape {tuple(m.shape)} but the restore target "
                f"expects {tuple(t.shape)}.")
        if strict_dtypes and np.dtype(m.dtype) != np.dtype(t.dtype):
            raise ValueError(
                f"Checkpoint {where} stores '{_name(path)}' as {np.dtype(m.dtype)} but the restore target expects "
                f"{np.dtype(t.dtype)}.")
    wanted = set(paths)
    extra = [p for p in stored if p not in wanted]
    if extra:
        raise ValueError(f"Checkpoint {where} has an entry '{_name(extra[0])}' that the restore target lacks.")


# --------------------------------------------------------------------------------------------- layer layouts
# A model with `scan_layers` keeps its layer params stacked under `layers/<param>` with a leading layer axis;
# an unrolled one keeps them under `layers/<i>/<param>`. A checkpoint of one layout restores into the other:
# the stored entries are read in their own layout and stacked or sliced into the target's.
def _layer_key(path: tuple[str, ...], unrolled: bool) -> int | None:
    """Index of the `layers` key of a stacked (unrolled=False) or per-layer (unrolled=True) entry, else None."""
    for i, k in enumerate(path[:-1]):
        if k == "layers" and path[i + 1].isdigit() == unrolled:
            return i
    return None


def _reshard(sharding, lead: bool):
    """`sharding` with a leading (layer) dim added (lead=True) or removed, for the stored layout's entries."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(None, *spec) if lead else PartitionSpec(*spec[1:]))


def _layout_plan(stored: dict, paths: list, abstract: list):
    """None when the checkpoint's layer layout is the target's; else (paths to read, their abstract leaves,
    rebuild(flat restored dict) -> target leaves) that read the stored layout and convert it."""
    to_stacked = any(_layer_key(p, False) is not None for p in paths) and \
        any(_layer_key(p, True) is not None for p in stored)
    to_unrolled = any(_layer_key(p, True) is not None for p in paths) and \
        any(_layer_key(p, False) is not None for p in stored)
    if not (to_stacked or to_unrolled):
        return None
    read: dict = {}
    recipes = []
    for p, a in zip(paths, abstract):
        i = _layer_key(p, not to_stacked)
        if i is None:
            read[p] = a
            recipes.append(("same", p, a))
        elif to_stacked:  # per-layer entries -> one stacked leaf
            subs = [p[:i + 1] + (str(layer),) + p[i + 1:] for layer in range(a.shape[0])]
            for q in subs:
                read[q] = jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=_reshard(a.sharding, False))
            recipes.append(("stack", subs, a))
        else:  # one stacked entry -> this layer's slice
            key, layer = p[:i + 1] + p[i + 2:], int(p[i + 1])
            n = max(int(q[i + 1]) for q in paths if _layer_key(q, True) == i and q[:i + 1] + q[i + 2:] == key) + 1
            read[key] = jax.ShapeDtypeStruct((n, *a.shape), a.dtype, sharding=_reshard(a.sharding, True))
            recipes.append(("slice", (key, layer), a))

    def rebuild(flat: dict) -> list:
        out = []
        for kind, src, a in recipes:
            if kind == "same":
                out.append(flat[src])
            elif kind == "stack":
                out.append(jax.device_put(jnp.stack([flat[q] for q in src]), a.sharding))
            else:
                out.append(jax.device_put(flat[src[0]][src[1]], a.sharding))
        return out

    return list(read), list(read.values()), rebuild


# --------------------------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` (v0 API) for a TrainState plus JSON meta.

    Args:
        directory: root directory (local path or any epath URL); created on the first save, not before.
        max_to_keep: number of finalized checkpoints kept (older ones are deleted after a newer one commits).
        save_interval_steps: `save(step, ...)` writes only when `step` is a multiple of this, or force=True, or no
            checkpoint exists yet (orbax's initial-save policy).
    """

    def __init__(self, directory, *, max_to_keep: int = 3, save_interval_steps: int = 1):
        if max_to_keep < 1 or save_interval_steps < 1:
            raise ValueError("max_to_keep and save_interval_steps must both be at least 1.")
        directory = str(directory)
        # orbax refuses relative paths (at the first async save, after a whole interval of work): make local ones
        # absolute up front; URLs (gs://...) are left as they are.
        self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
            cleanup_tmp_directories=True)
        self._manager: ocp.CheckpointManager | None = None
        self._pending: int | None = None  # step of the last save started and not yet confirmed on disk

    def _mngr(self, create: bool) -> ocp.CheckpointManager | None:
        if self._manager is None and (create or self.directory.exists()):
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options,
                item_handlers={_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()})
        return self._manager

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Starts an asynchronous save of `state` and `meta` at `step`; returns whether a save was started.

        The device arrays are copied to host before this returns, so the caller may donate or delete them. Returns
        False (and writes nothing) when `step` is not on the save interval or not after the latest checkpoint,
        unless `force`, and when a finalized checkpoint of `step` already exists (never overwritten). Raises ValueError if any floating leaf holds NaN/inf or `meta` is not strict JSON, and
        RuntimeError if the previous save failed to finalize (checked before a new save starts).
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"Checkpoint step must be non-negative, got {step}.")
        mngr = self._mngr(create=True)
        if not force and not mngr.should_save(step):
            return False
        if force and step in mngr.all_steps():
            self.wait()  # it may be the in-flight one: only a finalized step counts as already saved
            if step in mngr.all_steps():
                return False
        paths, leaves, _ = _flatten(state)
        leaves = [x if isinstance(x, (jax.Array, np.ndarray)) else np.asarray(x) for x in leaves]
        bad = _first_nonfinite(paths, leaves)
        if bad is not None:
            raise ValueError(f"Refusing to save step {step} to {self.directory}: '{bad}' contains NaN or inf.")
        if not isinstance(meta, dict):
            raise ValueError(f"Checkpoint meta must be a dict, got {type(meta).__name__}.")
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"Checkpoint meta for step {step} is not strict JSON ({e}).") from None
        self.wait()  # a failure of the previous save surfaces here, before a new one starts
        started = mngr.save(step, force=force, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(_nest(paths, leaves)), _META: ocp.args.JsonSave(meta)}))
        self._pending = step if started else None
        return started

    def all_steps(self) -> list[int]:
        """Finalized checkpoint steps, ascending (waits for an in-flight save first)."""
        mngr = self._mngr(create=False)
        if mngr is None:
            return []
        self.wait()
        return sorted(mngr.all_steps())

    def latest_step(self) -> int | None:
        """Newest finalized step, or None when there is none (waits for an in-flight save first)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, target: Any, step: int | None = None, *, strict_dtypes: bool = True) -> tuple[Any, dict]:
        """Restores (state, meta) from `step` (default: the latest finalized one) into the layout of `target`.

        Args:
            target: TrainState-like pytree of ShapeDtypeStructs with concrete shardings (see `abstract_like`) or of
                concrete arrays, whose shardings are used; restored arrays take the target's shardings.
            step: which finalized step; None for the latest.
            strict_dtypes: if False, a dtype difference casts to the target dtype instead of raising.
        Returns:
            (state with the target's pytree structure, meta dict).
        Raises:
            FileNotFoundError: the directory is missing or holds no finalized checkpoint.
            ValueError: the step is absent, or the stored tree differs from the target (names the first key).
        """
        if not self.directory.exists():
            raise FileNotFoundError(f"Checkpoint directory {self.directory} does not exist.")
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"Checkpoint directory {self.directory} holds no finalized checkpoint.")
        if step is None and len(steps) > 1:
            return self._restore_newest_intact(target, steps, strict_dtypes)
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise ValueError(f"No finalized checkpoint for step {step} in {self.directory} (available: {steps}).")
        paths, leaves, treedef = _flatten(target)
        abstract = jax.tree.leaves(abstract_like(leaves))
        stored = _walk(self._manager.metadata(step).item_metadata[_STATE].tree)
        plan = _layout_plan(stored, paths, abstract)
        read_paths, read_abstract = (paths, abstract) if plan is None else plan[:2]
        where = f"{self.directory} step {step}" + ("" if plan is None else " (read in its other layer layout, "
                                                   "model.scan_layers differs)")
        _check_matches(stored, read_paths, read_abstract, where, strict_dtypes)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(_nest(read_paths, read_abstract)), _META: ocp.args.JsonRestore()}))
        flat = _walk(restored[_STATE])
        leaves = [flat[p] for p in paths] if plan is None else plan[2](flat)
        state = jax.tree_util.tree_unflatten(treedef, leaves)
        return state, dict(restored[_META])

    def _restore_newest_intact(self, target: Any, steps: list[int], strict_dtypes: bool) -> tuple[Any, dict]:
        """The newest step that restores, with a warning for each newer one that does not (unreadable files).
        Once an older step restored, the failed newer ones are renamed `<step>.corrupt` (kept for inspection,
        out of the way of the resumed run's saves); if no step restores, nothing is renamed and the newest
        step's error is raised (a target that does not match the stored layout fails at every step)."""
        failed, first_error = [], None
        for step in reversed(steps):
            try:
                out = self.restore(target, step, strict_dtypes=strict_dtypes)
            except Exception as e:  # orbax and tensorstore raise several unrelated types for unreadable files
                failed.append(step)
                first_error = first_error or e
                print(f"warning: checkpoint {self.directory}/{step} cannot be restored ({str(e)[:160]}); trying "
                      f"the previous one.", flush=True)
                continue
            if failed and jax.process_index() == 0:
                for bad in failed:
                    os.rename(os.fspath(self.directory / str(bad)), os.fspath(self.directory / f"{bad}.corrupt"))
                self._manager.reload()
            if failed:
                print(f"warning: resumed from step {step}; the unreadable newer steps {failed} were renamed "
                      f"<step>.corrupt.", flush=True)
            return out
        raise first_error

    def wait(self) -> None:
        """Blocks until the in-flight save (if any) is done; raises RuntimeError if it did not finalize on disk."""
        if self._manager is None:
            return
        pending, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # orbax re-raises the failure of its finalize thread
            raise RuntimeError(f"Saving step {pending} to {self.directory} failed ({e}).") from e
        if pending is not None:
            self._manager.reload()
            if pending not in self._manager.all_steps():
                raise RuntimeError(f"Saving step {pending} to {self.directory} did not finalize; see the orbax log.")

    def close(self) -> None:
        """Waits for the in-flight save and releases orbax's threads; idempotent."""
        if self._manager is not None:
            try:
                self.wait()
            finally:
                self._manager.close()
                self._manager = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- preemption
class PreemptionFlag:
    """Set by SIGTERM (and optionally SIGINT); the training loop polls `requested`, saves and exits cleanly.

    On a repeat of the same signal while the flag is already set, and when `force_on_repeat`, the previous handler
    is reinstated and the signal re-delivered (so a second Ctrl-C still interrupts). In multi-host runs the loop
    should agree across hosts before acting (e.g. an all-reduce of the flag), since a signal may reach only some.
    """

    def __init__(self, signums: tuple[int, ...], force_on_repeat: bool):
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("catch_preemption must be called from the main thread.")
        self._event = threading.Event()
        self._force_on_repeat = force_on_repeat
        self._previous = {s: signal.getsignal(s) for s in signums}
        for s in signums:
            signal.signal(s, self._handle)

    @property
    def requested(self) -> bool:
        """True once a handled signal has arrived."""
        return self._event.is_set()

    @property
    def signums(self) -> tuple[int, ...]:
        return tuple(self._previous)

    def _handle(self, signum, frame) -> None:
        if self._event.is_set() and self._force_on_repeat:
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
            return
        self._event.set()

    def close(self) -> None:
        """Restores the handlers that were installed before; idempotent."""
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "PreemptionFlag":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def catch_preemption(*, sigint: bool = False, force_on_repeat: bool = True) -> PreemptionFlag:
    """Installs handlers for SIGTERM (and SIGINT if `sigint`) that set `flag.requested`; `flag.close()` undoes it."""
    signums = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
    return PreemptionFlag(signums, force_on_repeat)
