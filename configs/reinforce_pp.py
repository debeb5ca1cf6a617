"""REINFORCE++: k1 KL in the token reward, return-to-go, batch whitening, PPO clip.

Launch:
  python experiments/train.py --config=configs/reinforce_pp.py:tiny --workdir=runs/reinforce_pp_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "reinforce_pp")
    return c
