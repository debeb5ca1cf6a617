"""TraceRL (diffusion.md §7) for masked-diffusion policies: block attention (TraDo/SDAR) or full attention (LLaDA).

Arg: `<kind>[,value][,<scale>][,onestep][,lr=<float>]` with kind `block` | `full` (attention), `value` = the
diffusion value model with step-level GAE (§7.4), scale `tiny` (default) | `small` | `paper` (the papers' scale:
set `model.init=hf:<dir>`, a jsonl task and a mesh), `onestep` = the d1 one-step log-prob estimator instead of the
trajectory (§6.2; the "TraceRL vs one-step" comparison is this one word), `lr=` the policy lr instead of the
scale's (the value lr stays 5 x the policy lr; `--config.optim.lr` alone would not move it).

Launch (the tiny runs start from the diffusion SFT checkpoints, see configs/sft_diffusion.py):
  python experiments/sft.py --config=configs/sft_diffusion.py:block,tiny --out=checkpoints/arith_tiny_sft_block
  python experiments/train.py --config=configs/tracerl.py:block --workdir=runs/tracerl_block_tiny
  python experiments/train.py --config=configs/tracerl.py:block,value --workdir=runs/tracerl_block_value_tiny
  python experiments/train.py --config=configs/tracerl.py:block,onestep --workdir=runs/onestep_block_tiny
  python experiments/sft.py --config=configs/sft_diffusion.py:full,tiny --out=checkpoints/arith_tiny_sft_full
  python experiments/train.py --config=configs/tracerl.py:full --workdir=runs/tracerl_full_tiny

Defaults (diffusion.md §7.3, rl_trado.yaml / rl_llada.yaml): block 4, 4 denoising steps per block, dynamic
threshold 0.9, temperature 1.0, shrink 1 (block) / 8 (full), eps 0.2, beta 0.01 (k3 KL to the old policy),
accuracy-band filter (0.2, 0.8), group size 8 (tiny), value lr = 5 x policy lr, gamma = lambda = 1. The tiny lr is
1e-4 (calibration.md lesson 4) instead of the papers' 1e-6; several optimizer steps per RL step (mini-batches)
as the official gradient accumulation. [INFERRED] For the strong block start 1e-4 is too large (RL lowered its
accuracy in the reproduction's tracerl study; a one-seed probe did not at 1e-5): `block,lr=1e-5` is the
tracerl_lr study of experiments/reproduce.py.
"""
from __future__ import annotations

from ml_collections import config_dict

from configs.base import get_base_config

KINDS = {"block": "block", "full": "bidirectional"}
SCALES = {"tiny": "tiny", "small": "small", "paper": "full"}


def sampler_config(kind: str, max_new_tokens: int) -> config_dict.ConfigDict:
    """The `tracerl` section: rollout sampler, rows and loss settings of one attention kind."""
    t = config_dict.ConfigDict()
    t.estimator = "trace"  # trace (TraceRL, §6.5) | onestep (d1, §6.2)
    t.shrink = 1 if kind == "block" else 8  # s of §6.5: consecutive decoding steps merged into one training row
    t.steps_per_block = 4  # block models: denoising steps per block (T_b)
    t.remasking = "dynamic" if kind == "block" else "static"  # dynamic: threshold decoding (§4.1)
    t.threshold = 0.9
    t.confidence = "sampled" if kind == "block" else "raw"  # SDAR/jetengine vs LLaDA (§4.1.2)
    t.use_cache = kind == "block"  # block KV cache (exact); full attention: Fast-dLLM dual cache (approximate)
    t.llada_block_len = 32  # full attention: semi-AR block length
    t.llada_steps = max_new_tokens // 2  # full attention: total denoising steps (2 tokens per step)
    t.eps = 0.2
    t.beta = 0.01  # k3 KL to the old (start-of-step) policy
    t.norm = "auto"  # auto: response_len (block, rl_trado) | targets (full attention, rl_llada)
    t.adv_eps = 1e-6
    t.value_clip = 0.2
    t.value_coef = 1.0
    t.value_norm = "response_len"
    t.p_mask_prompt = 0.15  # onestep only (d1 train.yaml)
    t.forward_rows = 128  # rows per call of the no-grad old log-prob / old value passes
    return t


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
    c.algorithm = "tracerl"
    c.model.attention = KINDS[kind]
    c.model.block_size = 4 if kind == "block" else 1
    c.model.sft_dir = f"checkpoints/arith_{c.scale}_sft_{kind}"
    if scale == "paper":
        c.rollout.prompts_per_step, c.rollout.group_size = (64, 16) if kind == "block" else (32, 8)
        c.rollout.max_new_tokens = 2000 if kind == "block" else 512
        c.rollout.max_prompt_len = 784 if kind == "block" else 512
        c.train.num_steps = 80 if kind == "block" else 50
    c.rollout.temperature = 1.0
    c.filter.kind = "accuracy_band"
    c.filter.band_low, c.filter.band_high = 0.2, 0.8
    c.advantage.estimator = "gae" if value else "grpo"  # grpo here = the population-std group z-score
    c.advantage.gamma, c.advantage.lam = 1.0, 1.0
    c.loss.kl_coef, c.loss.kl_in_reward_coef = 0.0, 0.0
    c.optim.lr = lr if lr is not None else 1e-6 if scale == "paper" else 1e-4
    c.optim.value_lr = 5 * c.optim.lr
    c.optim.grad_clip = 1.0
    c.optim.mini_batches = 4
    c.tracerl = sampler_config(kind, c.rollout.max_new_tokens)
    if scale == "paper" and kind == "full":
        c.tracerl.llada_steps = c.rollout.max_new_tokens  # rl_llada.yaml: steps 512 = gen 512, block 32
    if onestep:
        c.tracerl.estimator = "onestep"
    return c
