"""Optax chains used by RL and SFT: global-norm clipping, AdamW, a warm-up + constant/cosine schedule.

The defaults of the method recipes (AdamW, grad clip 1.0, 10 warm-up steps, weight decay 0.01–0.1, as the
papers publish them) are set in `configs/`; this module only assembles them.
"""
from __future__ import annotations

import optax


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int, kind: str = "constant") -> optax.Schedule:
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then constant or cosine decay to 0 at `total_steps`."""
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}.")
    if kind not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule {kind!r}; use 'constant' or 'cosine'.")
    warmup_steps = max(int(warmup_steps), 0)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), after], [warmup_steps])


def make_optimizer(
    lr: float,
    *,
    warmup_steps: int = 0,
    total_steps: int = 1,
    schedule: str = "constant",
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """`clip_by_global_norm(grad_clip)` (if set) followed by AdamW with the schedule above."""
    sched = learning_rate_schedule(lr, warmup_steps, total_steps, schedule)
    parts = []
    if grad_clip is not None and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
