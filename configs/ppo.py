"""PPO with GAE and a critic: value model initialized from the policy, zero-init head.

Launch:
  python experiments/train.py --config=configs/ppo.py:tiny --workdir=runs/ppo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "ppo")
    return c
