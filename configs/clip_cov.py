"""Clip-Cov: PPO clip 0.2, and the gradient of a random 0.02% of the tokens whose advantage-logp covariance lies
in (1, 5) is cut (entropy control); GRPO advantages, token-mean, no KL.

Launch:
  python experiments/train.py --config=configs/clip_cov.py:tiny --workdir=runs/clip_cov_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "clip_cov")
    return c
