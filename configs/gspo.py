"""GSPO: sequence-level length-normalized ratio, clip 3e-4/4e-4, 4 mini-batches.

Launch:
  python experiments/train.py --config=configs/gspo.py:tiny --workdir=runs/gspo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "gspo")
    return c
