"""GPG: the plain policy gradient -A*logp (no ratio, no clip) with GPG's group advantage rescaled by
N / #(non-zero rewards); token-mean, no KL (verl's GPG example).

Launch:
  python experiments/train.py --config=configs/gpg.py:tiny --workdir=runs/gpg_tiny
"""
from jaxrl_reason.algorithms import apply_recipe

from configs.base import get_base_config


def get_config(arg: str = "tiny"):
    c = get_base_config(arg)
    apply_recipe(c, "gpg")
    return c
