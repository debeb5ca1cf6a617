"""KL-Cov: the unclipped policy gradient, with a |log ratio| penalty (coefficient 1) on the 0.02% of tokens of
largest advantage-logp covariance (entropy control); GRPO advantages, token-mean, no KL.

Launch:
  python experiments/train.py --config=configs/kl_cov.py:tiny --workdir=runs/kl_cov_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "kl_cov")
    return c
