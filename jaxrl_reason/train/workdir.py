"""A run's hold on its workdir: one run at a time, the config it was started with, a batch that fits the mesh.

`claim(config, workdir)` (a context manager, entered by `train/loop.run` before anything is built):
  lock     `<workdir>/run.lock` is held with `fcntl.flock` for the run's lifetime; a second run into the same
           workdir fails with one sentence naming the holder's pid and host. The kernel drops the lock when its
           process dies, so the lock of a killed run is taken over without any clean-up. Only JAX process 0
           locks (the processes of one multi-host run share the workdir).
  config   `<workdir>/config.json` holds the resolved config. When the workdir has checkpoints, the method and
           model keys (`IDENTITY_KEYS`) of the saved config must equal the new ones, else the run refuses
           (`train.force_resume=True` overrides); other changed keys are listed in one warning.
  batch    every micro-batch must split evenly over the mesh's data x fsdp devices (the update shards its rows
           over them); a batch that does not is an error at start-up, not a silently replicated batch.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket

import jax

IDENTITY_KEYS = ("algorithm", "loss.mode", "advantage.estimator", "filter.kind", "model.init", "model.sft_dir",
                 "model.attention", "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
                 "model.intermediate_size", "model.param_dtype")
LOCK_NAME, CONFIG_NAME = "run.lock", "config.json"


def check_batch_split(config) -> None:
    """One sentence when a micro-batch's rows do not split over the data x fsdp devices."""
    m, o, r = config.mesh, config.optim, config.rollout
    data = m.data if m.data > 0 else jax.device_count() // max(m.fsdp * m.tensor, 1)
    shards = data * m.fsdp
    rows = r.prompts_per_step * r.group_size // max(o.mini_batches, 1) // max(o.micro_batches, 1)
    if shards > 0 and rows % shards:
        raise ValueError(f"a micro-batch of {rows} rows (rollout.prompts_per_step x group_size / optim.mini_batches "
                         f"/ micro_batches) does not split over the {shards} data x fsdp devices; make it a "
                         f"multiple of {shards}.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def has_checkpoints(workdir: str) -> bool:
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def compare_saved_config(saved: dict, new: dict, force: bool) -> list[str]:
    """Raises for a changed method/model (unless `force`); returns the other changed keys."""
    a, b = _flat(saved), _flat(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    identity = [k for k in changed if k in IDENTITY_KEYS and not (k == "model.sft_dir" and b.get("model.init") != "sft")]
    if identity and not force:
        diffs = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in identity)
        raise ValueError(f"this workdir holds checkpoints of another method or model ({diffs}); use a new --workdir, "
                         f"or set --config.train.force_resume=True to continue it anyway.")
    return changed


def _lock(workdir: str):
    """The open, locked lock file; one sentence if another live process holds it."""
    import fcntl

    f = open(os.path.join(workdir, LOCK_NAME), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"workdir {workdir!r} is in use by another run ({holder}); wait for it to finish or use "
                         f"another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


@contextlib.contextmanager
def claim(config, workdir: str):
    """Lock the workdir, check and save the config, check the batch split (module docstring)."""
    check_batch_split(config)
    if config.train.get("wandb_project", ""):
        from jaxrl_reason.train.console import require_wandb

        require_wandb()
    os.makedirs(workdir, exist_ok=True)
    lock = _lock(workdir) if jax.process_index() == 0 and os.name == "posix" else None
    try:
        new, path = config_dict(config), os.path.join(workdir, CONFIG_NAME)
        if os.path.isfile(path) and has_checkpoints(workdir):
            with open(path) as f:
                saved = json.load(f)
            force = bool(config.train.get("force_resume", False))
            changed = compare_saved_config(saved, new, force)
            if changed:
                logging.warning("resuming %s with changed config keys: %s.", workdir, ", ".join(changed))
        if jax.process_index() == 0:
            with open(path + ".tmp", "w") as f:
                json.dump(new, f, indent=2, sort_keys=True)
            os.replace(path + ".tmp", path)
        yield
    finally:
        if lock is not None:
            lock.close()
