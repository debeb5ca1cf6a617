"""RL training entry point (thin: parse the config, run the loop).

  python experiments/train.py --config=configs/grpo.py:tiny --workdir=runs/grpo_tiny [--config.optim.lr=1e-5]

Multi-host: start one process per host with the same command; `--multihost` calls `jax.distributed.initialize()`
(coordinator, process count and id come from the environment of TPU pods / SLURM, or from the
`--coordinator_address`, `--num_processes`, `--process_id` flags).

A user error (bad config key, missing file, empty data, a workdir in use) ends with one `error: ...` sentence;
JAXRL_TRACEBACK=1 shows the traceback.
"""
import os

from absl import flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the exported policy.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without a scheduler).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    if _MULTIHOST.value:
        kwargs = {k: v for k, v in (("coordinator_address", _COORD.value), ("num_processes", _NPROC.value),
                                    ("process_id", _PID.value)) if v is not None}
        jax.distributed.initialize(**kwargs)
    from jaxrl_reason.train.loop import run

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", f"{config.algorithm}_{config.scale}")
    run(config, workdir)


if __name__ == "__main__":
    from experiments._cli import run_app

    flags.mark_flag_as_required("config")
    run_app(main)
