"""GRPO (DeepSeekMath): group z-scored outcome advantage, PPO clip, seq-mean-token-mean.

Launch:
  python experiments/train.py --config=configs/grpo.py:tiny --workdir=runs/grpo_tiny
  python experiments/train.py --config=configs/grpo.py:full --config.model.init=hf:/models/Qwen2.5-1.5B \
      --config.task.name=jsonl --config.task.train_path=train.jsonl --config.task.eval_path=test.jsonl

The `tiny` arg is the README's main job: the shipped supervised warm start (0.8M parameters, arithmetic task,
~63% greedy held-out accuracy, still improving under SFT), 60 iterations of 16 prompts x 8 samples, lr 1e-4,
clip 0.2, no KL (at this size lr 3e-4 collapses the policy); ~7 s per iteration on a 2-core CPU. Measured results
and the continued-SFT control: README, "Main-job results".
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "grpo")
    if c.scale == "tiny":
        c.loss.kl_coef = 0.0
    return c
