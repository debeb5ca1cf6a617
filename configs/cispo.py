"""CISPO (MiniMax-M1): the importance weight is clipped and stop-gradient, every token keeps its gradient
(-sg(clip(r, 1-10, 1+0.2)) * A * logp), GRPO advantages, token-mean, no KL (verl's CISPO example).

Launch:
  python experiments/train.py --config=configs/cispo.py:tiny --workdir=runs/cispo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "cispo")
    return c
