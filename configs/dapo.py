"""DAPO: clip-higher 0.2/0.28, dual clip 10, token-mean, zero-variance dynamic sampling,
signed reward with the soft overlong penalty, no KL.

Launch:
  python experiments/train.py --config=configs/dapo.py:tiny --workdir=runs/dapo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "dapo")
    return c
