"""HAPO: DAPO + entropy-adaptive temperature (tau 0.05), token-level group-average
advantage, differential advantage redistribution and asymmetric adaptive clipping.

Launch:
  python experiments/train.py --config=configs/hapo.py:tiny --workdir=runs/hapo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "hapo")
    return c
