"""GRPO pass@k: only the best response of each group gets an advantage, (r_max - r_second) / (std + eps);
the rest of the GRPO recipe unchanged.

Launch:
  python experiments/train.py --config=configs/grpo_passk.py:tiny --workdir=runs/grpo_passk_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "grpo_passk")
    return c
