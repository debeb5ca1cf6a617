"""What a run prints: a start-up summary, one line per `train.log_every` iterations, and learning-signal warnings.

`startup_summary(config, task, params, mesh)` names the model (source, parameter count, layers, dtype), the data
(task, training and held-out sizes), the method (algorithm, loss, estimator, filter, batch) and the mesh, with a
rough memory estimate of the trained state. `IterationLog.iteration(step, metrics)` prints
`iter 3/60  reward 0.375  length 21.1  kept 16/16 groups (1 round)  1.9 s/it  ETA 1m54s` every
`train.log_every` iterations when stdout is not a terminal (a terminal shows the progress bar instead), and
always warns when dynamic sampling kept no group or every reward of the batch was equal (zero advantages: the
update learns nothing). With `train.wandb_project` set, the same metrics also go to Weights & Biases
(imported only then; a missing package is one sentence at start-up).
"""
from __future__ import annotations

import sys
import time

import jax
import numpy as np


def _count(tree) -> tuple[int, int]:
    leaves = jax.tree.leaves(tree)
    return sum(int(np.prod(x.shape)) for x in leaves), sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000.0


def summary_lines(config, task, params: dict, mesh) -> list[str]:
    """The start-up summary as lines (see the module docstring)."""
    m, r, t = config.model, config.rollout, config.task
    n_policy, bytes_policy = _count(params["policy"])
    n_all, bytes_all = _count(params)
    source = {"sft": f"sft:{m.sft_dir}", "random": "random init"}.get(m.init, m.init)
    data = t.name if t.name == "arithmetic" else (t.reasoning_gym_task if t.name == "reasoning_gym" else t.train_path)
    # trained state: params + gradients + two Adam moments (float32 moments for every trainable parameter)
    state_bytes = bytes_all * 2 + n_all * 8
    return [
        f"model: {source}  {_human(n_policy)} parameters, {m.param_dtype}",
        f"data: {t.name} {data}  train {len(task.train)} prompts, held-out {len(task.heldout)}",
        f"method: {config.algorithm}  loss {config.loss.mode}/{config.loss.agg}  advantage "
        f"{config.advantage.estimator}  filter {config.filter.kind}  batch {r.prompts_per_step} prompts x "
        f"{r.group_size} samples, {r.max_prompt_len}+{r.max_new_tokens} tokens",
        f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices  "
        f"trained state ~{_human(state_bytes, 'B')} (params, grads, Adam moments)",
    ]


def startup_summary(config, task, params: dict, mesh, file=None) -> None:
    if jax.process_index() == 0:
        print("\n".join(summary_lines(config, task, params, mesh)), file=file or sys.stdout, flush=True)


def _duration(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def require_wandb():
    """The wandb module, or one sentence saying how to get it (it is not part of the install)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("train.wandb_project is set but wandb is not installed: pip install wandb (or leave "
                         "train.wandb_project empty; metrics.jsonl and TensorBoard are always written).") from None
    return wandb


def start_wandb(config, project: str):
    """A Weights & Biases run of `project` with the resolved config (resumed under the same run name)."""
    import json

    wandb = require_wandb()
    return wandb.init(project=project, config=json.loads(config.to_json_best_effort()), resume="allow")


class IterationLog:
    """Per-iteration console lines and warnings (module docstring). `lines` / `enabled` are overridable in tests."""

    def __init__(self, config, *, lines: bool | None = None, file=None, clock=time.time):
        self.total, self.every = config.train.num_steps, max(int(config.train.log_every), 1)
        self.batch_groups = config.rollout.prompts_per_step
        self.file, self.clock = file or sys.stdout, clock
        self.lines = (not self.file.isatty()) if lines is None else lines
        self.start, self.first_step = clock(), None
        self.quiet = jax.process_index() != 0
        project = config.train.get("wandb_project", "")
        self.wandb = None if self.quiet or not project else start_wandb(config, project)

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.file, flush=True)

    def warnings(self, step: int, m: dict) -> list[str]:
        out = []
        if m.get("rollout/kept_groups", 1) == 0:
            out.append(f"warning: iteration {step}: dynamic sampling kept 0 of {self.batch_groups} groups after "
                       f"{m.get('rollout/rounds', 0)} rounds; this update learned nothing (every group had equal "
                       f"rewards: too hard or too easy a start?).")
        elif m.get("reward/std", 1.0) == 0.0:
            out.append(f"warning: iteration {step}: every reward of the batch equals "
                       f"{m.get('reward/accuracy', 0.0):.3f}; the advantages are zero and the update learns nothing.")
        return out

    def iteration(self, step: int, m: dict) -> None:
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=step)
        for w in self.warnings(step, m):
            self._print(w)
        if self.first_step is None:
            self.first_step = step - 1
        if not self.lines or (step % self.every and step != self.total):
            return
        done = step - self.first_step
        per_it = (self.clock() - self.start) / max(done, 1)
        rounds = int(m.get("rollout/rounds", 1))
        self._print(f"iter {step}/{self.total}  reward {m.get('reward/mean', float('nan')):.3f}  length "
                    f"{m.get('response/length_mean', float('nan')):.1f}  kept {int(m.get('rollout/kept_groups', 0))}/"
                    f"{self.batch_groups} groups ({rounds} round{'s' if rounds != 1 else ''})  {per_it:.1f} s/it  "
                    f"ETA {_duration(per_it * (self.total - step))}")
