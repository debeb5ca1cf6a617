"""Config -> objects: validation (before anything compiles), the task, the policy.

`validate_config` turns every impossible setting into one clear sentence at start-up, so no run dies after minutes
of compilation because of a typo. Every name it accepts is a key of a registry.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

import jax
import numpy as np
from flax import nnx

from jaxrl_reason import algorithms
from jaxrl_reason.core import kl as kl_lib
from jaxrl_reason.core.advantages import ADVANTAGE_ESTIMATORS
from jaxrl_reason.core.aggregate import AGGREGATIONS
from jaxrl_reason.core.filters import GROUP_FILTERS
from jaxrl_reason.core.length import REWARD_SHAPINGS
from jaxrl_reason.core.policy_loss import POLICY_LOSSES
from jaxrl_reason.data import arithmetic
from jaxrl_reason.data.example import Example
from jaxrl_reason.data.sources import build_examples, scorer_for, validate_task
from jaxrl_reason.data.tokenizer import build_char_tokenizer, load_tokenizer
from jaxrl_reason.methods import registry as methods
from jaxrl_reason.models.hf import load_hf
from jaxrl_reason.models.sharding import resolve_mesh_shape
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.train import sampler_layout
from jaxrl_reason.train import mismatch
from jaxrl_reason.train import pipeline
from jaxrl_reason.train.logprobs import COMPUTE_DTYPES, LogpSpec

NUM_TRAIN_PROBLEMS = 20000


def _require(ok: bool, sentence: str) -> None:
    if not ok:
        raise ValueError(sentence)


def validate_config(config) -> None:
    """Raises ValueError with one sentence for the first impossible setting in `config`."""
    known = algorithms.algorithm_names()
    _require(config.algorithm in known, f"unknown algorithm {config.algorithm!r}; known: {', '.join(sorted(known))}.")
    a, l, r, f, o, ro = config.advantage, config.loss, config.reward, config.filter, config.optim, config.rollout
    # the registries themselves, not a copy: a part registered after import (a notebook cell) is valid too
    _require(a.estimator in ADVANTAGE_ESTIMATORS,
             f"unknown advantage estimator {a.estimator!r}; use one of {tuple(ADVANTAGE_ESTIMATORS)}.")
    _require(a.std_ddof in (0, 1), f"advantage.std_ddof must be 0 (population std) or 1 (Bessel), got {a.std_ddof!r}.")
    _require(l.mode in POLICY_LOSSES, f"unknown loss mode {l.mode!r}; use one of {tuple(POLICY_LOSSES)}.")
    _require(l.agg in AGGREGATIONS, f"unknown loss aggregation {l.agg!r}; use one of {tuple(AGGREGATIONS)}.")
    pipeline.validate(config)  # rollout.staleness (before the correction it needs)
    mismatch.validate(config)  # rollout.is_correction / is_cap / exact_logprobs
    _require(a.estimator != "grpo_passk" or config.rollout.group_size >= 2,
             "advantage.estimator 'grpo_passk' needs rollout.group_size >= 2.")
    _require(a.estimator != "remax" or ro.get("greedy_baseline", False),
             "advantage.estimator 'remax' needs rollout.greedy_baseline=True (the reward of a greedy response per prompt).")
    _require(l.kl_kind in kl_lib.kl_kinds(), f"unknown KL estimator {l.kl_kind!r}; use one of {kl_lib.kl_kinds()}.")
    _require(f.kind in GROUP_FILTERS, f"unknown filter {f.kind!r}; use one of {tuple(GROUP_FILTERS)}.")
    _require(r.kind in ("binary", "signed"), f"reward.kind must be 'binary' or 'signed', got {r.kind!r}.")
    shapings = tuple(k for k in REWARD_SHAPINGS if k not in ("binary", "signed"))
    for name in r.shaping:
        _require(name in shapings, f"unknown reward shaping {name!r}; use one of {shapings}.")
    _require(("overlong" in r.shaping) == (r.overlong_buffer > 0),
             "reward.overlong_buffer > 0 and 'overlong' in reward.shaping go together (the buffer is its setting).")
    _validate_method_parts(config, (a.estimator, f.kind) + tuple(r.shaping))
    _require(not ro.get("greedy_baseline", False) or config.model.attention == "causal",
             "rollout.greedy_baseline is for autoregressive (causal) policies.")
    _require(ro.group_size >= 1 and ro.prompts_per_step >= 1, "rollout.group_size and prompts_per_step must be >= 1.")
    _require(ro.max_prompt_len >= 1 and ro.max_new_tokens >= 1, "rollout lengths must be positive.")
    _require(ro.lanes >= 1 and ro.group_size % ro.lanes == 0,
             f"rollout.lanes ({ro.lanes}) must be >= 1 and divide rollout.group_size ({ro.group_size}).")
    _require(ro.lanes == 1 or config.model.attention == "causal",
             "rollout.lanes > 1 is for autoregressive (causal) policies; diffusion samplers decode in one lane.")
    _require(l.eps_low > 0 and l.eps_high > 0, f"clip ranges must be positive, got {l.eps_low} and {l.eps_high}.")
    _require(l.dual_clip_c == 0 or l.dual_clip_c > 1, f"loss.dual_clip_c must be 0 (off) or > 1, got {l.dual_clip_c}.")
    _require(o.lr > 0, f"optim.lr must be positive, got {o.lr}.")
    _require(config.train.eval_every >= 0, f"train.eval_every must be >= 0 (0: off), got {config.train.eval_every}.")
    _require(ro.prompts_per_step % o.mini_batches == 0,
             f"{ro.prompts_per_step} prompts per step do not split into {o.mini_batches} mini-batches.")
    rows = ro.prompts_per_step * ro.group_size // o.mini_batches
    _require(rows % o.micro_batches == 0,
             f"a mini-batch of {rows} rows does not split into {o.micro_batches} micro-batches.")
    _require(0 <= r.overlong_buffer <= ro.max_new_tokens,
             f"reward.overlong_buffer ({r.overlong_buffer}) must be within [0, max_new_tokens].")
    _validate_mesh(config)
    sampler_layout.validate(ro, config.model.attention, jax.device_count())
    _validate_share_prefix(config)
    _validate_sources(config)
    _validate_precision(config, ro.prompts_per_step * ro.group_size)
    _require(config.model.attention == "causal" or config.algorithm == "tracerl",
             f"a {config.model.attention}-attention (masked-diffusion) policy trains with algorithm 'tracerl', "
             f"not {config.algorithm!r}.")
    methods.validate(config)


def _validate_share_prefix(config) -> None:
    """rollout.share_prefix decodes over the prompt cache of a shared prefill, one per whole group in every lane
    and on every row shard of the sampler's mesh (the train mesh's data x fsdp, or the decode layout's data axis)."""
    ro = config.rollout
    if not ro.share_prefix:
        return
    _require(ro.share_prefill,
             "rollout.share_prefix needs rollout.share_prefill=True (it decodes over its prompt cache).")
    _require(not ro.compact_rows, "rollout.share_prefix and rollout.compact_rows do not combine (compaction breaks "
                                  "the groups whose prompt cache is shared).")
    rows = ro.sample_batch_rows or ro.prompts_per_step * ro.group_size
    _require(rows % (ro.lanes * ro.group_size) == 0,
             f"rollout.share_prefix needs whole groups of {ro.group_size} rows in each of the {ro.lanes} lanes of a "
             f"sampler call of {rows} rows.")
    m = config.mesh
    data, fsdp, _ = resolve_mesh_shape(m.data, m.fsdp, m.tensor, jax.device_count())
    shards = data * fsdp if ro.layout == "train" else jax.device_count() // ro.decode_tensor
    _require(rows % shards or (rows // ro.group_size) % shards == 0,
             f"rollout.share_prefix needs whole groups of {ro.group_size} rows on each of the {shards} row shards of "
             f"a sampler call of {rows} rows.")


def _validate_method_parts(config, names) -> None:
    """A part registered by a method (DLER's shapings, LSPO's filter, HAPO's estimator) reads the method's section."""
    for m in methods.METHODS.values():
        for name in set(names) & set(m.parts):
            _require(m.name in config, f"{name!r} is a part of {m.name}, whose settings live in the `{m.name}` "
                                       f"section: apply its recipe (algorithms.apply_recipe(config, ...)) first.")



def _validate_precision(config, rollout_rows: int) -> None:
    """Storage / compute dtypes, log-prob chunk sizes and the no-grad pass micro-batch (`train/logprobs.py`)."""
    m, micro = config.model, config.optim.logp_micro_batch_rows
    _require(m.param_dtype in COMPUTE_DTYPES,
             f"unknown model.param_dtype {m.param_dtype!r}; use one of {tuple(COMPUTE_DTYPES)}.")
    LogpSpec(m.logits_chunk, m.vocab_chunk, m.compute_dtype).validate()
    _require(isinstance(micro, int) and micro >= 0 and (micro == 0 or rollout_rows % micro == 0),
             f"optim.logp_micro_batch_rows ({micro}) must be 0 (one pass) or divide the {rollout_rows} rollout rows.")


def _validate_mesh(config) -> None:
    m = config.mesh
    resolve_mesh_shape(m.data, m.fsdp, m.tensor, jax.device_count())


def _validate_sources(config) -> None:
    validate_task(config)
    init = config.model.init
    if init == "sft":
        d = config.model.sft_dir
        _require(os.path.isfile(os.path.join(d, "config.json")),
                 f"model.init='sft' but {d!r} holds no checkpoint; run experiments/sft.py (see README) first.")
    elif init.startswith("hf:"):
        _require(os.path.isdir(init[3:]), f"model.init points to {init[3:]!r}, which is not a directory.")
    else:
        _require(init == "random", f"model.init must be 'sft', 'random' or 'hf:<dir>', got {init!r}.")


@dataclasses.dataclass
class Task:
    tokenizer: object
    train: list[Example]
    heldout: list[Example]
    scorer: Callable[[list[str], list[str]], np.ndarray]
    count_fn: Callable[[str], int] | None = None


def tokenizer_for(config):
    """The tokenizer next to the SFT checkpoint, an explicit directory, or the arithmetic character tokenizer."""
    if config.task.tokenizer_dir:
        return load_tokenizer(config.task.tokenizer_dir)
    if config.model.init == "sft":
        return load_tokenizer(config.model.sft_dir)
    if config.model.init.startswith("hf:"):
        return load_tokenizer(config.model.init[3:])
    return build_char_tokenizer(tempfile.mkdtemp(prefix="jaxrl_reason_char_tokenizer_"))


def arithmetic_scorer(texts: list[str], answers: list[str]) -> np.ndarray:
    return np.asarray([arithmetic.score(t, a) for t, a in zip(texts, answers)], np.float32)


def build_task(config) -> Task:
    """Training prompts, held-out problems (disjoint) and the scorer of `config.task`."""
    tok = tokenizer_for(config)
    t = config.task
    if t.name == "arithmetic":
        train, heldout = arithmetic.split_disjoint(NUM_TRAIN_PROBLEMS, config.eval.num_problems, t.train_levels,
                                                   train_seed=config.seed, heldout_seed=t.eval_seed)
        if tuple(t.eval_levels) != tuple(t.train_levels):
            _, heldout = arithmetic.split_disjoint(0, config.eval.num_problems, t.eval_levels,
                                                   heldout_seed=t.eval_seed)
        scorer = scorer_for(config) if config.reward.get("fn", "") else arithmetic_scorer
        return Task(tok, [arithmetic.to_example(p) for p in train], [arithmetic.to_example(p) for p in heldout],
                    scorer, arithmetic.recheck_count)
    train, heldout = build_examples(config, tok)  # files or reasoning-gym, rendered, length-checked
    return Task(tok, train, heldout, scorer_for(config))


def load_policy(config, tokenizer) -> tuple[Transformer, TransformerConfig]:
    """The initial policy: the SFT checkpoint, a Hugging Face checkpoint, or a random model."""
    init, m = config.model.init, config.model
    layout = dict(scan_layers=bool(m.get("scan_layers", False)), remat=m.get("remat", "none"))
    if "remat_names" in m:
        layout["remat_names"] = tuple(m.remat_names)
    if init == "sft":
        return load_hf(config.model.sft_dir, attention_impl=m.get("attention_impl", "auto"), **layout)
    if init.startswith("hf:"):
        return load_hf(init[3:], param_dtype=config.model.param_dtype,
                       attention_impl=m.get("attention_impl", "auto"), **layout)
    cfg = TransformerConfig(vocab_size=m.vocab_size or len(tokenizer), hidden_size=m.hidden_size,
                            intermediate_size=m.intermediate_size, num_layers=m.num_layers, num_heads=m.num_heads,
                            num_kv_heads=m.num_kv_heads, rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings,
                            attention=m.attention, block_size=m.block_size, param_dtype=m.param_dtype,
                            mask_token_id=tokenizer.mask_token_id, attention_impl=m.get("attention_impl", "auto"),
                            **layout)
    cfg.validate()
    return Transformer(cfg, rngs=nnx.Rngs(config.seed)), cfg
