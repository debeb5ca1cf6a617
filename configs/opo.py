"""OPO: exact on-policy updates with the optimal baseline, the length-weighted group mean reward;
PPO loss, token-mean, no KL. OPO's exact on-policy training is the default here (one mini-batch, one epoch).

Launch:
  python experiments/train.py --config=configs/opo.py:tiny --workdir=runs/opo_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "opo")
    return c
