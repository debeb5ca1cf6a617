"""Supervised warm start of masked-diffusion policies: full attention (LLaDA) and block diffusion (BD3-LM / SDAR).

Full-attention SFT: 1/t-weighted masked CE on the response, prompt never masked, per-sequence normalisation by
the answer length. Block diffusion: two-stream input, per-block or per-sequence t. The same jitted update step as
RL and AR SFT (`train/step.py`), a different loss; the loop is `train/sft.sft_loop`, shared with AR SFT.

Layouts (`DiffusionSFTSpec.layout`):
  full     [prompt; x_t] with bidirectional attention (LLaDA), logits of the response slots.
  bd3      [prompt; x_t ; prompt; x_0] with `bd3_two_stream_mask` over n = P + R (BD3-LM / SDAR); blocks are
           counted from slot 0, which is response-aligned because P is a multiple of the block size.
  tracerl  [prompt; x_0 ; x_t] with `tracerl_mask` (dLLM-RL `sft_trado.py`): the layout TraceRL trains on.
Loss modes: `core.diffusion.masked_diffusion_loss` modes `sft` (LLaDA, per-sequence / answer length),
`token_mean` (SDAR, batch token mean), `semi_ar` and `masked_mean` (dLLM-RL, no 1/t; use t_min=0.1, t_max=0.9,
eps=0). Denominators are the global counts of the mini-batch (`num_seqs_N`, `num_tokens_N`), so micro-batch
losses sum to the mini-batch loss.

`pad_to_eos` (LLaDA's SFT also trains the EOS padding): response padding is replaced by EOS and trained like the
answer, so a full-attention model learns to fill the slots after its answer (our samplers decode every response
slot).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_reason.core import diffusion as diff_lib
from jaxrl_reason.data.tokenizer import encode_batch_left_padded, encode_responses_right_padded
from jaxrl_reason.models import attention
from jaxrl_reason.train.optimizer import make_optimizer
from jaxrl_reason.train.sft import sft_loop
from jaxrl_reason.train.state import init_train_state
from jaxrl_reason.train.step import make_train_step

LAYOUTS = ("full", "bd3", "tracerl")
SFT_LOSS_MODES = ("sft", "token_mean", "semi_ar", "masked_mean")


@dataclasses.dataclass(frozen=True)
class DiffusionSFTSpec:
    """Static SFT loss settings (hashable). `per_block_t`: BD3-LM one t per block; False: SDAR one t per sequence."""
    layout: str
    mask_token_id: int
    block_size: int = 1
    loss_mode: str = "sft"
    eps: float = 1e-3
    t_min: float = 0.0
    t_max: float = 1.0
    per_block_t: bool = False
    force_one: bool = False

    def validate(self) -> DiffusionSFTSpec:
        if self.layout not in LAYOUTS:
            raise ValueError(f"Unknown diffusion SFT layout {self.layout!r}; expected one of {LAYOUTS}.")
        if self.loss_mode not in SFT_LOSS_MODES:
            raise ValueError(f"Unknown diffusion SFT loss mode {self.loss_mode!r}; expected one of {SFT_LOSS_MODES}.")
        if self.layout != "full" and self.block_size < 1:
            raise ValueError(f"block layouts need block_size >= 1, got {self.block_size}.")
        return self


def sft_spec(config, mask_token_id: int) -> DiffusionSFTSpec:
    """The spec of `configs/sft_diffusion.py` (`config.diffusion`)."""
    d = config.diffusion
    return DiffusionSFTSpec(layout=d.layout, mask_token_id=int(mask_token_id), block_size=config.model.block_size,
                            loss_mode=d.loss_mode, eps=d.eps, t_min=d.t_min, t_max=d.t_max,
                            per_block_t=d.per_block_t, force_one=d.force_one).validate()


def diffusion_sft_arrays(tokenizer, prompts: list[str], responses: list[str], max_prompt_len: int,
                         max_new_tokens: int, pad_to_eos: bool = True) -> dict:
    """prompt_NxP (left-padded), prompt_mask_NxP, response_NxR (+ EOS), maskable_NxR (trained response slots)."""
    p_ids, p_mask = encode_batch_left_padded(tokenizer, prompts, max_prompt_len)
    r_ids, r_mask = encode_responses_right_padded(tokenizer, responses, max_new_tokens)
    if pad_to_eos:
        r_ids = np.where(r_mask, r_ids, int(tokenizer.eos_token_id)).astype(np.int32)
        r_mask = np.ones_like(r_mask)
    return {"prompt_NxP": p_ids, "prompt_mask_NxP": p_mask, "response_NxR": r_ids, "maskable_NxR": r_mask}


def with_counts(batch: dict) -> dict:
    """Adds the global sequence / maskable-token counts of the (mini-)batch, broadcast over its rows."""
    n = batch["response_NxR"].shape[0]
    tokens = max(float(np.sum(batch["maskable_NxR"])), 1.0)
    return {**batch, "num_seqs_N": np.full((n,), n, np.float32), "num_tokens_N": np.full((n,), tokens, np.float32)}


def noise(spec: DiffusionSFTSpec, rng, batch: dict):
    """Forward process on the response (the prompt is never masked): (x_t_NxR, masked_NxR, p of [N] or [N, R])."""
    resp, maskable = batch["response_NxR"], batch["maskable_NxR"]
    if spec.layout == "full":
        return diff_lib.forward_mask(rng, resp, maskable, spec.mask_token_id, spec.eps, spec.t_min, spec.t_max,
                                     spec.force_one)
    return diff_lib.block_forward_mask(rng, resp, maskable, spec.block_size, spec.mask_token_id, spec.eps,
                                       spec.per_block_t, False, spec.t_min, spec.t_max, spec.force_one)


def sft_inputs(spec: DiffusionSFTSpec, batch: dict, xt_NxR):
    """tokens, positions, mask of the chosen layout and the slice of slots whose logits score the response."""
    prompt, pmask, resp = batch["prompt_NxP"], batch["prompt_mask_NxP"], batch["response_NxR"]
    n, p = prompt.shape
    r = resp.shape[1]
    rvalid = jnp.asarray(batch["maskable_NxR"], bool)
    ppos = attention.positions_from_mask(pmask)
    rpos = jnp.sum(pmask, axis=-1, keepdims=True, dtype=jnp.int32) + jnp.arange(r, dtype=jnp.int32)
    if spec.layout == "full":
        kv = jnp.concatenate([pmask, rvalid], 1)
        return (jnp.concatenate([prompt, xt_NxR], 1), jnp.concatenate([ppos, rpos], 1),
                attention.bidirectional_mask(kv), (p, p + r))
    if spec.layout == "tracerl":
        kv = jnp.concatenate([pmask, rvalid, rvalid], 1)
        return (jnp.concatenate([prompt, resp, xt_NxR], 1), jnp.concatenate([ppos, rpos, rpos], 1),
                attention.tracerl_mask(p, r, spec.block_size, kv), (p + r, p + 2 * r))
    if p % spec.block_size:
        raise ValueError(f"the bd3 layout needs a prompt length ({p}) that is a multiple of {spec.block_size}.")
    kv = jnp.concatenate([pmask, rvalid, pmask, rvalid], 1)
    pos = jnp.concatenate([ppos, rpos, ppos, rpos], 1)
    idx = jnp.arange(2 * (p + r))
    mask = (attention.bd3_two_stream_mask(p + r, spec.block_size)[None] & kv[:, None, :]) | (idx[:, None] == idx)
    return jnp.concatenate([prompt, xt_NxR, prompt, resp], 1), pos, mask, (p, p + r)


def sft_loss_given_noise(params, batch: dict, xt_NxR, masked_NxR, p, *, graphdef, spec: DiffusionSFTSpec):
    """Masked-diffusion SFT loss for a given forward-process draw. Returns a scalar."""
    model = nnx.merge(graphdef, params)
    tokens, pos, mask, (lo, hi) = sft_inputs(spec, batch, xt_NxR)
    h, _ = model.hidden(tokens, pos, mask)
    logp = diff_lib.token_logp(model.logits(h[:, lo:hi]), batch["response_NxR"])
    answer_len = jnp.sum(jnp.asarray(batch["maskable_NxR"], jnp.float32), axis=-1)
    return diff_lib.masked_diffusion_loss(logp, masked_NxR, p, answer_len, spec.loss_mode,
                                          num_seqs=batch["num_seqs_N"][0], num_tokens=batch["num_tokens_N"][0])


def diffusion_sft_loss(params, batch: dict, rng, *, graphdef, spec: DiffusionSFTSpec):
    """`loss_fn(params, micro_batch, rng)` for `make_train_step`: a fresh forward-process draw per call."""
    xt, masked, p = noise(spec, rng, batch)
    loss = sft_loss_given_noise(params, batch, xt, masked, p, graphdef=graphdef, spec=spec)
    return loss, {"masked_frac": jnp.sum(masked) / jnp.maximum(jnp.sum(batch["maskable_NxR"]), 1)}


def train_diffusion_sft(model, arrays: dict, *, spec: DiffusionSFTSpec, steps: int, batch_size: int, lr: float,
                        warmup_steps: int, seed: int, micro_batches: int = 1, log_every: int = 50, log_fn=print,
                        time_budget_s: float = 0.0):
    """Runs `steps` masked-diffusion SFT updates over `arrays` (epoch-wise shuffled, `sft.sft_loop`); returns
    (model, history)."""
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(lr, warmup_steps=warmup_steps, total_steps=steps, schedule="cosine", weight_decay=0.01)
    state = init_train_state(params, tx, seed)
    loss_fn = functools.partial(diffusion_sft_loss, graphdef=graphdef, spec=spec.validate())
    step_fn = make_train_step(loss_fn, tx, num_micro_batches=micro_batches)
    state, history = sft_loop(step_fn, state, arrays, steps=steps, batch_size=batch_size, seed=seed,
                              prepare_batch=with_counts, log_every=log_every, log_fn=log_fn,
                              time_budget_s=time_budget_s, name="diffusion sft")
    nnx.update(model, state.params)
    return model, history


_loss_jit = jax.jit(diffusion_sft_loss, static_argnames=("graphdef", "spec"))


def heldout_loss(model, arrays: dict, spec: DiffusionSFTSpec, seed: int = 0) -> float:
    """The SFT loss of `arrays` under `model` for one fixed forward-process draw (for plateau checks)."""
    graphdef, params = nnx.split(model, nnx.Param)
    return float(_loss_jit(params, with_counts(arrays), jax.random.PRNGKey(seed), graphdef=graphdef, spec=spec)[0])


def diffusion_sft_from_config(config, tokenizer, model, prompts: list[str], traces: list[str], log_fn=print):
    """`train_diffusion_sft` on `prompts`/`traces` with the sizes, layout and loss of a configs/sft_diffusion.py
    config (what `experiments/sft.py` and the TraceRL study run); returns (model, history)."""
    c = config
    arrays = diffusion_sft_arrays(tokenizer, prompts, traces, c.rollout.max_prompt_len, c.rollout.max_new_tokens,
                                  pad_to_eos=c.diffusion.pad_to_eos)
    return train_diffusion_sft(model, arrays, spec=sft_spec(c, tokenizer.mask_token_id), steps=c.sft.steps,
                               batch_size=c.sft.batch_size, lr=c.sft.lr, warmup_steps=c.sft.warmup_steps, seed=c.seed,
                               micro_batches=c.sft.micro_batches, time_budget_s=c.sft.time_budget_s, log_fn=log_fn)
