"""DA-DLER: DLER with a per-prompt truncation budget from the group pass rate
(one threshold 0.5: easy prompts get half the budget; `dler.thresholds`, `dler.budgets`). [INFERRED details are
switches in core/length.py] The method: jaxrl_reason/methods/dler.py.

Launch:
  python experiments/train.py --config=configs/da_dler.py:tiny --workdir=runs/da_dler_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "da_dler")
    if c.scale == "tiny":
        c.rollout.max_new_tokens = 64
    return c
