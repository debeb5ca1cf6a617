"""What the RL loop needs to run as several JAX processes (one per host), each driving its own devices.

Every process runs the same host program on the same prompts (the stream is deterministic) and must reach every
collective (a jitted call on global arrays, a gather, a checkpoint save) in the same order, so every decision the
loop takes from data (filter rounds, padding, stopping) is taken from values all processes hold:

  sampling   the rows of a sampler call are split over processes as the sampler's row sharding over
             ("data", "fsdp") places them (`process_rows`); each process encodes only its own prompts, hands them
             in as its part of a global array (`jax.make_array_from_process_local_data`), reads back only the
             shards its devices hold (`local_rows`) and scores only those rows.
  gathering  the sampled rows and their scores are then gathered to every process (`gather_rows`): rewards,
             group filters, dynamic-sampling refills and metrics are computed from the whole round, the same on
             every host. The rows are small next to the model (tokens and per-token floats of one batch).
  passes     the no-grad log-prob passes and the update step take global arrays built from those host rows
             (`global_from_host`, each process materializing only its devices' slices); results spanning
             processes come back with a gather (`to_host`), never by reading a non-addressable array.
  agreement  a preemption signal or a time budget seen by one process is acted on by all (`AgreedFlag`,
             `any_process`).

With one process every function here is the identity or a plain read, so a single-host run takes no extra step.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.sampling.autoregressive import batch_mesh


def active() -> bool:
    """True when this run has more than one JAX process."""
    return jax.process_count() > 1


def check_config(config) -> None:
    """One sentence for a setting a multi-process run does not support (before anything compiles)."""
    if not active():
        return
    if config.rollout.get("compact_rows", False):
        raise ValueError("rollout.compact_rows reads the decode state back to the host between segments, which a "
                         "multi-process run cannot do; set --config.rollout.compact_rows=False.")
    if config.model.attention != "causal":
        raise ValueError("masked-diffusion policies (model.attention other than 'causal') train in one process "
                         "only; run them without --multihost.")


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (a collective: every process must call it)."""
    if not active():
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]), tiled=True)))


class AgreedFlag:
    """A preemption flag (`train/checkpoint.PreemptionFlag`) whose `requested` is true on every process as soon as
    the signal reached any of them, so all save the same iteration and stop together."""

    def __init__(self, flag):
        self._flag = flag

    @property
    def requested(self) -> bool:
        return any_process(self._flag.requested)


def process_rows(mesh, num_rows: int, group_size: int = 1) -> list[range]:
    """The rows (a contiguous range) each process holds when `num_rows` rows are sharded over `mesh`'s
    ("data", "fsdp") axes, in process order. Raises ValueError when the rows do not split evenly into whole groups
    of `group_size` per process (group statistics must stay on one host)."""
    if mesh is None:
        raise ValueError("a multi-process run samples with parameters on a mesh with the 'data' and 'fsdp' axes; "
                         "these parameters carry no such mesh.")
    shards = int(np.prod([mesh.shape[a] for a in sharding_lib.BATCH_AXES]))
    if num_rows % shards:
        raise ValueError(f"a sampler call of {num_rows} rows does not split over the {shards} data x fsdp devices "
                         f"of a multi-process run; make it a multiple of {shards}.")
    held: dict[int, set] = {}
    sharding = sharding_lib.batch_sharding(mesh, 1)
    for device, index in sharding.devices_indices_map((num_rows,)).items():
        held.setdefault(device.process_index, set()).update(range(num_rows)[index[0]])
    out = []
    for p in range(jax.process_count()):
        rows = sorted(held.get(p, ()))
        if not rows or rows != list(range(rows[0], rows[-1] + 1)) or rows[0] % group_size or len(rows) % group_size:
            raise ValueError(f"process {p} holds rows {rows[:1]}..{rows[-1:]} of a {num_rows}-row sampler call: "
                             f"each process must hold one contiguous range of whole groups of {group_size} rows; "
                             f"order the mesh so the data and fsdp axes run over processes first.")
        out.append(range(rows[0], rows[-1] + 1))
    if len({len(r) for r in out}) != 1:
        raise ValueError(f"the {num_rows} rows of a sampler call do not split equally over the processes.")
    return out


def global_from_local(local, mesh, num_rows: int):
    """This process's rows (a pytree of host arrays) -> global arrays of `num_rows` rows over ("data", "fsdp")."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding_lib.batch_sharding(mesh, np.ndim(x)), np.asarray(x), (num_rows,) + np.shape(x)[1:]), local)


def local_rows(x, rows: range) -> np.ndarray:
    """Rows `rows` of a global array whose shards hold whole rows (a row sharding, or replicated), read from the
    shards on this process's devices."""
    out = np.empty((len(rows),) + tuple(x.shape[1:]), x.dtype)
    filled = np.zeros(len(rows), bool)
    for shard in x.addressable_shards:
        got = range(x.shape[0])[shard.index[0]]
        lo, hi = max(got.start, rows.start), min(got.stop, rows.stop)
        if lo < hi and shard.data.shape[1:] == x.shape[1:]:
            out[lo - rows.start:hi - rows.start] = np.asarray(shard.data)[lo - got.start:hi - got.start]
            filled[lo - rows.start:hi - rows.start] = True
    if not filled.all():
        raise ValueError(f"rows {rows.start}..{rows.stop} of a {x.shape} array are not whole on this process's "
                         f"devices.")
    return out


def gather_rows(local, per_process: list[list[range]], num_rows: int):
    """Every process's rows (a pytree of host arrays, this process's part; the same structure on every process)
    -> the whole arrays in row order on every process. `per_process[p]`: the row ranges process p contributed, in
    the order its part lists them."""
    gathered = multihost_utils.process_allgather(local, tiled=True)
    order = np.concatenate([np.concatenate([np.arange(r.start, r.stop) for r in ranges]) for ranges in per_process])
    if len(order) != num_rows or len(np.unique(order)) != num_rows:
        raise ValueError(f"the processes' rows do not cover the {num_rows} rows of the round exactly once.")

    def place(x):
        out = np.empty_like(x)
        out[order] = x
        return out

    return jax.tree.map(place, gathered)


def global_from_host(tree, sharding):
    """Host arrays identical on every process -> global arrays with `sharding`; each process materializes only the
    slices its devices hold."""
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: np.asarray(x)[i]),
                        tree)


def to_host(tree):
    """numpy copies of a pytree of arrays; arrays spanning other processes' devices are gathered (a collective)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def replicated_sampler(generate_fn):
    """`generate_fn` for host prompts identical on every process (evaluation, the greedy baseline): rows go in as
    global arrays over the parameters' ("data", "fsdp") axes and the rollout comes back whole on every process.
    The function itself when there is one process."""
    if not active():
        return generate_fn

    def fn(params, prompt_tokens_BxP, prompt_mask_BxP, key, *extra):
        mesh, _ = batch_mesh(params)
        process_rows(mesh, len(prompt_tokens_BxP))  # one sentence when the rows do not split
        sh = sharding_lib.batch_sharding(mesh, 2)
        ids, mask = global_from_host((np.asarray(prompt_tokens_BxP), np.asarray(prompt_mask_BxP)), sh)
        return to_host(generate_fn(params, ids, mask, key, *extra))

    return fn
