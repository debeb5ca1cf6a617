"""Dr.GRPO: group-mean advantage without std, constant-denominator token sum.

Launch:
  python experiments/train.py --config=configs/dr_grpo.py:tiny --workdir=runs/dr_grpo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "dr_grpo")
    return c
