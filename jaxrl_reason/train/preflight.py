"""Memory of a compiled program against the device's memory: the loop's preflight and the compile check's report.

XLA's memory analysis of a compiled executable gives, per device, the bytes of its arguments, outputs (less what
aliases a donated argument) and temporaries. The preflight compiles the update step ahead of time on the real
state and batch shapes, adds what stays resident next to it (`resident_bytes`, e.g. the frozen reference params)
and stops the run with one sentence when that exceeds the device's memory, before any rollout is sampled.
"""
from __future__ import annotations

import dataclasses

import numpy as np

GIB = float(2**30)

# What lowers the update step's memory, named in the sentence a run stops with.
KNOBS = ("optim.micro_batches (more, smaller micro-batches), mesh.fsdp (shard params and optimizer state), "
         "model.remat (recompute activations), or shorter rollout lengths (rollout.max_prompt_len, "
         "rollout.max_new_tokens)")


class InsufficientMemory(ValueError):
    """The compiled update step needs more memory per device than the device has."""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled program (XLA's memory analysis)."""

    argument: int
    output: int
    alias: int
    temp: int
    code: int = 0
    xla_peak: int = 0  # XLA's own peak estimate where the backend reports one (0: none)

    @property
    def peak(self) -> int:
        """Live at once: arguments + outputs that do not reuse a donated argument + temporaries + code."""
        own = self.argument + self.output - self.alias + self.temp + self.code
        return max(own, self.xla_peak)


def memory_report(compiled) -> MemoryReport:
    """MemoryReport of a `jax.stages.Compiled` (its `memory_analysis()`)."""
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError("this backend reports no memory analysis for compiled programs.")
    return MemoryReport(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                        alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
                        code=int(m.generated_code_size_in_bytes),
                        xla_peak=int(getattr(m, "peak_memory_in_bytes", 0) or 0))


def device_capacity(device) -> int | None:
    """Bytes the device can hold (`memory_stats()['bytes_limit']`), None where the backend does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - devices without an allocator (CPU, AOT topologies) raise or return None
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs (their shard shape where sharded)."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(x.shape)
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            shape = tuple(sharding.shard_shape(shape))
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def does_not_fit_sentence(what: str, need: int, capacity: int) -> str:
    return (f"{what} needs {need / GIB:.2f} GiB per device but the device has {capacity / GIB:.2f} GiB; lower it "
            f"with {KNOBS}.")


def check_fits(report: MemoryReport, capacity: int | None, what: str = "the update step",
               resident_bytes: int = 0) -> None:
    """Raises InsufficientMemory with one sentence when `report.peak + resident_bytes` exceeds `capacity`.

    `capacity` None (a backend that does not report it, such as the CPU) skips the check.
    """
    if capacity is None:
        return
    need = report.peak + resident_bytes
    if need > capacity:
        raise InsufficientMemory(does_not_fit_sentence(what, need, capacity))
