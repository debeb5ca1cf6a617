"""SAPO: a soft sigmoid gate f(r) = sigmoid(tau*(r-1))*4/tau replaces the clip (tau 1.0 for A > 0, 1.05
otherwise), GRPO advantages, seq-mean-token-mean, no KL (verl's SAPO example).

Launch:
  python experiments/train.py --config=configs/sapo.py:tiny --workdir=runs/sapo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "sapo")
    return c
