"""The policy a run trains, built from its config: the model and its trainable params, the samplers, the no-grad
log-prob passes, the reference copy and the composed RL objective (`PolicyParts`).

Autoregressive policies are built here (`ar_parts`); masked-diffusion policies build the same `PolicyParts` in
their own module. The loop (`train/loop.py`) only runs the parts; evaluation and `experiments/evaluate.py` build
their samplers with `eval_samplers`.
"""
from __future__ import annotations

import functools

import jax
from flax import nnx

from jaxrl_reason.methods import registry as methods
from jaxrl_reason.methods.tracerl import diffusion_parts
from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.models.value import ValueModel
from jaxrl_reason.sampling.autoregressive import make_generate_fn
from jaxrl_reason.sampling.compaction import make_compacting_generate_fn
from jaxrl_reason.sampling.processors import SamplingParams
from jaxrl_reason.train import batch as batch_lib
from jaxrl_reason.train import export as export_lib
from jaxrl_reason.train import hparams
from jaxrl_reason.train.build import load_policy
from jaxrl_reason.train.exact_sampler import make_exact_generate_fn
from jaxrl_reason.train.logprobs import LogpSpec, ar_logps, ar_values
from jaxrl_reason.train.sampler_layout import compute_copy
from jaxrl_reason.train.objectives import rl_loss
from jaxrl_reason.train.parts import PolicyParts


def source_dir(config) -> str:
    """The checkpoint directory the policy starts from ("" for a random init): its generation_config.json names the
    end-of-turn ids a chat model stops at besides the tokenizer's EOS."""
    init = config.model.init
    return init[3:] if init.startswith("hf:") else (config.model.sft_dir if init == "sft" else "")


def logp_spec(config) -> LogpSpec:
    """Chunk sizes and compute dtype of every log-prob pass (`train/logprobs.py`)."""
    m = config.model
    return LogpSpec(m.logits_chunk, m.vocab_chunk, m.compute_dtype).validate()


def forward_shardings(config, mesh, shardings) -> dict:
    """In/out shardings of the no-grad passes: rows over ('data', 'fsdp') when they split evenly, else
    replicated; params as in training."""
    if mesh is None or shardings is None:
        return {}
    rows = config.rollout.prompts_per_step * config.rollout.group_size
    split = rows % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
    rows_sh = sharding_lib.batch_sharding(mesh, 1) if split else jax.sharding.NamedSharding(mesh, jax.P())
    return dict(policy_shardings=shardings["policy"], value_shardings=shardings.get("value"), rows_sharding=rows_sh)


def reference_copy(config, policy_params, shardings):
    """The frozen KL reference: a compute-dtype copy of the initial policy, sharded like the policy."""
    # Its own buffers (x.copy()), never the policy's: the update step donates the policy params.
    copy = jax.tree.map(lambda x: x.copy(), policy_params)
    return compute_copy(config, copy if shardings is None else jax.device_put(copy, shardings["policy"]))


def _sampler_lengths(config, tokenizer, source: str) -> dict:
    r = config.rollout
    return dict(max_prompt_len=r.max_prompt_len, max_new_tokens=r.max_new_tokens,
                eos_ids=export_lib.stop_ids(tokenizer, source), pad_id=tokenizer.pad_token_id)


def eval_samplers(config, graphdef, tokenizer, source: str | None = None):
    """(sampler at `eval.temperature`, greedy sampler) of an autoregressive policy; they stop at the end ids of
    `source`'s generation_config.json (default: the checkpoint the config starts from)."""
    common = _sampler_lengths(config, tokenizer, source_dir(config) if source is None else source)
    return (make_generate_fn(graphdef, params=SamplingParams(temperature=config.eval.temperature), **common),
            make_generate_fn(graphdef, params=SamplingParams(greedy=True), **common))


def train_sampler(config, graphdef, tokenizer):
    """The rollout sampler: `rollout.*` sampling settings plus the active methods' fields (HAPO's adaptive
    temperature), lanes, shared prefill / prefix and row compaction as configured, or the exact sampler."""
    r = config.rollout
    params = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                            **methods.sampling_fields(config))
    lengths = _sampler_lengths(config, tokenizer, source_dir(config))
    if r.get("exact_logprobs", False):  # the trainer's own forward pass at every step: sampler and trainer log-probs agree exactly
        return make_exact_generate_fn(graphdef, spec=logp_spec(config), params=params, **lengths)
    make = make_compacting_generate_fn if r.compact_rows else make_generate_fn
    return make(graphdef, params=params, lanes=r.lanes, group_size=r.group_size, share_prefill=r.share_prefill,
                share_prefix=r.share_prefix, **lengths)


def ar_parts(config, graphdef, tokenizer, *, value_graphdef=None, ref_params=None, mesh=None,
             shardings=None) -> PolicyParts:
    """Autoregressive policy: KV-cache sampler, token log-probs, the composed RL objective.

    `mesh` and `shardings` (the params' training shardings, {"policy"[, "value"]}) give the no-grad log-prob
    passes explicit in/out shardings.
    """
    spec, fwd_sh = logp_spec(config), forward_shardings(config, mesh, shardings)
    logps_fn, values_fn = batch_lib.make_forward_fns(graphdef, value_graphdef, spec=spec,
                                                     micro_batch_rows=config.optim.logp_micro_batch_rows, **fwd_sh)
    adv_hp = hparams.advantage_hp(config)
    extra_fns = methods.extra_advantages(config, graphdef, tokenizer, spec=spec, mesh=mesh, forward_shardings=fwd_sh)

    def build_batch(rows, params):
        extra, extra_metrics = None, {}
        for fn in extra_fns:  # the methods' advantage terms, added to the outcome advantage
            adv, more = fn(rows, params["policy"])
            extra, extra_metrics = (adv if extra is None else extra + adv), {**extra_metrics, **more}
        batch, metrics, entropy = batch_lib.build_update_batch(
            rows, adv_hp, policy_params=params["policy"], logps_fn=logps_fn, ref_params=ref_params,
            value_params=params.get("value"), values_fn=values_fn, extra_adv_NxR=extra, rollout_hp=config.rollout)
        return batch, {**metrics, **extra_metrics}, entropy

    def split(batch, rng):
        return batch_lib.mini_batches(batch, config.optim.mini_batches, rng, config.rollout.group_size)

    eval_gen, greedy_gen = eval_samplers(config, graphdef, tokenizer)
    return PolicyParts(
        train_gen=train_sampler(config, graphdef, tokenizer), eval_gen=eval_gen, greedy_gen=greedy_gen,
        build_batch=build_batch,
        loss_fn=functools.partial(rl_loss, hp=hparams.loss_hp(config), hooks=methods.policy_hooks(config),
                                  policy_graphdef=graphdef, value_graphdef=value_graphdef,
                                  logps_fn=functools.partial(ar_logps, spec=spec),
                                  values_fn=functools.partial(ar_values, spec=spec)),
        split=split)


def build_parts(config, task, mesh=None):
    """(policy module, its config, trainable params {"policy"[, "value"]}, PolicyParts): a value model for GAE,
    a frozen reference copy when a KL term is on, autoregressive or masked-diffusion parts by `model.attention`.
    With `mesh`, the reference copy and the no-grad passes are sharded like the trained params."""
    policy, mcfg = load_policy(config, task.tokenizer)
    graphdef, policy_params = nnx.split(policy, nnx.Param)
    params, value_graphdef, ref_params = {"policy": policy_params}, None, None
    if config.advantage.estimator == "gae":
        value_graphdef, params["value"] = nnx.split(ValueModel.from_policy(policy, rngs=nnx.Rngs(config.seed)),
                                                    nnx.Param)
    shardings = None if mesh is None else {k: sharding_lib.param_shardings(v, mesh) for k, v in params.items()}
    if config.loss.kl_coef > 0 or config.loss.kl_in_reward_coef > 0:
        ref_params = reference_copy(config, policy_params, shardings)
    if config.model.attention == "causal":
        parts = ar_parts(config, graphdef, task.tokenizer, value_graphdef=value_graphdef, ref_params=ref_params,
                         mesh=mesh, shardings=shardings)
    else:  # masked-diffusion policy: its own rows and objective, same loop
        parts = diffusion_parts(config, graphdef, task.tokenizer, value_graphdef=value_graphdef)
    return policy, mcfg, params, parts
