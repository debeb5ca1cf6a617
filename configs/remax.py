"""ReMax: A = R - R(greedy response to the same prompt); PPO loss, token-mean, no KL.

`rollout.greedy_baseline` (set by the recipe) makes each round also decode one greedy response per prompt and score
it; `jaxrl_reason.core.advantages.remax_advantages(reward_N, greedy_reward_N, mask_NxT)` is the estimator.

Launch:
  python experiments/train.py --config=configs/remax.py:tiny --workdir=runs/remax_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "remax")
    return c
