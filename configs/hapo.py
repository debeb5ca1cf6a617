"""HAPO: DAPO + entropy-adaptive temperature (tau 0.05), token-level group-average
advantage, differential advantage redistribution and asymmetric adaptive clipping. The method and its `hapo`
section (each piece a switch): jaxrl_reason/methods/hapo.py; its math: jaxrl_reason/core/hapo.py.

Launch:
  python experiments/train.py --config=configs/hapo.py:tiny --workdir=runs/hapo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "hapo")
    return c
