"""Supervised warm start of the tiny policy on the arithmetic task (the checkpoint the RL configs start from).

Launch (rebuilds `checkpoints/arith_tiny_sft` bit for bit on the pinned stack):
  python experiments/sft.py --config=configs/sft.py:tiny --out=checkpoints/arith_tiny_sft

`num_problems` caps the SFT data so the model plateaus before RL (calibration.md lesson 3).
"""
from ml_collections import config_dict

from configs.base import get_base_config


def get_config(arg: str = "tiny") -> config_dict.ConfigDict:
    c = get_base_config(arg)
    c.algorithm = "sft"
    c.model.init = "random"
    c.sft = config_dict.ConfigDict()
    c.sft.num_problems = 8000
    c.sft.steps = {"tiny": 1500, "small": 4000, "full": 2000}[c.scale]
    c.sft.batch_size = 32
    c.sft.lr = 1e-3 if c.scale == "tiny" else 3e-4
    c.sft.warmup_steps = 50
    c.sft.schedule = "cosine"  # constant | cosine (to 0 at `steps`); autoregressive SFT only
    c.sft.weight_decay = 0.01  # autoregressive SFT only
    c.sft.micro_batches = 1
    c.sft.time_budget_s = 0.0
    c.sft.eval_problems = 500
    return c
