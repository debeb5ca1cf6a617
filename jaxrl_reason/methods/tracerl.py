"""TraceRL: reinforcement learning of a masked-diffusion policy on its own decoding trajectories.

The method in one place: its recipe (`RECIPE`, the shared-schema fields it sets), its own config section
(`config_section`), its start-up checks (`validate_config`), and `diffusion_parts`, the `PolicyParts` the shared RL
loop runs for a masked-diffusion policy (block attention as TraDo / SDAR, or full attention as LLaDA). The rows,
forwards and loss are in `train/diffusion_policy.py` (config-free, driven by a `TraceSpec`); the math is in
`core/tracerl.py`.

Shared fields TraceRL reads: `loss.eps_low` / `loss.eps_high` (ratio clip), `advantage.eps` and
`advantage.std_ddof` (the GRPO group z-score of the reward, population std in the official code), `advantage.gamma`
/ `advantage.lam` (step-level GAE of the value model), `loss.value_clip` (0: unclipped) and `loss.value_coef`
(value model), `advantage.estimator` ("grpo", or "gae" for the value model), `filter.*`, `rollout.*`, `optim.*`.
Its KL is a k3 KL to the OLD policy (the start of the RL step, a trust region inside the step), which no shared
field expresses: `loss.kl_coef` is a KL to a frozen reference model, so it stays 0 and the coefficient is
`tracerl.beta`. `loss.agg` does not apply: each replayed row is normalised by `tracerl.norm`.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from ml_collections import config_dict

from jaxrl_reason.core import tracerl as tr
from jaxrl_reason.sampling.diffusion import make_block_generate_fn, make_llada_generate_fn
from jaxrl_reason.sampling.processors import SamplingParams
from jaxrl_reason.train import diffusion_policy as dp
from jaxrl_reason.train import mismatch
from jaxrl_reason.train.logprobs import LogpSpec
from jaxrl_reason.methods.hooks import Method
from jaxrl_reason.train.parts import PolicyParts

ATTENTION_KINDS = {"block": "block", "bidirectional": "full"}  # model.attention -> TraceSpec.kind

# The official defaults (dLLM-RL rl_trado.yaml / rl_llada.yaml), the same for both attention kinds.
RECIPE = {
    "filter.kind": "accuracy_band",  # groups with accuracy outside [0.2, 0.8] are dropped before training
    "filter.band_low": 0.2,
    "filter.band_high": 0.8,
    "advantage.estimator": "grpo",  # configs/tracerl.py's `value` word switches to "gae"
    "advantage.eps": 1e-6,
    "advantage.std_ddof": 0,  # the official reward normalisation divides by the population std
    "advantage.gamma": 1.0,
    "advantage.lam": 1.0,
    "loss.mode": "ppo",
    "loss.eps_low": 0.2,
    "loss.eps_high": 0.2,
    "loss.kl_coef": 0.0,  # the KL is tracerl.beta, against the old policy
    "loss.kl_in_reward_coef": 0.0,
    "loss.value_clip": 0.2,  # the official value loss clips with the policy's eps
    "loss.value_coef": 1.0,  # the value model has its own optimizer and lr; its loss is added unscaled
}


def config_section(kind: str, max_new_tokens: int) -> config_dict.ConfigDict:
    """The `tracerl` section of attention kind `kind` ("block" | "full"): sampler, rows and what only TraceRL has."""
    t = config_dict.ConfigDict()
    t.estimator = "trace"  # trace (the decoding trajectory) | onestep (d1: whole response masked at once)
    t.shrink = 1 if kind == "block" else 8  # s: consecutive decoding steps merged into one training row
    t.steps_per_block = 4  # block models: denoising steps per block (T_b)
    t.remasking = "dynamic" if kind == "block" else "static"  # dynamic: commit every token above `threshold`
    t.threshold = 0.9
    t.confidence = "sampled" if kind == "block" else "raw"  # what the threshold compares: SDAR vs LLaDA samplers
    t.use_cache = kind == "block"  # block KV cache (exact); full attention: Fast-dLLM dual cache (approximate)
    t.llada_block_len = 32  # full attention: semi-AR block length
    t.llada_steps = max_new_tokens // 2  # full attention: total denoising steps (2 tokens per step)
    t.beta = 0.01  # k3 KL to the old (start-of-step) policy
    t.norm = "auto"  # auto: response_len (block, rl_trado) | targets (full attention, rl_llada)
    t.value_norm = "response_len"
    t.p_mask_prompt = 0.15  # onestep only: each prompt token masked with this probability (d1 train.yaml)
    t.forward_rows = 128  # rows per call of the no-grad old log-prob / old value passes
    return t


def _require(ok: bool, sentence: str) -> None:
    if not ok:
        raise ValueError(sentence)


def validate_config(config) -> None:
    """One clear sentence for the first impossible TraceRL / masked-diffusion setting, before anything compiles."""
    m, r, a, l = config.model, config.rollout, config.advantage, config.loss
    _require(m.attention in ATTENTION_KINDS,
             f"TraceRL needs model.attention 'block' or 'bidirectional', got {m.attention!r}.")
    _require("tracerl" in config,
             f"a {m.attention}-attention policy needs the `tracerl` section of configs/tracerl.py.")
    t = config.tracerl
    _require(t.estimator in dp.ESTIMATORS, f"unknown tracerl.estimator {t.estimator!r}; use one of {dp.ESTIMATORS}.")
    _require(a.estimator in ("grpo", "gae"),
             "TraceRL uses advantage.estimator 'grpo' (group z-score) or 'gae' (with the diffusion value model).")
    _require(not (t.estimator == "onestep" and a.estimator == "gae"),
             "the one-step estimator has no value-model variant; use advantage.estimator 'grpo'.")
    _require(not (t.estimator == "onestep" and r.log_mismatch),
             "rollout.log_mismatch compares the sampler's log-probs with the replayed decoding states, which the "
             "one-step estimator does not replay; use tracerl.estimator 'trace'.")
    _require(l.mode == "ppo", f"TraceRL's objective is the PPO clip on replayed rows; set loss.mode 'ppo', not "
                              f"{l.mode!r}.")
    _require(l.dual_clip_c == 0 and l.entropy_coef == 0 and "hapo" not in config,
             "TraceRL's loss has no dual clip, entropy bonus or HAPO terms; set loss.dual_clip_c and "
             "loss.entropy_coef to 0 and leave out the hapo section.")
    _require(l.kl_coef == 0 and l.kl_in_reward_coef == 0,
             "TraceRL's KL is tracerl.beta against the old policy; set loss.kl_coef and kl_in_reward_coef to 0.")
    _require(l.value_clip >= 0, f"loss.value_clip must be >= 0 (0: unclipped), got {l.value_clip}.")
    _require(isinstance(t.shrink, int) and t.shrink >= 1, f"tracerl.shrink must be an int >= 1, got {t.shrink!r}.")
    _require(t.remasking in ("static", "dynamic"), f"tracerl.remasking must be static|dynamic, got {t.remasking!r}.")
    _require(0.0 < t.threshold <= 1.0, f"tracerl.threshold must be in (0, 1], got {t.threshold}.")
    _require(t.norm in ("auto",) + tr.NORMS, f"tracerl.norm must be 'auto' or one of {tr.NORMS}, got {t.norm!r}.")
    if m.attention == "block":
        b = m.block_size
        _require(r.max_prompt_len % b == 0 and r.max_new_tokens % b == 0,
                 f"rollout.max_prompt_len and max_new_tokens must be multiples of model.block_size ({b}).")
        _require(b % t.steps_per_block == 0, f"tracerl.steps_per_block ({t.steps_per_block}) must divide {b}.")
    else:
        _require(r.max_new_tokens % t.llada_block_len == 0,
                 f"rollout.max_new_tokens must be a multiple of tracerl.llada_block_len ({t.llada_block_len}).")
        _require(t.llada_steps % (r.max_new_tokens // t.llada_block_len) == 0,
                 f"tracerl.llada_steps ({t.llada_steps}) must be a multiple of the number of LLaDA blocks.")


def trace_spec(config, mask_token_id: int) -> dp.TraceSpec:
    """The static `TraceSpec` of an experiment config; `tracerl.norm` "auto" picks the official norm per kind."""
    t, r, a, l = config.tracerl, config.rollout, config.advantage, config.loss
    kind = ATTENTION_KINDS[config.model.attention]
    if kind == "block":
        block, max_steps = config.model.block_size, t.steps_per_block
    else:
        block, max_steps = None, r.max_new_tokens if t.remasking == "dynamic" else t.llada_steps
    k = 1 if t.estimator == "onestep" else tr.num_rows_bound(block, int(t.shrink), int(max_steps))
    norm = t.norm if t.norm != "auto" else ("response_len" if kind == "block" else "targets")
    return dp.TraceSpec(
        kind=kind, block_size=block, shrink=int(t.shrink), num_rows=k, mask_token_id=int(mask_token_id),
        group_size=r.group_size, estimator=t.estimator, eps_low=l.eps_low, eps_high=l.eps_high, beta=t.beta,
        norm=norm, adv_eps=a.eps, std_ddof=int(a.std_ddof), gamma=a.gamma, lam=a.lam,
        value_clip=l.value_clip or None, value_coef=l.value_coef, value_norm=t.value_norm,
        p_mask_prompt=t.p_mask_prompt, seed=config.seed, forward_rows=t.forward_rows,
        logp=LogpSpec(config.model.logits_chunk, config.model.vocab_chunk, config.model.compute_dtype)).validate()


def _rollout_only(fn):
    """The diffusion samplers return (Rollout, aux); the loop and evaluation want the Rollout."""
    def generate(params, prompt_tokens_BxP, prompt_mask_BxP, key):
        return fn(params, prompt_tokens_BxP, prompt_mask_BxP, key)[0]
    return generate


def make_samplers(config, graphdef, tokenizer):
    """(train, eval, greedy) samplers of a diffusion policy (also used to evaluate diffusion SFT).

    Block models: block KV cache, `tracerl.remasking` ("dynamic": commit every token above `tracerl.threshold`)
    for training / eval samples, static remasking for greedy (TraDo's evaluation). Full attention: LLaDA semi-AR
    with `tracerl.llada_block_len`, `tracerl.llada_steps` (or Fast-dLLM threshold decoding when dynamic).
    """
    r, t, m = config.rollout, config.tracerl, config.model
    train = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p)
    sample = SamplingParams(temperature=config.eval.temperature)
    common = dict(prompt_len=r.max_prompt_len, mask_token_id=int(tokenizer.mask_token_id),
                  pad_id=int(tokenizer.pad_token_id), use_cache=bool(t.use_cache), confidence=t.confidence)
    eos = (int(tokenizer.eos_token_id),)
    if ATTENTION_KINDS[m.attention] == "block":
        def make(sampling, remasking):
            return _rollout_only(make_block_generate_fn(
                graphdef, max_new_tokens=r.max_new_tokens, block_size=m.block_size, steps_per_block=t.steps_per_block,
                eos_ids=eos, sampling=sampling, remasking=remasking, threshold=t.threshold, **common))
        return make(train, t.remasking), make(sample, t.remasking), make(SamplingParams(greedy=True), "static")

    def make_full(sampling):
        return _rollout_only(make_llada_generate_fn(
            graphdef, gen_len=r.max_new_tokens, block_len=t.llada_block_len, steps=t.llada_steps, eos_id=eos,
            sampling=sampling, threshold=t.threshold if t.remasking == "dynamic" else None, **common))
    return make_full(train), make_full(sample), make_full(SamplingParams(greedy=True))


def replay_mismatch(spec: dp.TraceSpec, batch: dict, rows, rollout) -> dict:
    """`rollout/mismatch_*` of the sampler's raw log-probs of the tokens it unmasked against the trainer's old
    log-probs of the same tokens in the replayed state of the same step (`dp.replayed_old_logp`), by the
    autoregressive path's function (`train/mismatch.py`); `rollout/mismatch_tokens_frac` is the fraction of response
    tokens compared."""
    logp_NxR, replayed_NxR = dp.replayed_old_logp(spec, batch, rows)
    _, metrics = mismatch.batch_terms(rows, logp_NxR, replayed_NxR.astype(np.float32), rollout)
    real = max(float(np.sum(rows.response_mask_NxR)), 1.0)
    return {**metrics, "rollout/mismatch_tokens_frac": float(replayed_NxR.sum()) / real}


def diffusion_parts(config, graphdef, tokenizer, *, value_graphdef=None) -> PolicyParts:
    """The `PolicyParts` of a masked-diffusion policy (`config.model.attention` block | bidirectional)."""
    validate_config(config)
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token, which a masked-diffusion policy needs.")
    spec = trace_spec(config, tokenizer.mask_token_id)
    logp_fn = jax.jit(functools.partial(dp.row_logp, graphdef, spec))
    value_fn = None if value_graphdef is None else jax.jit(functools.partial(dp.row_values, value_graphdef, spec))
    train_gen, eval_gen, greedy_gen = make_samplers(config, graphdef, tokenizer)

    def build_batch(rows, params):
        batch, metrics, entropy = dp.build_update_batch(rows, params, spec=spec, logp_fn=logp_fn, value_fn=value_fn)
        if config.rollout.log_mismatch:
            metrics = {**metrics, **replay_mismatch(spec, batch, rows, config.rollout)}
        return batch, metrics, entropy

    def split(batch, rng):
        return dp.split_rows(batch, config.optim.mini_batches, rng)

    loss_fn = functools.partial(dp.tracerl_loss, spec=spec, graphdef=graphdef, value_graphdef=value_graphdef)
    return PolicyParts(train_gen=train_gen, eval_gen=eval_gen, greedy_gen=greedy_gen if config.eval.greedy else None,
                       build_batch=build_batch, loss_fn=loss_fn, split=split)


METHOD = Method(
    name="tracerl", recipes={"tracerl": RECIPE}, validate=validate_config,
    section=lambda config: config_section(ATTENTION_KINDS.get(config.model.attention, "block"),
                                          config.rollout.max_new_tokens))
