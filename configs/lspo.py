"""LSPO: length-aware dynamic sampling on top of GRPO, DAPO or GSPO.

The arg is `<base>` or `<base>,<scale>`, e.g. `configs/lspo.py:dapo,tiny` (default `dapo,tiny`).
Launch:
  python experiments/train.py --config=configs/lspo.py:dapo,tiny --workdir=runs/lspo_dapo_tiny
Thresholds: (0.30, 0.60, 0.90) from the released script; the paper summary's (0.30, 0.65, 0.95) via
--config.lspo.high=0.65 --config.lspo.max=0.95. The method: jaxrl_reason/methods/lspo.py.
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config

BASES = ("grpo", "dapo", "gspo")


def get_config(arg: str = "dapo,tiny"):
    base, _, scale = (arg or "dapo,tiny").partition(",")
    if base not in BASES:
        raise ValueError(f"LSPO runs on one of {BASES}, got {base!r}.")
    c = get_base_config(scale or "tiny")
    apply_recipe(c, base)
    apply_recipe(c, "lspo")
    c.algorithm = f"lspo_{base}"
    return c
