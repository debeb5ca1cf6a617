"""Training a masked-diffusion policy on its own decoding trajectories: rows, forwards, advantages and loss.

The machinery is config-free: `TraceSpec` holds every static setting, and `methods/tracerl.py` builds it from a
config and wires these functions into the RL loop's `PolicyParts`. One RL step:

    rollout (sampling/diffusion.py records step_map: the decoding step that unmasked each response token)
    build_update_batch: trace_groups (shrink s) -> trace_rows -> drop empty rows -> pack into W = K_max * N rows
                 (W is fixed per RL step so the jitted step sees one shape; padding rows have no target, i.e. zero
                 weight) -> old log-probs (one no-grad pass of the current policy over the rows, not the
                 sampler's log-probs) -> the GRPO group z-score of the reward (`TraceSpec.std_ddof` picks the std)
                 [-> old values, outcome reward on the last step, step-level GAE: per-token A_j]
    split_rows:  mini-batches of whole rows, real rows spread evenly, each with its global row count
    tracerl_loss: block: two-stream [prompt; clean response; noisy response] with `attention.tracerl_mask`;
                 full attention: [prompt; noisy response] with bidirectional attention;
                 token_logp on the noisy stream -> tracerl_policy_loss (block: / R, full: / |targets|)
                 [+ value_coef * tracerl_value_loss]

Each replayed row is the state the sampler was in when it committed a group of tokens (the prompt plus the tokens
committed earlier, the rest masked), so every token is scored in the context it was decoded in (TraceRL's
trajectory estimate; dLLM-RL `rl_trado.py`, `rl_llada.py`).

Estimators (`TraceSpec.estimator`): "trace" (above) or "onestep" (d1 / diffu-GRPO): one row per response with the
WHOLE response masked and each prompt token masked with `p_mask_prompt`; block models then score every block from
the state "earlier blocks clean, this block fully masked". The mask is drawn once per RL step from a key derived
from the rollout tokens, so old and new log-probs see the same input (d1 `mask_seeds`) and resumed runs repeat.
Everything else (advantage, clipped loss, normalisation) is shared, so "TraceRL vs one-step" is a one-field config
edit; d1's own hyper-parameters (no std in the advantage, reference-model KL, mu > 1 inner iterations) are not
reproduced.

Response slots are always visible keys in both streams, as in our samplers (every response slot is `valid`
there); only prompt padding is key-masked. The replayed state of a block equals the sampler's state exactly except
in the block holding EOS, whose post-EOS slots are masks here but were decoded there (the official pipeline
key-masks response pads instead; both are approximations of that one block).

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

from jaxrl_reason.core import advantages as adv_lib
from jaxrl_reason.core import diffusion as diff_lib
from jaxrl_reason.core import tracerl as tr
from jaxrl_reason.models import attention
from jaxrl_reason.train.logprobs import LogpSpec, cast_floating, chunked_token_logps
from jaxrl_reason.train.step import mark_shares

ESTIMATORS = ("trace", "onestep")
FWD_KEYS = ("prompt_in_WxP", "prompt_mask_WxP", "clean_WxR", "noisy_WxR")
# Metrics normalized by the mini-batch's row count: each micro-batch reports its share, the step sums the shares.
_SHARES = ("pg_loss", "kl", "vf_loss", "num_rows")
LOSS_KEYS = FWD_KEYS + ("target_WxR", "adv_WxR", "logp_old_WxR", "values_old_WxR", "returns_WxR")


@dataclasses.dataclass(frozen=True)
class TraceSpec:
    """Static description of the rows, forwards and loss (hashable: a static argument of the jitted pieces).

    kind: "block" (two-stream layout) | "full" (bidirectional). block_size: training block (= rollout block; None
    for full attention). shrink: consecutive decoding steps merged into one row (s). num_rows: K_max replay rows per
    response (`core.tracerl.num_rows_bound`). eps_low / eps_high: ratio clip. beta: k3 KL to the old policy.
    adv_eps, std_ddof: the group z-score's epsilon and std (0 = population). norm / value_norm: "response_len"
    (block models, rl_trado) | "targets" (full attention, rl_llada). value_clip: None = unclipped value loss.
    logp: chunk sizes and compute dtype of the log-prob and value passes (`train/logprobs.py`).
    """
    kind: str
    block_size: int | None
    shrink: int
    num_rows: int
    mask_token_id: int
    group_size: int
    estimator: str = "trace"
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.01
    norm: str = "response_len"
    adv_eps: float = 1e-6
    std_ddof: int = 0
    gamma: float = 1.0
    lam: float = 1.0
    value_clip: float | None = 0.2
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
        if self.std_ddof not in (0, 1):
            raise ValueError(f"TraceSpec.std_ddof must be 0 (population std) or 1 (Bessel), got {self.std_ddof!r}.")
        self.logp.validate()
        return self


# ------------------------------------------------------------------------------------------------ host side
def group_advantage(reward_N, group_size: int, eps: float = 1e-6, std_ddof: int = 0) -> np.ndarray:
    """The outcome advantage of every response: the core GRPO group z-score `core.advantages.grpo_advantages`.

    It runs in float64 on the host (an `[N]` vector, outside any jitted program), so each float32 advantage is the
    correctly rounded value of the formula. Returns float32 `[N]`.
    """
    r = np.asarray(reward_N, np.float64)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"reward_N must be a flat array whose length is a multiple of {group_size}, got {r.shape}.")
    with jax.enable_x64(True):
        z = adv_lib.grpo_advantages(r, group_size, eps=eps, std_ddof=std_ddof)
        return np.asarray(z, np.float64).astype(np.float32)


def _data_key(rows, seed: int) -> jax.Array:
    """A key that depends only on the rollout tokens (same batch -> same d1 prompt mask, also after a resume)."""
    digest = zlib.crc32(np.ascontiguousarray(rows.prompt_tokens_NxP).tobytes()
                        + np.ascontiguousarray(rows.tokens_NxR).tobytes())
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


def pack_batch(rows, spec: TraceSpec) -> dict:
    """TraceRL rows of a rollout batch (`train.contracts.Rows`) packed into exactly `W = num_rows * N` rows.

    Rows without a target are dropped; the rest keep (response, row) order and zero-weight padding rows (no target,
    `row_valid_W = False`) fill up to W, a bound no batch can exceed, so the jitted step sees one shape.
    """
    if spec.estimator == "trace" and rows.step_map_NxR is None:
        raise ValueError("rows carry no step_map_NxR; the rollout must keep Rollout.step_map_BxR for TraceRL.")
    valid = np.asarray(rows.response_mask_NxR, bool)
    step_map = np.zeros(valid.shape, np.int32) if rows.step_map_NxR is None else rows.step_map_NxR
    prompt_in, noisy, target, row_valid = jax.device_get(_replay(
        spec, _data_key(rows, spec.seed), rows.prompt_tokens_NxP, np.asarray(rows.prompt_mask_NxP, bool),
        rows.tokens_NxR, valid, step_map))
    n = valid.shape[0]
    packed = tr.pack_rows(noisy, target, row_valid, spec.num_rows * n, num_micro_batches=1)
    packed = {k: v[0] for k, v in packed.items()}
    s = packed["seq_index"]
    return {"prompt_in_WxP": np.asarray(prompt_in)[s], "prompt_mask_WxP": np.asarray(rows.prompt_mask_NxP, bool)[s],
            "clean_WxR": np.asarray(rows.tokens_NxR, np.int32)[s], "noisy_WxR": packed["noisy"],
            "target_WxR": packed["target"], "row_valid_W": packed["row_valid"], "seq_index_W": s,
            "row_index_W": packed["row_index"]}


# ------------------------------------------------------------------------------------------------ forwards
def row_inputs(spec: TraceSpec, batch: dict):
    """tokens, positions, attention mask of the rows and the index where the noisy stream starts.

    Block: `[prompt; clean; noisy]` with `tracerl_mask` (a noisy block sees the clean earlier blocks and itself,
    as when the sampler decoded it); full attention: `[prompt; noisy]`, bidirectional. Prompt positions
    `cumsum(valid) - 1`, response token j at `len(prompt) + j` in both copies.
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
    """`log pi(o_j | replayed state)` `[W, R]` float32 (targets are the clean response).

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
    """Value-model outputs at the noisy-stream positions `[W, R]` (the same rows and masks as the policy)."""
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
    """Step-level GAE: global dense rank of the shrunk steps, outcome reward on the last step."""
    shrunk = tr.shrink_step_map(step_map_NxR, valid_NxR, spec.block_size, spec.shrink)
    rank = tr.trace_groups(shrunk, valid_NxR, None, 1)
    token_reward = tr.outcome_reward_on_last_step(z_N, rank, valid_NxR)
    return tr.step_level_gae(token_reward, values_NxR, rank, valid_NxR, spec.gamma, spec.lam)


def per_token(spec: TraceSpec, batch: dict, x_WxR, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(x `[N, R]` float32, targeted `[N, R]` bool): each response token's entry read in the packed row where it is a
    target (`core.tracerl.merge_row_values`); 0 and False for a token no real row targets."""
    r = batch["target_WxR"].shape[1]
    grid = np.zeros((n, spec.num_rows, r), np.float32)
    tgt = np.zeros((n, spec.num_rows, r), bool)
    real = batch["row_valid_W"]
    grid[batch["seq_index_W"][real], batch["row_index_W"][real]] = np.asarray(x_WxR)[real]
    tgt[batch["seq_index_W"][real], batch["row_index_W"][real]] = batch["target_WxR"][real]
    return np.asarray(tr.merge_row_values(grid, tgt)), tgt.any(axis=1)


def value_advantages(spec: TraceSpec, batch: dict, rows, z_N, values_WxR):
    """Per-token advantages and returns `[N, R]` from the old values of the packed rows."""
    valid = np.asarray(rows.response_mask_NxR, bool)
    v_NxR, _ = per_token(spec, batch, values_WxR, valid.shape[0])
    adv, ret = _value_targets(spec, z_N, v_NxR, rows.step_map_NxR, valid)
    return np.asarray(adv), np.asarray(ret), np.asarray(v_NxR)


def replayed_old_logp(spec: TraceSpec, batch: dict, rows) -> tuple[np.ndarray, np.ndarray]:
    """(logp_old_NxR, replayed_NxR): the trainer's old log-prob of every response token in its replay row, and the
    tokens whose replay row is the very state the sampler committed them from (estimator "trace").

    A row merges `shrink` consecutive decoding steps of a block and shows the tokens of earlier groups only, so the
    tokens of the group's first step see what the sampler saw when it committed them, and those of its later steps
    see fewer tokens than the sampler did: only the first are comparable with the sampler's log-probs. Slots after
    an EOS are masks in every row but were decoded by the sampler (the approximation of the module docstring), so
    the tokens of the block holding EOS may differ for that reason too.
    """
    if spec.estimator != "trace":
        raise ValueError("only the trace estimator replays the sampler's decoding states.")
    valid = np.asarray(rows.response_mask_NxR, bool)
    logp_NxR, targeted_NxR = per_token(spec, batch, batch["logp_old_WxR"], valid.shape[0])
    rank = np.asarray(tr.trace_groups(rows.step_map_NxR, valid, spec.block_size, 1))  # distinct step within block
    return logp_NxR, targeted_NxR & valid & (rank % spec.shrink == 0)


def build_update_batch(rows, params: dict, *, spec: TraceSpec, logp_fn, value_fn=None):
    """Rollout rows (`train.contracts.Rows`) -> the packed TraceRL batch with old log-probs and advantages.

    The packed batch is a name -> array dict of its own layout (W replay rows, not the N rollout rows of
    `UpdateBatch`), built and read only by this module.

    Returns (batch, metrics, entropy_NxR): the sampler's raw-policy entropies at commit time (for the loop's
    statistics, with the rows' `response_mask_NxR`).
    """
    batch = pack_batch(rows, spec)
    z_N = group_advantage(rows.reward_N, spec.group_size, spec.adv_eps, spec.std_ddof)
    batch["logp_old_WxR"] = chunked_forward(logp_fn, params["policy"], batch, spec.forward_rows)
    s, mask = batch["seq_index_W"], np.asarray(rows.response_mask_NxR, np.float32)
    metrics = {}
    if value_fn is None:
        adv_NxR = np.broadcast_to(z_N[:, None], mask.shape)
    else:
        values_WxR = chunked_forward(value_fn, params["value"], batch, spec.forward_rows)
        adv_NxR, ret_NxR, v_NxR = value_advantages(spec, batch, rows, z_N, values_WxR)
        batch["values_old_WxR"], batch["returns_WxR"] = values_WxR, ret_NxR[s]
        metrics["value/mean"] = float(np.sum(v_NxR * mask) / max(mask.sum(), 1.0))
    batch["adv_WxR"] = np.ascontiguousarray(adv_NxR[s], np.float32)
    n_real = int(batch["row_valid_W"].sum())
    entropy = np.asarray(rows.entropy_NxR, np.float32)
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
    """TraceRL loss of one micro-batch (+ the value loss); `params = {"policy"[, "value"]}`."""
    del rng
    num_rows = batch["num_rows_W"][0]
    logp = row_logp(graphdef, spec, params["policy"], batch)
    loss, metrics = tr.tracerl_policy_loss(logp, batch["logp_old_WxR"], batch["target_WxR"], batch["adv_WxR"],
                                           spec.eps_low, spec.eps_high, spec.beta, spec.norm, num_rows=num_rows)
    if value_graphdef is not None:
        values = row_values(value_graphdef, spec, params["value"], batch)
        v_loss, v_metrics = tr.tracerl_value_loss(values, batch["values_old_WxR"], batch["returns_WxR"],
                                                  batch["target_WxR"], spec.value_clip, spec.value_norm, num_rows)
        loss = loss + spec.value_coef * v_loss
        metrics.update(v_metrics)
    return loss, mark_shares(metrics, _SHARES)
