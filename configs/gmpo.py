"""GMPO: the geometric mean of the token ratios of each response, clipped in log space to (-0.4, 0.4), times
the sequence advantage; GRPO advantages, no KL (verl's GMPO example).

Launch:
  python experiments/train.py --config=configs/gmpo.py:tiny --workdir=runs/gmpo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "gmpo")
    return c
