"""The registry of methods (`METHODS`) and what the loop and its stages call on them.

One module per method family holds its recipes, its config section and its hooks (`hooks.Method`):
    dler.py    DLER and DA-DLER: truncation reward shapings (fixed and difficulty-aware budget)
    hapo.py    HAPO: entropy-adaptive temperature, entropy statistics carried between iterations, adaptive clip
               bounds and advantage redistribution inside the loss
    lspo.py    LSPO: the length-percentile group filter, on top of GRPO / DAPO / GSPO
    repro.py   REPRO: the process advantage from answer-likelihood progress, on top of PPO / GRPO
    tracerl.py TraceRL: masked-diffusion policies (its PolicyParts: trajectory rows, block / full-attention loss)

A method is active in a run when its section is in the config (its recipes add it). The functions below are what
the loop and its stages call; they go over the active methods in `METHODS` order and never test a name.
"""
from __future__ import annotations

from jaxrl_reason.methods import dler, hapo, lspo, repro, tracerl
from jaxrl_reason.methods.hooks import Method

METHODS: dict[str, Method] = {m.name: m for m in (dler.METHOD, hapo.METHOD, lspo.METHOD, repro.METHOD,
                                                  tracerl.METHOD)}


def active(config) -> list[Method]:
    """The methods whose section `config` carries."""
    return [m for name, m in METHODS.items() if name in config]


def validate(config) -> None:
    for m in active(config):
        if m.validate is not None:
            m.validate(config)


def sampling_fields(config) -> dict:
    """Extra `SamplingParams` fields of the training sampler."""
    out = {}
    for m in active(config):
        if m.sampling is not None:
            out.update(m.sampling(config))
    return out


def upgrade_meta(meta: dict) -> dict:
    """A restored checkpoint meta with the methods' carried state under "method_state"; the keys older runs stored
    that state under (`legacy_meta_key`) are read into it and dropped."""
    meta = dict(meta)
    legacy = {m.name: meta.pop(m.legacy_meta_key) for m in METHODS.values() if m.legacy_meta_key in meta}
    if meta.get("method_state") is None:
        meta["method_state"] = {k: v for k, v in legacy.items() if v is not None}
    return meta


def next_state(config, entropy_NxR, mask_NxR) -> dict:
    """Each active method's state for the next iteration, from this iteration's update batch."""
    return {m.name: m.next_state(config[m.name], entropy_NxR, mask_NxR) for m in active(config)
            if m.next_state is not None}


def sampler_args(config, state: dict) -> tuple:
    """Extra positional arguments of the training sampler from the carried state."""
    args = ()
    for m in active(config):
        if m.sampler_args is not None:
            args += m.sampler_args(config[m.name], state.get(m.name))
    return args


def policy_hooks(config) -> tuple:
    """The loss-side hooks of the active methods (static: part of the loss function's identity)."""
    hooks = (m.policy_hook(config) for m in active(config) if m.policy_hook is not None)
    return tuple(h for h in hooks if h is not None)


def extra_advantages(config, graphdef, tokenizer, **kwargs) -> list:
    """The advantage terms of the active methods, `fn(rows, policy_params) -> (adv_NxR, metrics)` each."""
    fns = (m.extra_advantage(config, graphdef, tokenizer, **kwargs) for m in active(config)
           if m.extra_advantage is not None)
    return [f for f in fns if f is not None]
