"""GRPO with the token-sum aggregation: the loss is the sum over every valid token (no normalization, Megatron's
per-token loss). Its scale grows with the batch's token count; Adam absorbs a constant scale, and
`optim.grad_clip` then clips almost every step.

Launch:
  python experiments/train.py --config=configs/grpo_token_sum.py:tiny --workdir=runs/grpo_token_sum_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "grpo_token_sum")
    return c
