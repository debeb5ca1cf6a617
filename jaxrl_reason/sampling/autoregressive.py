"""Autoregressive sampling: prefill + decode with a static KV cache inside one jitted `lax.while_loop`.

Returns the `Rollout` every sampler returns (static shapes; the log-prob of each sampled token), with HAPO's
adaptive temperature through `SamplingParams.hapo_tau` and `hapo_stats`.

Layout: prompts are LEFT-padded to P = max_prompt_len; the cache has S = P + R slots (R = max_new_tokens);
response token j of every row sits at slot P + j with RoPE position prompt_len + j, so left padding changes
nothing. One prefill pass over the prompt fills slots [0, P) and gives the logits of the first token; then
each iteration of a `while_loop` samples token t and runs it through the model (writing slot P + t), and the
loop exits as soon as every row has produced an EOS / stop token.
Rows that have stopped emit the pad id (their model work is wasted but shapes stay static).

Lanes (`lanes` > 1): the batch is cut into that many equal lanes, each decoded by its own loop inside the one
jitted function; XLA:CPU runs the independent loops concurrently, one per core. For a small model, whose decode
ops are too small to split across cores, that is 25-50% more tokens/s at batch 32 on 2 cores (llama-1M); for a
~30M model it is slower (its matmuls already use both cores). Lane l samples with `fold_in(key, l)`, so sampled
tokens depend on `lanes` (greedy ones do not); rows never share noise.

Decode segments: the R steps run as a few static segments of W steps (a Python loop of while_loops); segment k
carries a cache of only P + min((k + 1) W, R) slots, grown once between segments. A decode step reads the whole
cache it carries, and at batch 32 that read (not the matmuls) is what grows with length on XLA:CPU, so
attention only over the used part cuts the per-token cost at long R (and keeps it near flat in R). Each
segment compiles its own copy of the step: `segment_len` trades compile time for speed.

Shared prefill (`share_prefill`): an RL round samples a group of G responses per prompt, and the G rows of a
group hold the same prompt; the prefill then runs on one row per group (B / G rows) and the P-slot cache and
the last-position logits are repeated G times. The decode loop sees the same rows in the same order, so the
per-row sampling noise is unchanged; the prefill's matmuls over B / G instead of B rows may round differently
in the last bit on XLA:CPU (log-probs equal to float rounding, tokens equal unless two logits tie that closely).
Shared-prefix decode (`share_prefix`, with `share_prefill`): the prompt K/V stay one row per group (allocated once,
never repeated nor copied) beside a per-row response cache that grows by segment; each step reads a group's prompt
keys once for its G rows (`models/shared_prefix.py`, one softmax over prompt and response keys). The response part
grows by a copy per segment rather than living in one R-slot buffer: XLA:CPU copies a static slice of a
loop-carried buffer at every step, ~30% fewer tokens/s (llama-1M, 2 groups of 16, P = 256, R = 128, W = 32).

Row sharding: when the parameters carry a NamedSharding on a mesh with the ("data", "fsdp") axes, the jit gets
explicit shardings (prompt rows and every output field over ("data", "fsdp"), parameters as given), so a
data-parallel mesh decodes B / (data x fsdp) rows per device instead of every row on every device.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_reason.models import attention
from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.models.shared_prefix import PrefixLayerCache, PrefixMask
from jaxrl_reason.models.transformer import SLOT_AXIS, LayerCache, init_cache
from jaxrl_reason.sampling.processors import SamplingParams, TokenSample, sample_logits
from jaxrl_reason.sampling.types import STEP_MAP_PAD, Rollout


def _check_args(max_prompt_len, max_new_tokens, eos_ids, pad_id, params):
    if not isinstance(max_prompt_len, int) or max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be a positive int, got {max_prompt_len!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if any(not isinstance(e, (int, np.integer)) or e < 0 for e in eos_ids):
        raise ValueError(f"eos_ids must be non-negative token ids, got {tuple(eos_ids)!r}.")
    if not isinstance(pad_id, (int, np.integer)) or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative token id, got {pad_id!r}.")
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}.")
    params.validate()


def decode_vocab_chunk() -> int | None:
    """Vocabulary slice of the decode LM head (`Transformer.lm_head_slices`): 1024 columns on XLA:CPU, where a
    [32, 512] x [512, 8192] head runs ~3x faster as 8 matmuls; None (one matmul) elsewhere."""
    return 1024 if jax.default_backend() == "cpu" else None


def default_segment_len(max_new_tokens: int) -> int:
    """W of the decode segments: one segment up to 64 new tokens, else at most 4 segments of >= 64 steps."""
    return max(64, -(-max_new_tokens // 4))


def make_generate_fn(graphdef, *, max_prompt_len: int, max_new_tokens: int, eos_ids: Sequence[int],
                     pad_id: int, params: SamplingParams, segment_len: int | None = None, lanes: int = 1,
                     group_size: int = 1, share_prefill: bool = False, share_prefix: bool = False):
    """Returns `fn(params_state, prompt_tokens_BxP, prompt_mask_BxP, key, hapo_stats=None) -> Rollout`.

    `graphdef` comes from `nnx.split(model, nnx.Param)`; `params_state` is the matching `nnx.State` (may be
    sharded). When the parameters live on a mesh with the ("data", "fsdp") axes and the rows split evenly over
    them, the sampler is compiled with explicit shardings: parameters as given, prompts and every output field
    rows-over-("data", "fsdp"), so each device decodes only its own rows (other batch sizes: no explicit
    shardings).
    Prompts are LEFT-padded; a prompt shorter than `max_prompt_len` is left-padded to it on the fly (no
    recompilation), a longer one raises ValueError. `eos_ids` are the EOS and stop tokens: a row stops after
    emitting one (it is part of the response). `hapo_stats` (dict from `core.hapo.entropy_stats` of the previous
    step) turns on HAPO's adaptive temperature when `params.hapo_tau > 0`. The compiled
    function is cached: equal arguments return the same function, so calling this per RL step does not
    recompile. Nothing is donated: the one large buffer, the KV cache, lives inside the jitted function (updated
    in place by XLA), and the parameters are reused by the caller. `segment_len` is W of the decode segments
    (module docstring; None -> `default_segment_len`); the results do not depend on it. `lanes` (module
    docstring) must divide the batch. `share_prefill`: the rows come in contiguous groups of `group_size` rows
    with the same prompt; each prompt is prefilled once and its cache rows copied to the group's samples
    (same rollout as prefilling every row; the caller guarantees equal prompts within a group). `share_prefix`
    (needs `share_prefill`) also decodes with the group's prompt K/V kept once per group (module docstring; the
    same rollout to float rounding); on a data-parallel mesh each row shard must hold whole groups.
    """
    eos_ids = tuple(int(e) for e in eos_ids)
    _check_args(max_prompt_len, max_new_tokens, eos_ids, pad_id, params)
    if segment_len is None:
        segment_len = default_segment_len(max_new_tokens)
    if not isinstance(segment_len, (int, np.integer)) or segment_len < 1:
        raise ValueError(f"segment_len must be a positive int or None, got {segment_len!r}.")
    if not isinstance(lanes, (int, np.integer)) or lanes < 1:
        raise ValueError(f"lanes must be a positive int, got {lanes!r}.")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}.")
    if share_prefix and not share_prefill:
        raise ValueError("share_prefix decodes over the prompt cache of a shared prefill: set share_prefill too.")
    share = int(group_size) if share_prefill else 1
    return _cached_generate_fn(graphdef, max_prompt_len, max_new_tokens, eos_ids, int(pad_id), params,
                               min(int(segment_len), max_new_tokens), int(lanes), share, bool(share_prefix))


@functools.lru_cache(maxsize=32)
def _cached_generate_fn(graphdef, max_prompt_len, max_new_tokens, eos_ids, pad_id, params, segment_len, lanes,
                        share, prefix):
    one_lane = functools.partial(_generate, graphdef=graphdef, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                 pad_id=pad_id, sampling=params, segment_len=segment_len, share=share,
                                 prefix=prefix)
    body = one_lane if lanes == 1 else functools.partial(_in_lanes, one_lane, lanes)
    core = jax.jit(body)
    compiled_for_mesh = {}

    def generate_fn(params_state, prompt_tokens_BxP, prompt_mask_BxP, key, hapo_stats=None) -> Rollout:
        tokens, mask = left_pad(prompt_tokens_BxP, prompt_mask_BxP, max_prompt_len, pad_id)
        rows = tokens.shape[0]
        if rows % lanes:
            raise ValueError(f"The batch of {rows} prompts does not split into {lanes} equal lanes.")
        if (rows // lanes) % share:
            raise ValueError(f"share_prefill needs whole groups of {share} rows in each of the {lanes} lanes of "
                             f"{rows} rows.")
        mesh = rows_mesh(params_state, rows)
        shards = batch_mesh(params_state)[1]
        if prefix and mesh is not None and (rows // share) % shards:
            raise ValueError(f"share_prefix needs whole groups of {share} rows on each of the {shards} row shards "
                             f"of {rows} rows.")
        if mesh is None:
            return core(params_state, tokens, mask, key, hapo_stats)
        case = (mesh, hapo_stats is not None)
        if case not in compiled_for_mesh:
            compiled_for_mesh[case] = jax.jit(body, **sampler_shardings(*case))
        return compiled_for_mesh[case](params_state, tokens, mask, key, hapo_stats)

    generate_fn.lower = lambda params_state, tokens, mask, key, hapo_stats=None: (  # the program, to inspect
        jax.jit(body, **sampler_shardings(rows_mesh(params_state, tokens.shape[0]), hapo_stats is not None))
        .lower(params_state, tokens, mask, key, hapo_stats))
    return generate_fn


def batch_mesh(params_state):
    """(mesh, data x fsdp) of the parameters when they carry a NamedSharding on a mesh with the batch axes,
    else (None, 1)."""
    leaves = jax.tree.leaves(params_state)
    sh = getattr(leaves[0], "sharding", None) if leaves else None
    if not isinstance(sh, jax.sharding.NamedSharding) or not set(sharding_lib.BATCH_AXES) <= set(sh.mesh.axis_names):
        return None, 1
    return sh.mesh, int(np.prod([sh.mesh.shape[a] for a in sharding_lib.BATCH_AXES]))


def rows_mesh(params_state, rows: int):
    """The mesh of the parameters when it has the batch axes and `rows` split evenly over them, else None."""
    mesh, shards = batch_mesh(params_state)
    return mesh if rows % shards == 0 else None


def sampler_shardings(mesh, with_hapo: bool) -> dict:
    """jit in/out shardings of the sampler on `mesh`: parameters as given (None), prompt rows and every output
    field rows-over-("data", "fsdp"), the key and HAPO statistics replicated."""
    if mesh is None:
        return {}
    rows = lambda ndim: sharding_lib.batch_sharding(mesh, ndim)  # noqa: E731
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out = Rollout(*(rows(1) if name in ("length_B", "truncated_B") else rows(2) for name in Rollout._fields))
    return dict(in_shardings=(None, rows(2), rows(2), replicated, replicated if with_hapo else None),
                out_shardings=out)


def _in_lanes(one_lane, lanes, params_state, prompt_tokens_BxP, prompt_mask_BxP, key, hapo_stats) -> Rollout:
    """`one_lane` on `lanes` equal slices of the batch (lane l with key `fold_in(key, l)`), rows concatenated."""
    outs = [one_lane(params_state, tok, mask, jax.random.fold_in(key, lane), hapo_stats)
            for lane, (tok, mask) in enumerate(zip(jnp.split(prompt_tokens_BxP, lanes),
                                                   jnp.split(prompt_mask_BxP, lanes)))]
    return jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *outs)


def left_pad(tokens_BxP, mask_BxP, max_prompt_len, pad_id):
    """Validates shapes and LEFT-pads prompts to `max_prompt_len` (int32 tokens, bool mask)."""
    tokens_BxP, mask_BxP = (x if hasattr(x, "ndim") else np.asarray(x) for x in (tokens_BxP, mask_BxP))
    if tokens_BxP.ndim != 2 or tokens_BxP.shape != mask_BxP.shape:
        raise ValueError(f"prompt tokens {tokens_BxP.shape} and mask {mask_BxP.shape} must be equal [B, P] shapes.")
    p = tokens_BxP.shape[1]
    if p > max_prompt_len:
        raise ValueError(f"The prompts have length {p} but max_prompt_len is {max_prompt_len}.")
    tokens_BxP, mask_BxP = jnp.asarray(tokens_BxP, jnp.int32), jnp.asarray(mask_BxP, bool)
    if p < max_prompt_len:
        widths = ((0, 0), (max_prompt_len - p, 0))
        tokens_BxP = jnp.pad(tokens_BxP, widths, constant_values=pad_id)
        mask_BxP = jnp.pad(mask_BxP, widths, constant_values=False)
    return tokens_BxP, mask_BxP


def _write(buf_BxR, t, col_B):
    """buf[:, t] = col (a dynamic_update_slice, in place inside the loop)."""
    return jax.lax.dynamic_update_slice(buf_BxR, col_B[:, None].astype(buf_BxR.dtype), (0, t))


def record_step(bufs, t, s: TokenSample, alive_B, pad_id):
    """Writes step t of every output buffer; stopped rows get pad / 0 / STEP_MAP_PAD (also used by the exact
    sampler of train/exact_sampler.py)."""
    tok, logp, logp_raw, ent, conf, step = bufs
    zero = jnp.zeros_like(s.logp)
    return (_write(tok, t, jnp.where(alive_B, s.token, pad_id)),
            _write(logp, t, jnp.where(alive_B, s.logp, zero)),
            _write(logp_raw, t, jnp.where(alive_B, s.logp_raw, zero)),
            _write(ent, t, jnp.where(alive_B, s.entropy, zero)),
            _write(conf, t, jnp.where(alive_B, s.prob, zero)),
            _write(step, t, jnp.where(alive_B, t, STEP_MAP_PAD)))


def _grow(cache, slots):
    """The cache with `slots` slots: the old slots first, zeros after (on each field's `SLOT_AXIS`); either
    cache layout (a tuple of per-layer caches, or one stacked `LayerCache`). Of a shared-prefix cache only the
    response part grows (the prompt part is never copied)."""
    def grow(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, slots - x.shape[axis])
        return jnp.pad(x, widths)

    def grow_layer(layer):
        if isinstance(layer, PrefixLayerCache):
            return PrefixLayerCache(layer.prompt, grow_layer(layer.own))
        return LayerCache(*map(grow, layer, SLOT_AXIS))
    return grow_layer(cache) if isinstance(cache, (LayerCache, PrefixLayerCache)) else tuple(map(grow_layer, cache))


def _repeat_rows(cache, n):
    """Each batch row of the cache `n` times in a row (the batch axis is the one before the 4 per-layer axes)."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=x.ndim - 4), cache)


def _prefill_groups(model, head, prompt_tokens_BxP, prompt_mask_BxP, share):
    """Last-position logits and P-slot cache of the first row of each group of `share` rows."""
    tokens_bxP, mask_bxP = prompt_tokens_BxP[::share], prompt_mask_BxP[::share]
    h_bxPxD, cache = model.hidden(tokens_bxP, attention.positions_from_mask(mask_bxP), attention.causal(mask_bxP),
                                  init_cache(model.cfg, tokens_bxP.shape[0], tokens_bxP.shape[1],
                                             dtype=model.embed[...].dtype), 0)  # the weights' (compute) dtype
    return model.logits(h_bxPxD[:, -1:], head)[:, 0], cache


def prefill(model, head, prompt_tokens_BxP, prompt_mask_BxP, share):
    """P-slot cache and last-position logits of every row; with `share` > 1 only the first row of each group of
    `share` rows is run through the model, and its cache and logits are copied to the whole group."""
    logits_bxV, cache = _prefill_groups(model, head, prompt_tokens_BxP, prompt_mask_BxP, share)
    if share == 1:
        return logits_bxV, cache
    return jnp.repeat(logits_bxV, share, axis=0), _repeat_rows(cache, share)


def prefill_shared_prefix(model, head, prompt_tokens_BxP, prompt_mask_BxP, share):
    """Every row's first logits and the shared-prefix cache: the prompt K/V of each group of `share` rows once
    (prefilled from its first row) beside an empty per-row response cache (its slots come with the decode
    segments), in the model's layout (a tuple of per-layer `PrefixLayerCache`, or one with stacked fields)."""
    logits_bxV, prompt = _prefill_groups(model, head, prompt_tokens_BxP, prompt_mask_BxP, share)
    own = init_cache(model.cfg, prompt_tokens_BxP.shape[0], 0, dtype=model.embed[...].dtype)
    cache = (PrefixLayerCache(prompt, own) if isinstance(own, LayerCache)
             else tuple(PrefixLayerCache(p, o) for p, o in zip(prompt, own)))
    return jnp.repeat(logits_bxV, share, axis=0), cache


def _generate(params_state, prompt_tokens_BxP, prompt_mask_BxP, key, hapo_stats, *, graphdef, max_new_tokens,
              eos_ids, pad_id, sampling, segment_len, share, prefix) -> Rollout:
    """The jitted sampler body (see the module docstring)."""
    model = nnx.merge(graphdef, params_state)
    head = model.lm_head_slices(decode_vocab_chunk())  # sliced once, outside the decode loop
    # Prefill into a P-slot cache (attention P x P, not P x (P + R)); only the last prompt position goes through
    # the LM head. The cache then grows segment by segment (shared-prefix: its response part only).
    if prefix:
        logits_BxV, cache = prefill_shared_prefix(model, head, prompt_tokens_BxP, prompt_mask_BxP, share)
    else:
        logits_BxV, cache = prefill(model, head, prompt_tokens_BxP, prompt_mask_BxP, share)
    carry = initial_carry(logits_BxV, cache, max_new_tokens, pad_id)
    for end in segment_ends(max_new_tokens, segment_len):
        carry = decode_segment(model, head, carry, end, prompt_mask_BxP, key, hapo_stats, eos_ids=eos_ids,
                               pad_id=pad_id, sampling=sampling)
    return to_rollout(prompt_tokens_BxP, prompt_mask_BxP, carry[3], carry[4])


def segment_ends(max_new_tokens: int, segment_len: int) -> list[int]:
    """The exclusive last step of each decode segment: W, 2W, ..., R."""
    return [min(end, max_new_tokens) for end in range(segment_len, max_new_tokens + segment_len, segment_len)]


def initial_carry(logits_BxV, cache, max_new_tokens, pad_id):
    """(t = 0, cache, logits, done_B, output buffers) before the first decode step."""
    b, r = logits_BxV.shape[0], max_new_tokens
    bufs = (jnp.full((b, r), pad_id, jnp.int32),) + tuple(jnp.zeros((b, r), jnp.float32) for _ in range(4)) \
        + (jnp.full((b, r), STEP_MAP_PAD, jnp.int32),)
    return jnp.asarray(0, jnp.int32), cache, logits_BxV, jnp.zeros((b,), bool), bufs


def decode_segment(model, head, carry, end, prompt_mask_BxP, key, hapo_stats, *, eos_ids, pad_id, sampling,
                   row_ids_B=None):
    """Decode steps t < end (a while_loop) with a cache of P + end slots (a shared-prefix cache: its response
    slots [0, end) beside the group's prompt slots).

    Step t samples with `fold_in(key, t)` over the whole batch, or with `row_ids_B` row i with
    `fold_in(fold_in(key, t), row_ids_B[i])` (noise that follows the row wherever it sits in the batch).
    """
    b, p = prompt_mask_BxP.shape
    eos_E = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    prompt_len_B = jnp.sum(prompt_mask_BxP, axis=-1, dtype=jnp.int32)
    key_valid_BxS = jnp.concatenate([prompt_mask_BxP, jnp.ones((b, end), bool)], axis=1)
    prefix = _is_prefix_cache(carry[1])
    if prefix:  # response token t sits at own slot t; the prompt part is visible as far as it is valid
        groups = jax.tree.leaves(carry[1])[0].shape[-4]
        prompt_valid_bxP = prompt_mask_BxP[::b // groups]
        mask_at = lambda t: PrefixMask(prompt_valid_bxP, jnp.broadcast_to(  # noqa: E731
            jnp.arange(end) <= t, (b, 1, end)))
    else:
        mask_at = lambda t: attention.cached_causal_mask(key_valid_BxS, p + t, 1)  # noqa: E731

    def cond(carry):
        t, _, _, done_B, _ = carry
        return (t < end) & ~jnp.all(done_B)

    def body(carry):
        """Samples token t from the carried logits, then runs it through the model (slot P + t) for step t + 1.

        One sampling site per segment (a shorter compile); the forward of the last step is unused.
        """
        t, cache, logits_BxV, done_B, bufs = carry
        if row_ids_B is None:
            s = sample_logits(jax.random.fold_in(key, t), logits_BxV, sampling, hapo_stats)
        else:
            keys_B = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(key, t), row_ids_B)
            one = lambda k, x: sample_logits(k, x[None], sampling, hapo_stats)  # noqa: E731
            s = jax.tree.map(lambda x: x[:, 0], jax.vmap(one)(keys_B, logits_BxV))
        alive_B = ~done_B
        bufs = record_step(bufs, t, s, alive_B, pad_id)
        done_B = done_B | jnp.isin(s.token, eos_E)
        h_Bx1xD, cache = model.hidden(jnp.where(alive_B, s.token, pad_id)[:, None], (prompt_len_B + t)[:, None],
                                      mask_at(t), cache, t if prefix else p + t)
        return t + 1, cache, model.logits(h_Bx1xD, head)[:, 0], done_B, bufs

    t, cache, logits_BxV, done_B, bufs = carry
    return jax.lax.while_loop(cond, body, (t, _grow(cache, end if prefix else p + end), logits_BxV, done_B, bufs))


def _is_prefix_cache(cache) -> bool:
    """Whether `cache` is a shared-prefix cache (either layout)."""
    return isinstance(cache, PrefixLayerCache) or (isinstance(cache, tuple) and not isinstance(cache, LayerCache)
                                                   and isinstance(cache[0], PrefixLayerCache))


def to_rollout(prompt_tokens_BxP, prompt_mask_BxP, done_B, bufs) -> Rollout:
    """The Rollout of the final output buffers and stop flags."""
    tokens_BxR, logp_BxR, logp_raw_BxR, entropy_BxR, conf_BxR, step_BxR = bufs
    response_mask_BxR = step_BxR != STEP_MAP_PAD
    return Rollout(prompt_tokens_BxP=prompt_tokens_BxP, prompt_mask_BxP=prompt_mask_BxP, tokens_BxR=tokens_BxR,
                   response_mask_BxR=response_mask_BxR, logp_BxR=logp_BxR, logp_raw_BxR=logp_raw_BxR,
                   entropy_BxR=entropy_BxR, length_B=jnp.sum(response_mask_BxR, axis=-1, dtype=jnp.int32),
                   truncated_B=~done_B, step_map_BxR=step_BxR, confidence_BxR=conf_BxR)


def generate(model, prompt_tokens_BxP, prompt_mask_BxP, key, *, n_samples: int = 1, max_new_tokens: int,
             eos_ids: Sequence[int], pad_id: int, params: SamplingParams = SamplingParams(),
             max_prompt_len: int | None = None, hapo_stats=None, segment_len: int | None = None,
             lanes: int = 1, share_prefill: bool = False, share_prefix: bool = False) -> Rollout:
    """Convenience: samples `n_samples` responses per prompt from an `nnx` model -> Rollout of B * n rows.

    Groups are contiguous: rows `b * n .. b * n + n - 1` answer prompt b. `max_prompt_len` defaults to the
    prompts' width. Uses the cached jitted function of `make_generate_fn` (`segment_len`, `lanes`,
    `share_prefill` and `share_prefix` with `group_size = n_samples`: see there).
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}.")
    graphdef, params_state = nnx.split(model, nnx.Param)
    width = np.shape(prompt_tokens_BxP)[-1]
    fn = make_generate_fn(graphdef, max_prompt_len=width if max_prompt_len is None else max_prompt_len,
                          max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, params=params,
                          segment_len=segment_len, lanes=lanes, group_size=n_samples, share_prefill=share_prefill,
                          share_prefix=share_prefix)
    tokens = jnp.repeat(jnp.asarray(prompt_tokens_BxP), n_samples, axis=0)
    mask = jnp.repeat(jnp.asarray(prompt_mask_BxP), n_samples, axis=0)
    return fn(params_state, tokens, mask, key, hapo_stats)
