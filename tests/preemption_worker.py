"""One training process of the preemption end-to-end test (`tests/test_preemption.py`; README fault table).

Launched as a script, never imported by pytest. Runs the real RL loop, `train/loop.run(config, workdir)`, exactly as
`experiments/train.py` does, on `rl_testing.tiny_config("grpo")` (random 1-layer model, 4 prompts x 4 samples,
24 new tokens) with `rl_testing.digit_scorer` as the arithmetic reward, so a random policy earns non-zero
advantages and its parameters really move. When the loop finishes, the policy parameters of its last checkpoint
are written to `--out` (.npz, leaf order of `jax.tree.leaves`); finished or preempted, `WORKER_DONE` is printed.

    python tests/preemption_worker.py --workdir=/tmp/run --num_steps=6 --checkpoint_every=1 --out=/tmp/p.npz

`--slow_finalize_s=S` makes every orbax commit (the rename of `<step>.orbax-checkpoint-tmp` to `<step>`, i.e. the
last act of a save, after all files are written) wait S seconds first, as a slow file system would. The test uses it
to make the window in which a save is in progress wide enough to be observed from outside and hit with SIGKILL;
nothing else changes (the same files are written, the same commit follows).
"""
from __future__ import annotations

import argparse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="Output .npz of the final policy parameters.")
    p.add_argument("--num_steps", type=int, default=6)
    p.add_argument("--checkpoint_every", type=int, default=1)
    p.add_argument("--slow_finalize_s", type=float, default=0.0, help="Sleep before each orbax commit.")
    return p.parse_args(argv)


def slow_down_commits(seconds: float) -> None:
    """Delays orbax's finalize (commit) of every checkpoint by `seconds` (both local and GCS-style commits)."""
    import asyncio

    from orbax.checkpoint._src.path import atomicity

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        real = cls.finalize

        async def finalize(self, *args, _real=real, **kwargs):
            await asyncio.sleep(seconds)
            return await _real(self, *args, **kwargs)

        cls.finalize = finalize


def main(args) -> None:
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    from rl_testing import digit_scorer, final_policy_params, tiny_config

    from jaxrl_reason.train import build, loop

    build.arithmetic_scorer = digit_scorer  # what the in-process loop tests monkeypatch
    if args.slow_finalize_s > 0:
        slow_down_commits(args.slow_finalize_s)
    config = tiny_config("grpo", train__num_steps=args.num_steps, train__checkpoint_every=args.checkpoint_every)
    out = loop.run(config, args.workdir)
    if not out.get("preempted"):  # a preempted run has no final evaluation or parameters
        np.savez(args.out, *final_policy_params(args.workdir))
    print(f"WORKER_DONE preempted={bool(out.get('preempted'))}", flush=True)


if __name__ == "__main__":
    main(parse_args())
