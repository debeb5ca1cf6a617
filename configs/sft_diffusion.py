"""Masked-diffusion supervised warm start of the policies that configs/tracerl.py trains.

Arg: `<kind>[,<scale>]`, kind `block` (block diffusion, block 4: dLLM-RL's TraDo SFT, i.e. the TraceRL two-stream
layout, a per-sequence mask ratio ~ U(0.1, 0.9), no 1/t, loss / R) or `full` (full attention, LLaDA
1/t-weighted masked CE with per-sequence answer-length normalisation); scale `tiny` (default) | `small`.
SDAR's loss instead: `--config.diffusion.loss_mode=token_mean --config.diffusion.eps=1e-3
--config.diffusion.t_min=0 --config.diffusion.t_max=1 --config.diffusion.force_one=True` (BD3-LM: also
`layout=bd3 per_block_t=True`); the 1/t weight makes it much noisier at this size.

Launch:
  python experiments/sft.py --config=configs/sft_diffusion.py:block,tiny --out=checkpoints/arith_tiny_sft_block
  python experiments/sft.py --config=configs/sft_diffusion.py:full,tiny --out=checkpoints/arith_tiny_sft_full
  (`--config.diffusion.layout=bd3` trains block models with the BD3-LM / SDAR two-stream layout instead.)

The `tracerl` section holds the samplers used to evaluate the checkpoint (the same as the RL runs).
"""
from __future__ import annotations

from ml_collections import config_dict

from configs import sft as sft_config
from configs.tracerl import KINDS
from jaxrl_reason.methods.tracerl import config_section


def get_config(arg: str = "block,tiny") -> config_dict.ConfigDict:
    words = [w.strip() for w in (arg or "block").split(",") if w.strip()]
    kind = words[0] if words else "block"
    scale = words[1] if len(words) > 1 else "tiny"
    if kind not in KINDS or scale not in ("tiny", "small") or len(words) > 2:
        raise ValueError(f"configs/sft_diffusion.py arg must be '<block|full>[,tiny|small]', got {arg!r}.")
    c = sft_config.get_config(scale)
    c.algorithm = "sft_diffusion"
    c.model.attention = KINDS[kind]
    c.model.block_size = 4 if kind == "block" else 1
    c.diffusion = config_dict.ConfigDict()
    c.diffusion.layout = "tracerl" if kind == "block" else "full"  # full | bd3 | tracerl
    c.diffusion.loss_mode = "semi_ar" if kind == "block" else "sft"  # sft | token_mean | semi_ar | masked_mean
    c.diffusion.eps = 0.0 if kind == "block" else 1e-3  # p = (1 - eps) t + eps
    c.diffusion.t_min, c.diffusion.t_max = (0.1, 0.9) if kind == "block" else (0.0, 1.0)
    c.diffusion.per_block_t = False  # True: BD3-LM one t per block; False: SDAR / LLaDA one t per sequence
    c.diffusion.force_one = False  # SDAR: at least one masked token per sequence
    c.diffusion.pad_to_eos = True  # LLaDA: the response padding is EOS and trained
    c.sft.lr = 1e-3 if scale == "tiny" else 3e-4
    c.sft.warmup_steps = 50  # train_diffusion_sft: cosine to 0, weight decay 0.01
    # Diffusion learns the digits far slower than AR SFT: at 1500 steps the block model held out 4.3% pass@1 (loss
    # still falling), at 6000 73.8% (loss flat from ~3000); full attention 0.2% at 6000, 7.8% at 30000 (README).
    c.sft.steps = {("block", "tiny"): 6000, ("full", "tiny"): 30000}.get((kind, scale), 4000)
    # Fresh problems, as configs/sft.py: a pool of steps x batch, no second epoch. An 8000-problem pool seen ~6
    # times gave the AR policy a memorizing start that RL could only lower (configs/sft.py).
    c.sft.num_problems = c.sft.steps * c.sft.batch_size
    c.tracerl = config_section(kind, c.rollout.max_new_tokens)
    return c
