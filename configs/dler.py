"""DLER: truncation penalty at L_T = max_new_tokens, group-mean + batch-whitened advantage,
clip-higher, dual clip 10, zero-variance filter on the pre-penalty score, k2 KL loss 5e-4. The method and its
`dler` section: jaxrl_reason/methods/dler.py; its math: jaxrl_reason/core/length.py.

The tiny arg sets the truncation budget below the SFT policy's typical length with re-checks (64 tokens), so
there is overthinking to remove.

Launch:
  python experiments/train.py --config=configs/dler.py:tiny --workdir=runs/dler_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "dler")
    if c.scale == "tiny":
        c.rollout.max_new_tokens = 64
    return c
