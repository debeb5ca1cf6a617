"""TraceRL training path for masked-diffusion policies, block or full attention, with or without a value model.

diffusion.md §6.5 (trajectory log-probs), §7.1–§7.4 (pipeline, rows, loss, value model), §10 (static shapes).
`diffusion_parts` bundles everything the shared RL loop (`train/loop.py`) needs from a diffusion policy:

    rollout (sampling/diffusion.py, with step_map) -> rows["step_map"]
    build_batch: trace_groups (shrink s) -> trace_rows -> drop empty rows -> pack into W = K_max * N rows
                 (fixed per RL step; padding rows have no target, i.e. zero weight) -> old log-probs (one no-grad
                 pass of the current policy, §7.3) -> group z-score of the reward with the POPULATION std (§7.1)
                 [-> old values, outcome reward on the last step, step-level GAE: per-token A_j (§7.4)]
    split:       mini-batches of whole rows, real rows spread evenly, each with its global row count
    loss_fn:     block: two-stream [prompt; clean response; noisy response] with `tracerl_mask` (§5.5);
                 full attention: [prompt; noisy response] with bidirectional attention (§5.2);
                 token_logp on the noisy stream -> tracerl_policy_loss (block: / R, full: / |targets|)
                 [+ value_coef * tracerl_value_loss]

Estimators (`TraceSpec.estimator`, config `tracerl.estimator`): "trace" (TraceRL, above) or "onestep" (d1 /
diffu-GRPO, §6.2): one row per response with the WHOLE response masked and each prompt token masked with
`p_mask_prompt`; block models then score every block from the state "earlier blocks clean, this block fully
masked" [design]. The mask is drawn once per RL step from a key derived from the rollout tokens, so old and new
log-probs see the same input (d1 `mask_seeds`) and resumed runs repeat. Everything else (advantage, clipped loss,
normalisation) is shared, so "TraceRL vs one-step" is a one-field config edit; d1's own hyper-parameters (no std
in the advantage, reference-model KL, mu > 1 inner iterations) are not reproduced.

[design] Response slots are always visible keys in both streams, as in our samplers (every response slot is
`valid` there); only prompt padding is key-masked. The replayed state of a block equals the sampler's state
exactly except in the block holding EOS, whose post-EOS slots are masks here but were decoded there (the official
pipeline key-masks response pads instead; both are approximations of that one block).

Batch layout (W packed rows, P prompt, R response): prompt_in_WxP (model input; d1 masks some tokens),
prompt_mask_WxP, clean_WxR, noisy_WxR, target_WxR, adv_WxR, logp_old_WxR, [values_old_WxR, returns_WxR],
row_valid_W, seq_index_W, row_index_W; mini-batches add num_rows_W (global count of real rows, broadcast).
"""
from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_reason.core import diffusion as diff_lib
from jaxrl_reason.core import tracerl as tr
from jaxrl_reason.models import attention
from jaxrl_reason.sampling.diffusion import make_block_generate_fn, make_llada_generate_fn
from jaxrl_reason.sampling.processors import SamplingParams
from jaxrl_reason.train.build import validate_tracerl_config
from jaxrl_reason.train.logprobs import LogpSpec, cast_floating, chunked_token_logps
from jaxrl_reason.train.parts import PolicyParts

ESTIMATORS = ("trace", "onestep")
KINDS = {"block": "block", "bidirectional": "full"}
FWD_KEYS = ("prompt_in_WxP", "prompt_mask_WxP", "clean_WxR", "noisy_WxR")
LOSS_KEYS = FWD_KEYS + ("target_WxR", "adv_WxR", "logp_old_WxR", "values_old_WxR", "returns_WxR")


@dataclasses.dataclass(frozen=True)
class TraceSpec:
    """Static description of the rows, forwards and loss (hashable: a static argument of the jitted pieces).

    kind: "block" (two-stream, §5.5) | "full" (bidirectional, §5.2). block_size: training block (= rollout block;
    None for full attention). shrink: s of §6.5. num_rows: K_max replay rows per response (`num_rows_bound`).
    norm: "response_len" (block, rl_trado) | "targets" (full attention, rl_llada), §7.3. logp: chunk sizes and
    compute dtype of the log-prob and value passes (`train/logprobs.py`).
    """
    kind: str
    block_size: int | None
    shrink: int
    num_rows: int
    mask_token_id: int
    group_size: int
    estimator: str = "trace"
    eps: float = 0.2
    beta: float = 0.01
    norm: str = "response_len"
    adv_eps: float = 1e-6
    gamma: float = 1.0
    lam: float = 1.0
    value_clip: float = 0.2
    value_coef: float = 1.0
    value_norm: str = "response_len"
    p_mask_prompt: float = 0.15
    seed: int = 0
    forward_rows: int = 64
    logp: LogpSpec = LogpSpec()

    def validate(self) -> TraceSpec:
        """Raises ValueError with one sentence on an impossible setting; returns self."""
        if self.kind not in ("block", "full"):
            raise ValueError(f"TraceSpec.kind must be 'block' or 'full', got {self.kind!r}.")
        if (self.kind == "block") != isinstance(self.block_size, int):
            raise ValueError("TraceSpec.block_size must be an int for block models and None for full attention.")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"Unknown TraceRL estimator {self.estimator!r}; expected one of {ESTIMATORS}.")
        if self.norm not in tr.NORMS or self.value_norm not in tr.NORMS:
            raise ValueError(f"TraceSpec norms must be in {tr.NORMS}, got {self.norm!r} and {self.value_norm!r}.")
        for name in ("shrink", "num_rows", "group_size", "forward_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"TraceSpec.{name} must be >= 1, got {getattr(self, name)}.")
        self.logp.validate()
        return self


def trace_spec(config, mask_token_id: int) -> TraceSpec:
    """The TraceSpec of an experiment config (`config.tracerl`, diffusion.md §7.3 defaults per model kind)."""
    t, r = config.tracerl, config.rollout
    kind = KINDS[config.model.attention]
    if kind == "block":
        block, max_steps = config.model.block_size, t.steps_per_block
    else:
        block, max_steps = None, r.max_new_tokens if t.remasking == "dynamic" else t.llada_steps
    k = 1 if t.estimator == "onestep" else tr.num_rows_bound(block, int(t.shrink), int(max_steps))
    norm = t.norm if t.norm != "auto" else ("response_len" if kind == "block" else "targets")
    return TraceSpec(kind=kind, block_size=block, shrink=int(t.shrink), num_rows=k, mask_token_id=int(mask_token_id),
                     group_size=r.group_size, estimator=t.estimator, eps=t.eps, beta=t.beta, norm=norm,
                     adv_eps=t.adv_eps, gamma=config.advantage.gamma, lam=config.advantage.lam,
                     value_clip=t.value_clip, value_coef=t.value_coef, value_norm=t.value_norm,
                     p_mask_prompt=t.p_mask_prompt, seed=config.seed, forward_rows=t.forward_rows,
                     logp=LogpSpec(config.model.logits_chunk, config.model.vocab_chunk,
                                   config.model.compute_dtype)).validate()


# ------------------------------------------------------------------------------------------------ host side
def group_zscore(reward_N, group_size: int, eps: float = 1e-6) -> np.ndarray:
    """`(r - mean_g) / (std_g + eps)` with the POPULATION std (diffusion.md §7.1 item 2, dLLM-RL `rl_reward.py`).

    Centred on the first group member first, so an all-equal group gives exactly 0. Returns float32 `[N]`.
    """
    r = np.asarray(reward_N, np.float64)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"reward_N must be a flat array whose length is a multiple of {group_size}, got {r.shape}.")
    r = r.reshape(-1, group_size)
    c = r - r[:, :1]
    c = c - c.mean(axis=1, keepdims=True)
    std = np.sqrt(np.mean(c * c, axis=1, keepdims=True))
    return (c / (std + eps)).reshape(-1).astype(np.float32)


def _data_key(rows: dict, seed: int) -> jax.Array:
    """A key that depends only on the rollout tokens (same batch -> same d1 prompt mask, also after a resume)."""
    digest = zlib.crc32(np.ascontiguousarray(rows["prompt_tokens"]).tobytes()
                        + np.ascontiguousarray(rows["tokens"]).tobytes())
    return jax.random.fold_in(jax.random.PRNGKey(seed), digest & 0x7FFFFFFF)


@functools.partial(jax.jit, static_argnums=0)
def _replay(spec: TraceSpec, key, prompt_NxP, pmask_NxP, response_NxR, valid_NxR, step_map_NxR):
    """Replay rows `[N, K, R]` (noisy, target), row_valid `[N, K]` and the prompt fed to the model `[N, P]`."""
    m = spec.mask_token_id
    if spec.estimator == "onestep":
        inputs, _ = diff_lib.d1_onestep_inputs(key, prompt_NxP, pmask_NxP, response_NxR, m, spec.p_mask_prompt)
        p = prompt_NxP.shape[1]
        return inputs[:, :p], inputs[:, None, p:], valid_NxR[:, None], jnp.any(valid_NxR, -1)[:, None]
    group = tr.trace_groups(step_map_NxR, valid_NxR, spec.block_size, spec.shrink)
    noisy, target, row_valid = tr.trace_rows(response_NxR, group, valid_NxR, m, spec.num_rows)
    return prompt_NxP, noisy, target, row_valid


def pack_batch(rows: dict, spec: TraceSpec) -> dict:
    """TraceRL rows of a rollout batch packed into exactly `W = num_rows * N` rows (diffusion.md §7.2, §10).

    Rows without a target are dropped; the rest keep (response, row) order and zero-weight padding rows (no target,
    `row_valid_W = False`) fill up to W, a bound no batch can exceed, so the jitted step sees one shape.
    """
    if spec.estimator == "trace" and "step_map" not in rows:
        raise ValueError("rows carry no 'step_map'; the rollout must keep Rollout.step_map_BxR for TraceRL.")
    valid = np.asarray(rows["response_mask"], bool)
    step_map = rows.get("step_map", np.zeros(valid.shape, np.int32))
    prompt_in, noisy, target, row_valid = jax.device_get(_replay(
        spec, _data_key(rows, spec.seed), rows["prompt_tokens"], np.asarray(rows["prompt_mask"], bool),
        rows["tokens"], valid, step_map))
    n = valid.shape[0]
    packed = tr.pack_rows(noisy, target, row_valid, spec.num_rows * n, num_micro_batches=1)
    packed = {k: v[0] for k, v in packed.items()}
    s = packed["seq_index"]
    return {"prompt_in_WxP": np.asarray(prompt_in)[s], "prompt_mask_WxP": np.asarray(rows["prompt_mask"], bool)[s],
            "clean_WxR": np.asarray(rows["tokens"], np.int32)[s], "noisy_WxR": packed["noisy"],
            "target_WxR": packed["target"], "row_valid_W": packed["row_valid"], "seq_index_W": s,
            "row_index_W": packed["row_index"]}


# ------------------------------------------------------------------------------------------------ forwards
def row_inputs(spec: TraceSpec, batch: dict):
    """tokens, positions, attention mask of the rows and the index where the noisy stream starts.

    Block (§5.5): `[prompt; clean; noisy]` with `tracerl_mask`; full attention (§5.2): `[prompt; noisy]`,
    bidirectional. Prompt positions `cumsum(valid) - 1`, response token j at `len(prompt) + j` in both copies.
    """
    prompt, pmask, noisy = batch["prompt_in_WxP"], batch["prompt_mask_WxP"], batch["noisy_WxR"]
    w, p = prompt.shape
    r = noisy.shape[1]
    ppos = attention.positions_from_mask(pmask)
    rpos = jnp.sum(pmask, axis=-1, keepdims=True, dtype=jnp.int32) + jnp.arange(r, dtype=jnp.int32)
    if spec.kind == "block":
        tokens = jnp.concatenate([prompt, batch["clean_WxR"], noisy], axis=1)
        key_valid = jnp.concatenate([pmask, jnp.ones((w, 2 * r), bool)], axis=1)
        return (tokens, jnp.concatenate([ppos, rpos, rpos], 1),
                attention.tracerl_mask(p, r, spec.block_size, key_valid), p + r)
    key_valid = jnp.concatenate([pmask, jnp.ones((w, r), bool)], axis=1)
    return (jnp.concatenate([prompt, noisy], axis=1), jnp.concatenate([ppos, rpos], 1),
            attention.bidirectional(key_valid), p)


def row_logits(graphdef, spec: TraceSpec, params, batch: dict) -> jax.Array:
    """Float32 logits `[W, R, V]` of the noisy stream (the plain form of `row_logp`, for checks)."""
    model = nnx.merge(graphdef, params)
    tokens, pos, mask, start = row_inputs(spec, batch)
    h, _ = model.hidden(tokens, pos, mask)
    return model.logits(h[:, start:])


def row_logp(graphdef, spec: TraceSpec, params, batch: dict) -> jax.Array:
    """`log pi(o_j | replayed state)` `[W, R]` float32 (diffusion.md §6.5; targets are the clean response).

    The LM head runs on the noisy stream only, in the chunks of `spec.logp`, so no `[W, R, V]` logits exist; the
    params are cast to its compute dtype inside (gradients keep the params' dtype).
    """
    model = nnx.merge(graphdef, cast_floating(params, spec.logp.dtype))
    tokens, pos, mask, start = row_inputs(spec, batch)
    h, _ = model.hidden(tokens, pos, mask)
    logp, _ = chunked_token_logps(h[:, start:], model.lm_head_weight(), batch["clean_WxR"],
                                  token_chunk=spec.logp.logits_chunk, vocab_chunk=spec.logp.vocab_chunk)
    return logp


def row_values(value_graphdef, spec: TraceSpec, params, batch: dict) -> jax.Array:
    """Value-model outputs at the noisy-stream positions `[W, R]` (diffusion.md §7.4: same rows and masks)."""
    tokens, pos, mask, start = row_inputs(spec, batch)
    model = nnx.merge(value_graphdef, cast_floating(params, spec.logp.dtype))
    return model(tokens, pos, mask)[:, start:].astype(jnp.float32)


def chunked_forward(fn, params, batch: dict, chunk: int) -> np.ndarray:
    """`fn(params, rows)` over the FWD_KEYS of all W rows in fixed chunks (last one padded), numpy `[W, R]`."""
    w = batch["noisy_WxR"].shape[0]
    chunk = min(chunk, w)
    out = []
    for s in range(0, w, chunk):
        idx = np.arange(s, s + chunk) % w
        part = {k: batch[k][idx] for k in FWD_KEYS}
        out.append(np.asarray(jax.device_get(fn(params, part)))[: min(chunk, w - s)])
    return np.concatenate(out, axis=0)


@functools.partial(jax.jit, static_argnums=0)
def _value_targets(spec: TraceSpec, z_N, values_NxR, step_map_NxR, valid_NxR):
    """Step-level GAE (§7.4): global dense rank of the shrunk steps, outcome reward on the last step."""
    shrunk = tr.shrink_step_map(step_map_NxR, valid_NxR, spec.block_size, spec.shrink)
    rank = tr.trace_groups(shrunk, valid_NxR, None, 1)
    token_reward = tr.outcome_reward_on_last_step(z_N, rank, valid_NxR)
    return tr.step_level_gae(token_reward, values_NxR, rank, valid_NxR, spec.gamma, spec.lam)


def value_advantages(spec: TraceSpec, batch: dict, rows: dict, z_N, values_WxR):
    """Per-token advantages and returns `[N, R]` from the old values of the packed rows (diffusion.md §7.4)."""
    valid = np.asarray(rows["response_mask"], bool)
    n, r = valid.shape
    grid = np.zeros((n, spec.num_rows, r), np.float32)
    tgt = np.zeros((n, spec.num_rows, r), bool)
    real = batch["row_valid_W"]
    grid[batch["seq_index_W"][real], batch["row_index_W"][real]] = values_WxR[real]
    tgt[batch["seq_index_W"][real], batch["row_index_W"][real]] = batch["target_WxR"][real]
    v_NxR = tr.merge_row_values(grid, tgt)
    adv, ret = _value_targets(spec, z_N, v_NxR, rows["step_map"], valid)
    return np.asarray(adv), np.asarray(ret), np.asarray(v_NxR)


def build_update_batch(rows: dict, params: dict, *, spec: TraceSpec, logp_fn, value_fn=None):
    """Rollout rows -> the packed TraceRL batch with old log-probs and advantages (diffusion.md §7.1–§7.4).

    Returns (batch, metrics, entropy_NxR): the sampler's raw-policy entropies at commit time (for the loop's
    statistics) and `batch["response_mask_NxR"]` to go with them.
    """
    batch = pack_batch(rows, spec)
    z_N = group_zscore(rows["reward_N"], spec.group_size, spec.adv_eps)
    batch["logp_old_WxR"] = chunked_forward(logp_fn, params["policy"], batch, spec.forward_rows)
    s, mask = batch["seq_index_W"], np.asarray(rows["response_mask"], np.float32)
    metrics = {}
    if value_fn is None:
        adv_NxR = np.broadcast_to(z_N[:, None], mask.shape)
    else:
        values_WxR = chunked_forward(value_fn, params["value"], batch, spec.forward_rows)
        adv_NxR, ret_NxR, v_NxR = value_advantages(spec, batch, rows, z_N, values_WxR)
        batch["values_old_WxR"], batch["returns_WxR"] = values_WxR, ret_NxR[s]
        metrics["value/mean"] = float(np.sum(v_NxR * mask) / max(mask.sum(), 1.0))
    batch["adv_WxR"] = np.ascontiguousarray(adv_NxR[s], np.float32)
    batch["response_mask_NxR"] = mask
    n_real = int(batch["row_valid_W"].sum())
    entropy = np.asarray(rows["entropy"], np.float32)
    metrics.update({
        "tracerl/rows": float(n_real),
        "tracerl/row_fill": n_real / max(len(s), 1),
        "tracerl/rows_per_response": n_real / max(float((mask.sum(-1) > 0).sum()), 1.0),
        "adv/mean": float(np.sum(adv_NxR * mask) / max(mask.sum(), 1.0)),
        "adv/abs_max": float(np.max(np.abs(adv_NxR * mask))),
        "policy/entropy": float(np.sum(entropy * mask) / max(mask.sum(), 1.0)),
    })
    return batch, metrics, entropy


def split_rows(batch: dict, num_mini_batches: int, rng: np.random.Generator) -> list[dict]:
    """Shuffled mini-batches of equal size; real rows spread evenly (then strided micro-batches get their share).

    Each mini-batch carries `num_rows_W` = its number of real rows (global for its micro-batches), so micro-batch
    losses sum to the mini-batch loss (mean over rows, as dLLM-RL's micro-batch-1 gradient accumulation).
    """
    valid = np.asarray(batch["row_valid_W"], bool)
    w = valid.shape[0]
    if w % num_mini_batches:
        raise ValueError(f"{w} TraceRL rows do not split into {num_mini_batches} mini-batches.")
    per = w // num_mini_batches
    real, pad = rng.permutation(np.flatnonzero(valid)), np.flatnonzero(~valid)
    out, used = [], 0
    for part in np.array_split(real, num_mini_batches):
        idx = np.concatenate([part, pad[used : used + per - len(part)]])
        used += per - len(part)
        mb = {k: batch[k][idx] for k in LOSS_KEYS if k in batch}
        mb["num_rows_W"] = np.full((per,), max(len(part), 1), np.float32)
        out.append(mb)
    return out


# ------------------------------------------------------------------------------------------------ loss
def tracerl_loss(params: dict, batch: dict, rng, *, spec: TraceSpec, graphdef, value_graphdef=None):
    """TraceRL loss of one micro-batch (diffusion.md §7.3, + §7.4 value loss); `params = {"policy"[, "value"]}`."""
    del rng
    num_rows = batch["num_rows_W"][0]
    logp = row_logp(graphdef, spec, params["policy"], batch)
    loss, metrics = tr.tracerl_policy_loss(logp, batch["logp_old_WxR"], batch["target_WxR"], batch["adv_WxR"],
                                           spec.eps, spec.beta, spec.norm, num_rows=num_rows)
    if value_graphdef is not None:
        values = row_values(value_graphdef, spec, params["value"], batch)
        v_loss, v_metrics = tr.tracerl_value_loss(values, batch["values_old_WxR"], batch["returns_WxR"],
                                                  batch["target_WxR"], spec.value_clip, spec.value_norm, num_rows)
        loss = loss + spec.value_coef * v_loss
        metrics.update(v_metrics)
    return loss, metrics


# ------------------------------------------------------------------------------------------------ samplers
def _rollout_only(fn):
    """The diffusion samplers return (Rollout, aux); the loop and evaluation want the Rollout."""
    def generate(params, prompt_tokens_BxP, prompt_mask_BxP, key):
        return fn(params, prompt_tokens_BxP, prompt_mask_BxP, key)[0]
    return generate


def make_samplers(config, graphdef, tokenizer):
    """(train, eval, greedy) samplers of a diffusion policy (diffusion.md §4.2–§4.5).

    Block models: block KV cache, `tracerl.remasking` ("dynamic": threshold `tracerl.threshold`, §4.1) for
    training / eval samples, static remasking for greedy (TraDo eval). Full attention: LLaDA semi-AR with
    `tracerl.llada_block_len`, `tracerl.llada_steps` (or Fast-dLLM threshold decoding when dynamic).
    """
    r, t, m = config.rollout, config.tracerl, config.model
    train = SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p)
    sample = SamplingParams(temperature=config.eval.temperature)
    common = dict(prompt_len=r.max_prompt_len, mask_token_id=int(tokenizer.mask_token_id),
                  pad_id=int(tokenizer.pad_token_id), use_cache=bool(t.use_cache), confidence=t.confidence)
    eos = (int(tokenizer.eos_token_id),)
    if KINDS[m.attention] == "block":
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


def diffusion_parts(config, graphdef, tokenizer, *, value_graphdef=None):
    """The `PolicyParts` of a masked-diffusion policy (`config.model.attention` block | bidirectional)."""

    validate_tracerl_config(config)
    if tokenizer.mask_token_id is None:
        raise ValueError("the tokenizer has no mask token, which a masked-diffusion policy needs.")
    spec = trace_spec(config, tokenizer.mask_token_id)
    logp_fn = jax.jit(functools.partial(row_logp, graphdef, spec))
    value_fn = None if value_graphdef is None else jax.jit(functools.partial(row_values, value_graphdef, spec))
    train_gen, eval_gen, greedy_gen = make_samplers(config, graphdef, tokenizer)

    def build_batch(rows, params):
        return build_update_batch(rows, params, spec=spec, logp_fn=logp_fn, value_fn=value_fn)

    def split(batch, rng):
        return split_rows(batch, config.optim.mini_batches, rng)

    loss_fn = functools.partial(tracerl_loss, spec=spec, graphdef=graphdef, value_graphdef=value_graphdef)
    return PolicyParts(train_gen=train_gen, eval_gen=eval_gen, greedy_gen=greedy_gen if config.eval.greedy else None,
                       build_batch=build_batch, loss_fn=loss_fn, split=split)
