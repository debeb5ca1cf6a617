"""DPPO-Binary-KL: as DPPO-TV with the binary KL between the old and new probability of the token, bound 0.05
(verl's DPPO example).

Launch:
  python experiments/train.py --config=configs/dppo_kl.py:tiny --workdir=runs/dppo_kl_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "dppo_kl")
    return c
