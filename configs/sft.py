"""Supervised warm start of the tiny policy on the arithmetic task (the checkpoint the RL configs start from).

Launch (rebuilds `checkpoints/arith_tiny_sft` bit for bit on the pinned stack, ~20 min on a 2-core CPU):
  python experiments/sft.py --config=configs/sft.py:tiny --out=checkpoints/arith_tiny_sft

Continued-SFT control of the README's main job (same recipe and wall time as the RL it is compared with, new
problems via another seed):
  python experiments/sft.py --config=configs/sft.py:tiny --config.model.init=sft --config.seed=1 \
      --config.sft.time_budget_s=<RL seconds> --out=runs/sft_control

The recipe: fresh problems (a shuffled pool of `num_problems`, of which
`steps * batch_size` are used: no second epoch; small 1-digit levels still
repeat problems by chance), AdamW at a constant lr after warm-up, no weight decay.
It stops mid-way (1200 steps: ~63% greedy held-out accuracy, still rising) because RL from such a point improves
(README). A warm start on 8000 problems seen ~6 times, with cosine decay to lr 0 and weight decay 0.01, reaches
33% greedy, and every RL method LOWERS its accuracy: a memorizing, annealed starting point.

The plateaued start (`checkpoints/arith_tiny_sft_plateau`, its build.log beside it; ~85 min on a 2-core CPU), from
which an RL gain cannot be matched by more SFT, continues the shipped one on fresh problems until validation greedy
accuracy stops rising:
  python experiments/sft.py --config=configs/sft.py:plateau --out=checkpoints/arith_tiny_sft_plateau
It stopped at 4500 steps (validation 72% at 500 steps, 87% at 1500, then 85-93% at constant lr; best 92.6% at 3500,
no 1-point gain in the next 1000 steps): held-out greedy 90.6%, pass@1 85.5% (the shipped start: 63.0% / 45.9%).
"""
from ml_collections import config_dict

from configs.base import get_base_config


def get_config(arg: str = "tiny") -> config_dict.ConfigDict:
    c = get_base_config("tiny" if arg == "plateau" else arg)
    c.algorithm = "sft"
    c.model.init = "random"
    c.sft = config_dict.ConfigDict()
    c.sft.num_problems = 51200
    c.sft.steps = {"tiny": 1200, "small": 4000, "full": 2000}[c.scale]
    c.sft.batch_size = 32
    c.sft.lr = 1e-3 if c.scale == "tiny" else 3e-4
    c.sft.warmup_steps = 100
    c.sft.schedule = "constant"  # constant | cosine (to 0 at `steps`); autoregressive SFT only
    c.sft.weight_decay = 0.0  # autoregressive SFT only
    c.sft.micro_batches = 1
    c.sft.time_budget_s = 0.0
    c.sft.eval_problems = 500
    # Early stop at a plateau (`train/sft.PlateauCheck`): every `plateau_every` steps (0 = off), greedy accuracy on
    # `val_problems` validation problems; stop after `plateau_patience` checks in a row without a gain of
    # `plateau_min_delta` over the best.
    c.sft.plateau_every = 0
    c.sft.plateau_patience = 2
    c.sft.plateau_min_delta = 0.01
    c.sft.val_problems = 1000
    c.sft.response_key = ""  # own data (task.name=jsonl): the response column; "": data/sft_data.py's fields
    if arg == "plateau":
        _plateau(c)
    return c


def _plateau(c: config_dict.ConfigDict) -> None:
    """The plateaued warm start (`checkpoints/arith_tiny_sft_plateau`): the shipped start trained on
    until validation greedy accuracy stops rising, on fresh problems (another seed's pool, one pass)."""
    c.model.init, c.model.sft_dir = "sft", "checkpoints/arith_tiny_sft"
    c.seed = 2
    c.sft.steps = 8000
    c.sft.num_problems = c.sft.steps * c.sft.batch_size
    c.sft.plateau_every = 500
