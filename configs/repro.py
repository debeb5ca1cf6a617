"""REPRO: process advantage from answer-likelihood progress, on top of PPO or GRPO.

The arg is `<base>` or `<base>,<scale>`, e.g. `configs/repro.py:grpo,tiny` (default `grpo,tiny`).
Launch:
  python experiments/train.py --config=configs/repro.py:grpo,tiny --workdir=runs/repro_grpo_tiny
  python experiments/train.py --config=configs/repro.py:ppo,tiny --workdir=runs/repro_ppo_tiny
alpha = 0.1 from the recipe; k and w stay at the section's defaults (paper defaults not recovered):
--config.repro.k=20 --config.repro.w=0.3. On the arithmetic task a segment is one space-separated step
(`repro.delimiter = " "`), the thinking part ends at "####" and every J~ query ends with "#### <gold answer>"; at
`full` scale (math text) the delimiter is "\\n\\n", thinking ends at "</think>" and the query ends with
"</think>\\n\\n\\boxed{<gold answer>" ([INFERRED]). The method: jaxrl_reason/methods/repro.py.
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config

BASES = ("ppo", "grpo")


def get_config(arg: str = "grpo,tiny"):
    base, _, scale = (arg or "grpo,tiny").partition(",")
    if base not in BASES:
        raise ValueError(f"REPRO runs on one of {BASES}, got {base!r}.")
    c = get_base_config(scale or "tiny")
    apply_recipe(c, base)
    if base == "grpo" and c.scale == "tiny":
        c.loss.kl_coef = 0.0  # as configs/grpo.py at tiny scale
    apply_recipe(c, "repro")
    # Query = prompt + reasoning prefix + answer_prefix + gold answer; thinking ends at think_end ([INFERRED]).
    c.repro.answer_prefix = "#### "
    c.repro.think_end = "####"
    if c.scale == "full":  # R1-style math text
        c.repro.delimiter = "\n\n"
        c.repro.answer_prefix = "</think>\n\n\\boxed{"
        c.repro.think_end = "</think>"
    c.algorithm = "repro"
    return c
