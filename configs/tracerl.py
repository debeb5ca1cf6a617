"""TraceRL for masked-diffusion policies: block attention (TraDo/SDAR) or full attention (LLaDA).

Arg: `<kind>[,value][,<scale>][,onestep][,lr=<float>]` with kind `block` | `full` (attention), `value` = the
diffusion value model with step-level GAE, scale `tiny` (default) | `small` | `paper` (the papers' scale: set
`model.init=hf:<dir>`, a jsonl task and a mesh), `onestep` = the d1 one-step log-prob estimator instead of the
decoding trajectory (the "TraceRL vs one-step" comparison is this one word), `lr=` the policy lr instead of the
scale's (the value lr stays 5 x the policy lr; `--config.optim.lr` alone would not move it).

Launch (the tiny runs start from the diffusion SFT checkpoints, see configs/sft_diffusion.py):
  python experiments/sft.py --config=configs/sft_diffusion.py:block,tiny --out=checkpoints/arith_tiny_sft_block
  python experiments/train.py --config=configs/tracerl.py:block --workdir=runs/tracerl_block_tiny
  python experiments/train.py --config=configs/tracerl.py:block,value --workdir=runs/tracerl_block_value_tiny
  python experiments/train.py --config=configs/tracerl.py:block,onestep --workdir=runs/onestep_block_tiny
  python experiments/sft.py --config=configs/sft_diffusion.py:full,tiny --out=checkpoints/arith_tiny_sft_full
  python experiments/train.py --config=configs/tracerl.py:full --workdir=runs/tracerl_full_tiny

The method's fields are `jaxrl_reason/methods/tracerl.py`'s RECIPE (the official rl_trado.yaml / rl_llada.yaml
values: clip loss.eps_low = loss.eps_high = 0.2, z-score with the population std (advantage.std_ddof 0),
accuracy-band filter (0.2, 0.8), gamma = lambda = 1, value clip 0.2) and its `tracerl` section (shrink 1 (block) /
8 (full), 4 denoising steps per block, dynamic threshold 0.9, KL to the old policy tracerl.beta 0.01). This file
adds the scale: block 4, temperature 1.0, group size 8 (tiny), value lr = 5 x policy lr, several optimizer steps
per RL step (mini-batches) as the official gradient accumulation. The tiny lr is 1e-4 instead of the papers' 1e-6,
the Adam lr that works at the tiny scale (calibrated on the autoregressive tiny model, where 3e-4 does not).
[INFERRED] For the strong block start 1e-4 is too large (RL lowered its accuracy in the reproduction's tracerl
study; a one-seed probe did not at 1e-5): `block,lr=1e-5` is the tracerl_lr study of experiments/reproduce.py.
"""
from __future__ import annotations

from ml_collections import config_dict

from configs.base import get_base_config
from jaxrl_reason.algorithms import apply_recipe
from jaxrl_reason.methods.tracerl import config_section

KINDS = {"block": "block", "full": "bidirectional"}
SCALES = {"tiny": "tiny", "small": "small", "paper": "full"}


def _parse(arg: str):
    words = [w.strip() for w in (arg or "block").split(",") if w.strip()]
    if not words or words[0] not in KINDS:
        raise ValueError(f"configs/tracerl.py arg must start with one of {tuple(KINDS)}, got {arg!r}.")
    kind, value, scale, onestep, lr = words[0], False, "tiny", False, None
    for w in words[1:]:
        if w.startswith("lr="):
            lr = _parse_lr(w[3:], arg)
        elif w == "value":
            value = True
        elif w == "onestep":
            onestep = True
        elif w in SCALES:
            scale = w
        else:
            raise ValueError(f"unknown word {w!r} in configs/tracerl.py arg {arg!r}; use value, onestep, lr=<float> "
                             f"or a scale in {tuple(SCALES)}.")
    return kind, value, scale, onestep, lr


def _parse_lr(text: str, arg: str) -> float:
    try:
        lr = float(text)
    except ValueError:
        lr = float("nan")
    if not lr > 0 or lr == float("inf"):
        raise ValueError(f"lr={text!r} in configs/tracerl.py arg {arg!r} must be a positive finite number, "
                         "e.g. lr=1e-5.")
    return lr


def get_config(arg: str = "block") -> config_dict.ConfigDict:
    kind, value, scale, onestep, lr = _parse(arg)
    c = get_base_config(SCALES[scale])
    apply_recipe(c, "tracerl")
    c.model.attention = KINDS[kind]
    c.model.block_size = 4 if kind == "block" else 1
    c.model.sft_dir = f"checkpoints/arith_{c.scale}_sft_{kind}"
    if scale == "paper":
        c.rollout.prompts_per_step, c.rollout.group_size = (64, 16) if kind == "block" else (32, 8)
        c.rollout.max_new_tokens = 2000 if kind == "block" else 512
        c.rollout.max_prompt_len = 784 if kind == "block" else 512
        c.train.num_steps = 80 if kind == "block" else 50
    c.rollout.temperature = 1.0
    if value:
        c.advantage.estimator = "gae"  # the diffusion value model with step-level GAE
    c.optim.lr = lr if lr is not None else 1e-6 if scale == "paper" else 1e-4
    c.optim.value_lr = 5 * c.optim.lr
    c.optim.grad_clip = 1.0
    c.optim.mini_batches = 4
    c.tracerl = config_section(kind, c.rollout.max_new_tokens)
    if scale == "paper" and kind == "full":
        c.tracerl.llada_steps = c.rollout.max_new_tokens  # rl_llada.yaml: steps 512 = gen 512, block 32
    if onestep:
        c.tracerl.estimator = "onestep"
    return c
