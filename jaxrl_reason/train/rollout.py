"""Host loop of one RL step's data: sample -> reward -> shaping -> filter -> refill -> fixed-shape rows.

Everything here is host-side numpy around two jitted calls (the sampler and the reward shaping's
jnp pieces). Dynamic sampling changes the number of groups, so it happens here, before the jitted update: kept
groups of successive generation rounds are accumulated (`core.filters.accumulate_groups`) until the batch is
full or `max_rounds` rounds were drawn; then a short batch is padded with zero-weight rows (response mask 0, so
they add nothing to any loss or count) and the shortfall is logged: a filter that leaves too few groups trains on
the partial batch rather than stopping the run.

With several JAX processes (multi-host) every process takes the same examples from the stream, but each encodes,
samples and scores only the whole groups its devices hold under the sampler's row sharding over ("data", "fsdp")
(prompts enter as a global array built from process-local data; only addressable shards are read back). The rows
and scores are then gathered to every process in row order, so rewards, group filters, refills, padding and metrics
are computed from the whole round, identically everywhere (`train/multihost.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from jaxrl_reason.core import filters as filters_lib
from jaxrl_reason.core import length as length_lib
from jaxrl_reason.data.example import Example
from jaxrl_reason.data.tokenizer import decode_until_eos, encode_batch_left_padded
from jaxrl_reason.sampling.autoregressive import batch_mesh
from jaxrl_reason.train import multihost
from jaxrl_reason.train.contracts import Rows


class PromptStream:
    """Deterministic, resumable stream of training examples: epoch-wise permutations of a fixed list.

    `position` (examples consumed so far) is the only state; store it in the checkpoint meta and pass it back.
    """

    def __init__(self, examples: Sequence[Example], seed: int, position: int = 0):
        if not examples:
            raise ValueError("the training set is empty.")
        self.examples, self.seed, self.position = list(examples), seed, position

        self._epoch, self._order = -1, None

    def take(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.examples))
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            out.append(self.examples[int(self._order[i])])
            self.position += 1
        return out


def shape_rewards(score_N, length_N, truncated_N, hp):
    """Correctness score -> training reward (numpy in, numpy out) and the shaping metrics: the base
    `REWARD_SHAPINGS[hp.kind]`, then each name of `hp.shaping` in order on the running reward."""
    arrays = {"score_N": np.asarray(score_N, np.float32), "length_N": np.asarray(length_N),
              "truncated_N": np.asarray(truncated_N, bool)}
    metrics = {}
    for name in (hp.kind,) + tuple(hp.shaping):
        arrays["reward_N"], shaping_metrics = length_lib.REWARD_SHAPINGS[name](arrays, hp)
        metrics.update(shaping_metrics)
    return np.asarray(arrays["reward_N"], np.float32), metrics


def group_filter(rows: Rows, hp) -> tuple[np.ndarray, dict]:
    """keep_B for one generation round: `GROUP_FILTERS[hp.kind]` (core filters read a name -> array mapping)."""
    return filters_lib.GROUP_FILTERS[hp.kind](_as_mapping(rows), hp)


def _as_mapping(rows: Rows) -> dict:
    """The rows' set fields by name: the form `core/` takes (it knows no train-layer types)."""
    return {f.name: getattr(rows, f.name) for f in dataclasses.fields(rows) if getattr(rows, f.name) is not None}


@dataclasses.dataclass
class RolloutSpec:
    """What one round of sampling needs (host objects and the jitted sampler)."""

    generate_fn: Callable  # (params, prompt_tokens_BxP, prompt_mask_BxP, key, *sampler_args) -> Rollout
    tokenizer: object
    scorer: Callable[[list[str], list[str]], np.ndarray]  # (texts, answers) -> score_N
    prompts_per_round: int
    group_size: int
    max_prompt_len: int
    max_new_tokens: int
    sample_batch_rows: int = 0  # rows per sampler call (whole groups); 0 = the whole round in one call
    baseline_gen: Callable | None = None  # a greedy sampler: one response per prompt, scored as a reward baseline

    def __post_init__(self):
        rows, b = self.prompts_per_round * self.group_size, self.sample_batch_rows
        if not isinstance(b, (int, np.integer)) or b < 0 or (b and (b % self.group_size or rows % b)):
            raise ValueError(f"rollout.sample_batch_rows ({b!r}) must be 0 or a multiple of rollout.group_size "
                             f"({self.group_size}) that divides the {rows} rows of a round.")


def _sample_in_batches(spec: RolloutSpec, params, ids, mask, key, extra: tuple):
    """The sampler on the round's rows: one call (`sample_batch_rows` 0), or equal sub-batches of whole groups,
    sub-batch k with key `fold_in(key, k)` (all dispatched before the first is read back)."""
    if not spec.sample_batch_rows:
        return jax.device_get(spec.generate_fn(params, ids, mask, key, *extra))
    step = spec.sample_batch_rows
    outs = [spec.generate_fn(params, ids[i:i + step], mask[i:i + step], jax.random.fold_in(key, k), *extra)
            for k, i in enumerate(range(0, len(ids), step))]
    return jax.tree.map(lambda *x: np.concatenate(x, axis=0), *jax.device_get(outs))


def _sample_split(spec: RolloutSpec, generate_fn, params, prompts: list, golds: list, key, extra: tuple,
                  sub_rows: int, group: int):
    """Several processes: each encodes, samples (in sub-batches of `sub_rows` rows, 0 = one call, keyed like
    `_sample_in_batches`) and scores only the rows its devices hold, then the rows and scores are gathered to every
    process in row order (`train/multihost.py`). Returns (Rollout of numpy arrays of all rows, score_N, texts)."""
    rows, step = len(prompts), sub_rows or len(prompts)
    mesh, _ = batch_mesh(params)
    split = multihost.process_rows(mesh, step, group)  # each process's rows of one sampler call
    per_process = [[range(i + r.start, i + r.stop) for i in range(0, rows, step)] for r in split]
    mine = split[jax.process_index()]
    outs = []
    for k, i in enumerate(range(0, rows, step)):
        ids, mask = encode_batch_left_padded(spec.tokenizer, prompts[i + mine.start:i + mine.stop], spec.max_prompt_len)
        ids, mask = multihost.global_from_local((ids, mask), mesh, step)
        outs.append(generate_fn(params, ids, mask, jax.random.fold_in(key, k) if sub_rows else key, *extra))
    local = jax.tree.map(lambda *x: np.concatenate(x, axis=0),
                         *[jax.tree.map(lambda x: multihost.local_rows(x, mine), o) for o in outs])
    my_golds = [golds[j] for r in per_process[jax.process_index()] for j in r]
    score = np.asarray(spec.scorer(decode_until_eos(spec.tokenizer, np.asarray(local.tokens_BxR)), my_golds),
                       np.float32)
    ro, score = multihost.gather_rows((local, score), per_process, rows)
    return ro, score, decode_until_eos(spec.tokenizer, np.asarray(ro.tokens_BxR))


def sample_round(spec: RolloutSpec, params, examples: list[Example], key, sampler_args: tuple = ()):
    """Samples `group_size` responses per example and scores them; returns (`Rows`, groups contiguous, reward_N
    unset; the decoded texts).

    `sampler_args`: extra positional arguments of the sampler (a method's carried state, e.g. entropy statistics).
    With several processes each samples and scores its own whole groups (`_sample_split`) and every process returns
    the whole round.
    """
    g = spec.group_size
    prompts = [ex.prompt for ex in examples for _ in range(g)]
    answers = [ex.answer for ex in examples for _ in range(g)]
    golds = [ex for ex in examples for _ in range(g)] if getattr(spec.scorer, "accepts_examples", False) else answers
    if multihost.active():
        ro, score, texts = _sample_split(spec, spec.generate_fn, params, prompts, golds, key, tuple(sampler_args),
                                         spec.sample_batch_rows, g)
    else:
        ids, mask = encode_batch_left_padded(spec.tokenizer, prompts, spec.max_prompt_len)
        ro = _sample_in_batches(spec, params, ids, mask, key, tuple(sampler_args))
        texts = decode_until_eos(spec.tokenizer, np.asarray(ro.tokens_BxR))
        score = np.asarray(spec.scorer(texts, golds), np.float32)
    return Rows(
        prompt_tokens_NxP=np.asarray(ro.prompt_tokens_BxP, np.int32),
        prompt_mask_NxP=np.asarray(ro.prompt_mask_BxP, bool),
        tokens_NxR=np.asarray(ro.tokens_BxR, np.int32),
        response_mask_NxR=np.asarray(ro.response_mask_BxR, bool),
        logp_sampler_NxR=np.asarray(ro.logp_BxR, np.float32),
        logp_sampler_raw_NxR=np.asarray(ro.logp_raw_BxR, np.float32),
        entropy_NxR=np.asarray(ro.entropy_BxR, np.float32),
        length_N=np.asarray(ro.length_B, np.int32),
        truncated_N=np.asarray(ro.truncated_B, bool),
        score_N=score,
        example_index_N=np.repeat(np.arange(len(examples)), g),
        answer_N=np.asarray(answers),
        step_map_NxR=np.asarray(ro.step_map_BxR, np.int32),
    ), texts


def greedy_rewards(spec: RolloutSpec, params, examples: list[Example], key, reward_hp) -> np.ndarray:
    """`greedy_reward_N`: the reward of one greedy response per example (`spec.baseline_gen`), repeated over the
    example's group and shaped like the sampled rows (a group of identical greedy rows, so group-wise shapings see
    the shapes they expect). ReMax subtracts it from each sampled response's reward."""
    g = spec.group_size
    golds = examples if getattr(spec.scorer, "accepts_examples", False) else [ex.answer for ex in examples]
    if multihost.active():
        ro, score_B, _ = _sample_split(spec, spec.baseline_gen, params, [ex.prompt for ex in examples], list(golds),
                                       key, (), 0, 1)
    else:
        ids, mask = encode_batch_left_padded(spec.tokenizer, [ex.prompt for ex in examples], spec.max_prompt_len)
        ro = jax.device_get(spec.baseline_gen(params, ids, mask, key))
        texts = decode_until_eos(spec.tokenizer, np.asarray(ro.tokens_BxR))
        score_B = np.asarray(spec.scorer(texts, golds), np.float32)
    reward_N, _ = shape_rewards(np.repeat(score_B, g), np.repeat(np.asarray(ro.length_B), g),
                                np.repeat(np.asarray(ro.truncated_B, bool), g), reward_hp)
    return reward_N


def pad_groups(rows: Rows, num_rows: int) -> Rows:
    """Pads a short batch to `num_rows` with zero-weight copies of its first rows (response mask all 0)."""
    have = rows.num_rows
    if have >= num_rows:
        return rows
    idx = np.arange(num_rows - have) % max(have, 1)

    def pad(x):
        extra = x[idx] if have else np.zeros((num_rows - have,) + x.shape[1:], x.dtype)
        return np.concatenate([x, extra], axis=0)

    out = jax.tree.map(pad, rows)
    mask = np.asarray(out.response_mask_NxR).copy()
    mask[have:] = False
    return out.replace(response_mask_NxR=mask)


def collect_batch(spec: RolloutSpec, params, stream: PromptStream, key, *, train_groups: int, reward_hp, filter_hp,
                  sampler_args: tuple = ()):
    """Rounds of sampling until `train_groups` groups pass the filter (or `filter_hp.max_rounds`), then a fixed
    batch. `reward_hp` / `filter_hp`: the frozen reward and filter sections (`train/hparams.py`).

    Returns:
      (`Rows` with exactly train_groups * group_size rows, metrics, texts of the batch rows).
    """
    acc = filters_lib.empty_accumulator(spec.group_size, train_groups)
    metrics, all_scores, all_lengths, all_truncated, texts_kept, all_rewards = {}, [], [], [], [], []
    for r in range(max(filter_hp.max_rounds, 1)):
        key, sub = jax.random.split(key)
        examples = stream.take(spec.prompts_per_round)
        rows, texts = sample_round(spec, params, examples, sub, sampler_args)
        reward_N, shape_metrics = shape_rewards(rows.score_N, rows.length_N, rows.truncated_N, reward_hp)
        rows = rows.replace(reward_N=reward_N)
        if spec.baseline_gen is not None:
            rows = rows.replace(greedy_reward_N=greedy_rewards(spec, params, examples, sub, reward_hp))
            shape_metrics = {**shape_metrics, "reward/greedy_mean": float(np.mean(rows.greedy_reward_N))}
        all_scores.append(rows.score_N), all_lengths.append(rows.length_N)
        all_truncated.append(rows.truncated_N), all_rewards.append(rows.reward_N)
        keep_B, filter_metrics = group_filter(rows, filter_hp)
        rows_kept = np.repeat(keep_B, spec.group_size)
        room = (train_groups - acc.num_groups) * spec.group_size
        texts_kept += [t for t, k in zip(texts, rows_kept) if k][:room]
        acc, full = filters_lib.accumulate_groups(acc, rows, keep_B)
        for k, v in {**shape_metrics, **filter_metrics}.items():
            metrics.setdefault(k, []).append(float(v))
        if full:
            break
    rounds = acc.rounds
    metrics = {k: float(np.nanmean(v)) if np.isfinite(v).any() else 0.0 for k, v in metrics.items()}
    metrics.update({
        "rollout/rounds": rounds,
        "rollout/kept_groups": acc.num_groups,
        "rollout/missing_groups": train_groups - acc.num_groups,
        "rollout/kept_frac": acc.num_groups / max(rounds * spec.prompts_per_round, 1),
        "reward/accuracy": float(np.mean(np.concatenate(all_scores) > 0)),
        "reward/mean": float(np.mean(np.concatenate(all_rewards))),
        "reward/std": float(np.std(np.concatenate(all_rewards))),
        "response/length_mean": float(np.mean(np.concatenate(all_lengths))),
        "response/truncated_frac": float(np.mean(np.concatenate(all_truncated))),
    })
    return pad_groups(acc.arrays, train_groups * spec.group_size), metrics, texts_kept
