"""One process of the multi-process RL-loop test (`tests/test_multiprocess_loop.py`).

Launched as a script, never imported by pytest. Runs the real loop, `train/loop.run(config, workdir)`, as
`experiments/train.py --multihost` does on every host, on `rl_testing.tiny_config("grpo")` (random 1-layer model,
4 prompts x 4 samples, 24 new tokens, 2 mini-batches) with `rl_testing.digit_scorer` as the reward, the
zero-variance group filter (so dynamic-sampling refills are decided from rows sampled on both processes), a
checkpoint every iteration and the Hugging Face export, on a (data=1, fsdp=4, tensor=1) mesh: with two processes of
two devices each, every weight matrix is split over both processes (the norm scales are replicated).

    python tests/multiprocess_loop_worker.py --workdir=/tmp/run --num_steps=2 --num_processes=2 --process_id=0 \
        --coordinator=127.0.0.1:PORT --local_devices=2

With `--num_processes=1` no `jax.distributed` runtime is started (the one-process reference on `--local_devices`
devices, same mesh). With `--hang_after_checkpoint=K` the loop's save of checkpoint K, once finalized on disk,
writes the marker file `<workdir>/hung_after_checkpoint.process<process_id>` and then blocks forever, so the test
can SIGKILL the process at a known point: checkpoint K complete, checkpoint K+1 not begun. A resumed run never saves
K again (it starts after K), so the same command resumes and finishes. Exit codes as `tests/multiprocess_worker.py`
(77: this platform cannot run CPU multi-process collectives).
"""
from __future__ import annotations

import argparse
import os
import time

from multiprocess_worker import setup_jax


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_steps", type=int, default=2)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--coordinator", default="", help="127.0.0.1:PORT of process 0 (multi-process only).")
    p.add_argument("--local_devices", type=int, default=4, help="Fake CPU devices in this process.")
    p.add_argument("--init_timeout_s", type=int, default=60)
    p.add_argument("--hang_after_checkpoint", type=int, default=0,
                   help="Block forever once checkpoint K is on disk (0: never); see the module docstring.")
    args = p.parse_args(argv)
    if args.num_processes > 1 and not args.coordinator.startswith("127.0.0.1:"):
        p.error("multi-process runs need --coordinator=127.0.0.1:PORT (loopback only).")
    return args


def config(num_steps: int):
    from rl_testing import tiny_config

    return tiny_config("grpo", train__num_steps=num_steps, train__checkpoint_every=1, train__export_hf=True,
                       filter__kind="zero_variance", mesh__data=1, mesh__fsdp=4, mesh__tensor=1)


def hang_after_checkpoint(step: int, marker: str) -> None:
    """Makes every `Checkpointer.save` that starts checkpoint `step` wait for it to finalize (`wait` raises
    otherwise), write `marker`, and block: the loop never reaches the next iteration."""
    from jaxrl_reason.train import checkpoint

    save = checkpoint.Checkpointer.save

    def save_then_hang(self, at: int, state, meta: dict, force: bool = False) -> bool:
        started = save(self, at, state, meta, force=force)
        if started and at == step:
            self.wait()
            assert step in self.all_steps(), f"checkpoint {step} is not on disk after its save finished"
            with open(marker, "w") as f:
                f.write(f"checkpoint {step} on disk\n")
            print(f"WORKER_HANGING after checkpoint {step}", flush=True)
            while True:
                time.sleep(60)
        return started

    checkpoint.Checkpointer.save = save_then_hang


def main(args) -> None:
    jax = setup_jax(args)
    from rl_testing import digit_scorer

    from jaxrl_reason.train import build, loop

    build.arithmetic_scorer = digit_scorer  # what the in-process loop tests monkeypatch
    if args.hang_after_checkpoint > 0:
        hang_after_checkpoint(args.hang_after_checkpoint,
                              os.path.join(args.workdir, f"hung_after_checkpoint.process{args.process_id}"))
    out = loop.run(config(args.num_steps), args.workdir)
    print(f"WORKER_DONE process {jax.process_index()}/{jax.process_count()} iterations={out['iterations']}",
          flush=True)
    if args.num_processes > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("multiprocess_loop_worker done")
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(parse_args())
