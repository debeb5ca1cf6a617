"""DPPO-Binary-TV: tokens whose probability moved by more than 0.15 in the advantage's direction are masked
(a total-variation trust region instead of the ratio clip); importance weight truncated at 20; GRPO
advantages, token-mean, no KL (verl's DPPO example).

Launch:
  python experiments/train.py --config=configs/dppo_tv.py:tiny --workdir=runs/dppo_tv_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "dppo_tv")
    return c
