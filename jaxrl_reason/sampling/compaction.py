"""AR sampling in which finished rows stop costing work: the alive rows are compacted between decode segments.

The sampler of `sampling/autoregressive.py` decodes every row until the slowest one stops; a row that emitted
EOS keeps running the model on padding. Here the same prefill and the same decode segments run as separate
jitted calls, and between two segments the host reads the stop flags and gathers the rows still alive (their
cache, logits and output buffers) into a smaller batch: the next segment runs on that many rows rounded up to a
bucket (`shards` x a power of two, so that a few shapes compile and a data-parallel mesh still splits the rows
evenly); the bucket's extra rows are copies of finished rows, which stay finished. Finished rows' outputs are
written back to their places in the batch.

Sampling noise follows the row, not its place in the batch: row i draws step t with
`fold_in(fold_in(key, t), i)`, so compaction does not change what a row samples (greedy decoding is unaffected
by noise). This differs from the one-call sampler's noise (one draw over the whole batch per step), so the two
give different samples for the same key, from the same distribution.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_reason.sampling import autoregressive as ar
from jaxrl_reason.sampling.processors import SamplingParams
from jaxrl_reason.sampling.types import Rollout


def make_compacting_generate_fn(graphdef, *, max_prompt_len: int, max_new_tokens: int, eos_ids: Sequence[int],
                                pad_id: int, params: SamplingParams, segment_len: int | None = None,
                                lanes: int = 1, group_size: int = 1, share_prefill: bool = False,
                                share_prefix: bool = False):
    """`fn(params_state, prompt_tokens_BxP, prompt_mask_BxP, key, hapo_stats=None) -> Rollout` like
    `autoregressive.make_generate_fn` (same arguments), with the alive rows compacted between decode segments.

    After each call `fn.last_stats` holds {"row_steps": rows x steps decoded, "full_row_steps": what the batch
    would have cost without compaction, "rows_per_segment": the batch of each segment run}.
    `share_prefix` is refused: compaction breaks the contiguous groups whose prompt cache it shares.
    """
    if share_prefix:
        raise ValueError("Compacting rows breaks the groups a shared-prefix decode reads its prompt cache by; set "
                         "rollout.share_prefix or rollout.compact_rows to False.")
    if lanes != 1:
        raise ValueError(f"Compacting rows decodes in one lane; got lanes={lanes!r} (set rollout.lanes to 1).")
    ar.make_generate_fn(graphdef, max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                        pad_id=pad_id, params=params, segment_len=segment_len, group_size=group_size,
                        share_prefill=share_prefill)  # validates the arguments
    eos_ids = tuple(int(e) for e in eos_ids)
    w = min(int(segment_len or ar.default_segment_len(max_new_tokens)), max_new_tokens)
    share = int(group_size) if share_prefill else 1
    prefill = jax.jit(functools.partial(_prefill, graphdef=graphdef, max_new_tokens=max_new_tokens,
                                        pad_id=int(pad_id), share=share))
    segments = [(end, jax.jit(functools.partial(_segment, graphdef=graphdef, end=end, eos_ids=eos_ids,
                                                pad_id=int(pad_id), sampling=params)))
                for end in ar.segment_ends(max_new_tokens, w)]

    def generate_fn(params_state, prompt_tokens_BxP, prompt_mask_BxP, key, hapo_stats=None) -> Rollout:
        tokens, mask = ar.left_pad(prompt_tokens_BxP, prompt_mask_BxP, max_prompt_len, pad_id)
        b = tokens.shape[0]
        if b % share:
            raise ValueError(f"share_prefill needs whole groups of {share} rows in the batch of {b} rows.")
        shards = ar.batch_mesh(params_state)[1]
        carry = prefill(params_state, tokens, mask)
        out = [np.array(x) for x in jax.device_get(carry[4])] + [np.zeros(b, bool)]  # bufs, done (writable)
        pos_B, row_ids, cur_mask = np.arange(b), jnp.arange(b, dtype=jnp.int32), mask
        stats = {"row_steps": 0, "full_row_steps": 0, "rows_per_segment": []}
        for k, (end, segment) in enumerate(segments):
            t0 = int(carry[0])
            carry = segment(params_state, carry, cur_mask, row_ids, key, hapo_stats)
            steps = int(carry[0]) - t0
            stats["row_steps"] += steps * len(pos_B)
            stats["full_row_steps"] += steps * b
            stats["rows_per_segment"].append(len(pos_B))
            done_B = np.asarray(carry[3])
            alive = np.flatnonzero(~done_B & (pos_B >= 0))
            if alive.size == 0:  # every row has stopped: the later segments would decode nothing
                break
            rows = _bucket(alive.size, shards, len(pos_B))
            if k == len(segments) - 1 or rows == len(pos_B):
                continue
            _write_back(out, pos_B, carry)
            pick = np.concatenate([alive, np.full(rows - alive.size, np.flatnonzero(done_B)[0])])
            carry = _take_rows(carry, jnp.asarray(pick))
            cur_mask, row_ids = cur_mask[pick], row_ids[pick]
            pos_B = np.concatenate([pos_B[alive], np.full(rows - alive.size, -1)])
        _write_back(out, pos_B, carry)
        generate_fn.last_stats = stats
        return ar.to_rollout(tokens, mask, jnp.asarray(out[6]), tuple(jnp.asarray(x) for x in out[:6]))

    generate_fn.last_stats = None
    return generate_fn


def _bucket(alive: int, shards: int, current: int) -> int:
    """The smallest `shards` x 2^j rows holding `alive` rows, at most `current`."""
    rows = shards
    while rows < alive:
        rows *= 2
    return min(rows, current)


def _write_back(out, pos_B, carry) -> None:
    """Copies the output buffers and stop flags of the batch's real rows to their places in `out`."""
    real = pos_B >= 0
    bufs = jax.device_get(carry[4]) + (carry[3],)
    for full, part in zip(out, bufs):
        full[pos_B[real]] = np.asarray(part)[real]


def _take_rows(carry, pick_B):
    """The decode carry of the rows `pick_B` (the cache's batch axis is the one before its 4 per-layer axes)."""
    t, cache, logits_BxV, done_B, bufs = carry
    cache = jax.tree.map(lambda x: jnp.take(x, pick_B, axis=x.ndim - 4), cache)
    return t, cache, logits_BxV[pick_B], done_B[pick_B], tuple(x[pick_B] for x in bufs)


def _prefill(params_state, prompt_tokens_BxP, prompt_mask_BxP, *, graphdef, max_new_tokens, pad_id, share):
    model = nnx.merge(graphdef, params_state)
    head = model.lm_head_slices(ar.decode_vocab_chunk())
    logits_BxV, cache = ar.prefill(model, head, prompt_tokens_BxP, prompt_mask_BxP, share)
    return ar.initial_carry(logits_BxV, cache, max_new_tokens, pad_id)


def _segment(params_state, carry, prompt_mask_BxP, row_ids_B, key, hapo_stats, *, graphdef, end, eos_ids, pad_id,
             sampling):
    model = nnx.merge(graphdef, params_state)
    head = model.lm_head_slices(ar.decode_vocab_chunk())
    return ar.decode_segment(model, head, carry, end, prompt_mask_BxP, key, hapo_stats, eos_ids=eos_ids,
                             pad_id=pad_id, sampling=sampling, row_ids_B=row_ids_B)

