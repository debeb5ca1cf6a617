"""REPRO: score the answer after each selected reasoning prefix, turn it into a process advantage on the response
tokens, add `repro.alpha` times it to the outcome advantage (on top of PPO or GRPO; the math is in `core/repro.py`).

    rows (rollout) --host: thinking part, segment boundaries, first-token entropies, top-k selection-->
    answer queries `prompt + response[:boundary] + answer_prefix + gold answer` (+ one per prompt with no
    reasoning, J_b), deduplicated --fixed-size chunks through the jitted scorer (current policy, no grad)-->
    J~ per selected boundary --jitted core.repro pipeline--> process_adv_NxR

The method's `extra_advantage` hook hands `alpha * process_adv_NxR` to the update batch builder.

Query layout (static shapes, so the scorer compiles once per run): left-padded to `L = P + R + |prefix| + A`,
the gold answer right-aligned in the last `A = max_answer_tokens` slots, the answer prefix just before it.
Every [INFERRED]/[NOTES] choice of the method is a keyword argument passed through to `core/repro.py`.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from jaxrl_reason.core import repro as repro_lib
from jaxrl_reason.methods.hooks import Method
from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.models.attention import causal, positions_from_mask
from jaxrl_reason.train.logprobs import LogpSpec, cast_floating, chunked_token_logps


def make_answer_scorer(graphdef: nnx.GraphDef, query_sharding: jax.sharding.Sharding | None = None,
                       spec: LogpSpec = LogpSpec(), param_shardings=None) -> Callable:
    """Jitted surrogate `J~` of a fixed-shape batch of answer queries, no gradient.

    Returns `scorer(params, tokens_KxL, valid_KxL, answer_mask_KxA) -> J_K` (float32 numpy-convertible): the
    mean float32 log-likelihood of the answer tokens, which occupy (right-aligned) the last A slots of each
    left-padded query; `answer_mask_KxA` marks them. Only the last A positions go through the LM head, in
    token (and vocabulary) chunks of `spec` (`train/logprobs.py`), with the params cast to `spec.compute_dtype`,
    so no `[K, L, V]` or `[K, A, V]` logits exist. A row with no answer token scores 0 (padding rows).
    `query_sharding`: optional sharding of the `[K, *]` query arrays (e.g. `models.sharding.batch_sharding(mesh,
    2)`) so the queries are split over data-parallel devices; K must then divide over its shards. With it,
    `param_shardings` (the params' training shardings) makes the jit's in/out shardings explicit.
    """
    spec.validate()

    def score(params, tokens_KxL, valid_KxL, answer_mask_KxA):
        model = nnx.merge(graphdef, cast_floating(jax.lax.stop_gradient(params), spec.dtype))
        num_ans = answer_mask_KxA.shape[1]
        h_KxLxD, _ = model.hidden(tokens_KxL, positions_from_mask(valid_KxL), causal(valid_KxL))
        logp_KxA, _ = chunked_token_logps(h_KxLxD[:, -num_ans - 1:-1], model.lm_head_weight(),
                                          tokens_KxL[:, -num_ans:], token_chunk=spec.logits_chunk,
                                          vocab_chunk=spec.vocab_chunk)
        return repro_lib.answer_loglik_mean(logp_KxA, answer_mask_KxA)

    if query_sharding is None:
        return jax.jit(score)
    explicit = {} if param_shardings is None else dict(in_shardings=(param_shardings,) + (query_sharding,) * 3,
                                                       out_shardings=query_sharding)
    score = jax.jit(score, **explicit)

    def sharded_score(params, tokens_KxL, valid_KxL, answer_mask_KxA):
        try:
            query_sharding.shard_shape(np.shape(tokens_KxL))
        except ValueError as e:
            raise ValueError(f"{np.shape(tokens_KxL)[0]} queries per chunk do not split over query_sharding.") from e
        put = lambda x: jax.device_put(np.asarray(x), query_sharding)
        return score(params, put(tokens_KxL), put(valid_KxL), put(answer_mask_KxA))

    return sharded_score


def token_ids(tokenizer, text: str) -> tuple[int, ...]:
    """Token ids of `text` without special tokens (for `delimiter_ids`, `think_end_ids`)."""
    return tuple(int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_answer_queries(contexts: Sequence[np.ndarray], answers: Sequence[np.ndarray], prefix_ids: Sequence[int],
                          query_len: int, max_answer_tokens: int):
    """Host: left-padded queries `context + prefix + answer`.

    Args:
      contexts: Q int arrays (prompt tokens + response prefix). answers: Q int arrays (gold answer tokens).
      prefix_ids: answer template tokens (e.g. "#### "). query_len: L. max_answer_tokens: A.
    Returns:
      tokens_QxL int32 (pad id 0 where invalid), valid_QxL bool, answer_mask_QxA bool (answer right-aligned).
    """
    prefix = np.asarray(prefix_ids, np.int32).reshape(-1)
    num = len(contexts)
    tokens = np.zeros((num, query_len), np.int32)
    valid = np.zeros((num, query_len), bool)
    answer_mask = np.zeros((num, max_answer_tokens), bool)
    for q, (ctx, ans) in enumerate(zip(contexts, answers)):
        ans = np.asarray(ans, np.int32).reshape(-1)
        if not 1 <= ans.size <= max_answer_tokens:
            raise ValueError(f"an answer has {ans.size} tokens; it must have between 1 and max_answer_tokens="
                             f"{max_answer_tokens}.")
        row = np.concatenate([np.asarray(ctx, np.int32).reshape(-1), prefix, ans])
        if row.size > query_len:
            raise ValueError(f"a query has {row.size} tokens, more than query_len={query_len}.")
        tokens[q, query_len - row.size:] = row
        valid[q, query_len - row.size:] = True
        answer_mask[q, max_answer_tokens - ans.size:] = True
    return tokens, valid, answer_mask


def score_queries(scorer_fn: Callable, params, tokens_QxL, valid_QxL, answer_mask_QxA, chunk_size: int):
    """Runs the scorer over fixed-size chunks (the last one padded with empty rows); returns J_Q float32 numpy."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    num = tokens_QxL.shape[0]
    pad = -num % chunk_size
    arrays = [np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) for x in
              (tokens_QxL, valid_QxL, answer_mask_QxA)]
    outs = [scorer_fn(params, *(x[s:s + chunk_size] for x in arrays)) for s in range(0, num + pad, chunk_size)]
    return np.concatenate([np.asarray(o, np.float32) for o in outs])[:num] if outs else np.zeros(0, np.float32)


def _thinking_length(response: np.ndarray, think_end_ids) -> int:
    """Tokens before the first `think_end_ids` occurrence (the whole response when absent or None)."""
    if think_end_ids is None:
        return response.size
    ends = repro_lib.segment_boundaries(response, tuple(think_end_ids))
    return int(ends[0]) - len(think_end_ids) if ends.size else response.size


_select_jit = jax.jit(repro_lib.select_segments_by_entropy, static_argnames="k")


def select_boundaries(rows, *, delimiter_ids, think_end_ids, k: int) -> dict:
    """Host + core: segment layout of the thinking parts and the top-k segments by first-token entropy.

    Response length = `response_mask_NxR.sum()` (zero-weight padding rows get no segment). Boundaries come from the
    thinking part only; tokens after it form the conclusion. Returns numpy `seg_of_token_NxT`, `seg_end_NxM`,
    `seg_valid_NxM`, `sel_idx_Nxk`, `sel_valid_Nxk` (M = R, the most segments a response can have).
    """
    tokens, mask = np.asarray(rows.tokens_NxR), np.asarray(rows.response_mask_NxR, bool)
    num, resp_len = tokens.shape
    length_N = mask.sum(axis=1)
    bounds = [repro_lib.segment_boundaries(tokens[n, :_thinking_length(tokens[n, :length_N[n]], think_end_ids)],
                                           delimiter_ids) for n in range(num)]
    layout = repro_lib.segment_layout(bounds, length_N, resp_len, max_segments=resp_len)
    first_entropy_NxM = np.take_along_axis(np.asarray(rows.entropy_NxR, np.float32), layout["seg_start_NxM"], 1)
    sel_idx, sel_valid = _select_jit(first_entropy_NxM, layout["seg_valid_NxM"], k)
    return {**layout, "sel_idx_Nxk": np.asarray(sel_idx), "sel_valid_Nxk": np.asarray(sel_valid)}


def _collect_queries(rows, answer_ids, sel, min_segments):
    """Deduplicated query contexts; returns (contexts, answers, jb_query_N, j_query_Nxk with -1 = unscored)."""
    index, contexts, answers = {}, [], []

    def query(ctx, n):
        key = (ctx.tobytes(), answer_ids[n].tobytes())
        if key not in index:
            index[key] = len(contexts)
            contexts.append(ctx), answers.append(answer_ids[n])
        return index[key]

    num, k = sel["sel_idx_Nxk"].shape
    jb_query, j_query = np.full(num, -1, np.int64), np.full((num, k), -1, np.int64)
    for n in np.flatnonzero(sel["sel_valid_Nxk"].sum(axis=1) >= min_segments):
        prompt = np.asarray(rows.prompt_tokens_NxP[n], np.int32)[np.asarray(rows.prompt_mask_NxP[n], bool)]
        jb_query[n] = query(prompt, n)
        for j in np.flatnonzero(sel["sel_valid_Nxk"][n]):
            end = sel["seg_end_NxM"][n, sel["sel_idx_Nxk"][n, j]]
            j_query[n, j] = query(np.concatenate([prompt, np.asarray(rows.tokens_NxR[n, :end], np.int32)]), n)
    return contexts, answers, jb_query, j_query


@functools.partial(jax.jit, static_argnames=("w", "w_on", "magnitude_form", "stability_ema", "single_point_value",
                                             "norm_scope", "norm_eps", "before_first", "after_last", "min_segments"))
def advantage_from_surrogates(J_Nxk, J_b_N, sel_idx_Nxk, valid_Nxk, seg_of_token_NxR, mask_NxR, *, w: float,
                              w_on: str = "stability", magnitude_form: str = "one_minus_tanh",
                              stability_ema: float | None = None, single_point_value: float = 1.0,
                              norm_scope: str = "batch", norm_eps: float = 1e-6, before_first: str = "following",
                              after_last: str = "zero", min_segments: int = 2):
    """J~ at the selected boundaries -> process advantage `[N, R]` (core/repro.py).

    S = composite(1 - tanh(J / J_b), prefix Kendall-τ(J)); r = diff(S); r' = z-score over the batch; return-to-go
    over the selected segments broadcast onto their tokens. Returns (adv_NxR float32, S_Nxk, r_norm_Nxk).
    """
    valid = valid_Nxk & (jnp.sum(valid_Nxk, axis=-1, keepdims=True) >= min_segments)
    S_m = repro_lib.magnitude_score(J_Nxk, J_b_N[:, None], magnitude_form)
    S_s = repro_lib.stability_score(J_Nxk, valid, stability_ema, single_point_value)
    S = jnp.where(valid, repro_lib.composite_score(S_m, S_s, w, w_on), 0.0)
    r = repro_lib.process_rewards(S, valid)
    r_norm = repro_lib.normalize_process_rewards(r, valid, norm_scope, norm_eps, min_segments)
    adv = repro_lib.process_advantage(r_norm, seg_of_token_NxR, sel_idx_Nxk, valid, mask_NxR, before_first,
                                      after_last, min_segments)
    return adv, S, r_norm


def process_advantage_for_rows(rows, answers_text: Sequence[str], tokenizer, scorer_fn: Callable, params, *,
                               delimiter_ids, answer_prefix: str, k: int, w: float, w_on: str = "stability",
                               think_end_ids: Sequence[int] | None = None, max_answer_tokens: int = 32,
                               chunk_size: int = 64, min_segments: int = 2, **switches):
    """REPRO process advantage of a rollout batch, alpha NOT applied.

    Args:
      rows: rollout rows (`train.contracts.Rows`): prompt_tokens_NxP, prompt_mask_NxP, tokens_NxR, response_mask_NxR,
        entropy_NxR (raw-policy entropy at each response slot).
      answers_text: N gold answers. tokenizer: encodes them and `answer_prefix`.
      scorer_fn: from `make_answer_scorer`; params: the CURRENT policy params (rollout time, no grad).
      delimiter_ids: segment delimiter as token ids (int, contiguous sequence, or frozenset of alternatives), e.g.
        `token_ids(tok, " ")` for the arithmetic task, "\\n\\n" for math text.
      answer_prefix: text between the reasoning prefix and the gold answer in every query ("#### ").
      k: segments scored per response. w, w_on: composite weight and which score it weights.
      think_end_ids: tokens that end the thinking part ("####", "</think>"); None = the whole response.
      max_answer_tokens: A, the answer window of the queries. chunk_size: queries per scorer call.
      min_segments: responses with fewer selected segments get 0.
      **switches: passed to `advantage_from_surrogates` (magnitude_form, stability_ema, single_point_value,
        norm_scope, norm_eps, before_first, after_last: the [INFERRED] choices of the scores and segments).
    Returns:
      (process_adv_NxR float32 numpy, metrics dict of floats).
    """
    num, resp_len = np.shape(rows.tokens_NxR)
    if len(answers_text) != num:
        raise ValueError(f"Got {len(answers_text)} answers for {num} rows.")
    sel = select_boundaries(rows, delimiter_ids=delimiter_ids, think_end_ids=think_end_ids, k=k)
    encoded = {a: np.asarray(token_ids(tokenizer, a), np.int32) for a in set(answers_text)}
    answer_ids = [encoded[a] for a in answers_text]
    contexts, answers, jb_query, j_query = _collect_queries(rows, answer_ids, sel, min_segments)
    prefix_ids = token_ids(tokenizer, answer_prefix)
    query_len = np.shape(rows.prompt_tokens_NxP)[1] + resp_len + len(prefix_ids) + max_answer_tokens
    queries = encode_answer_queries(contexts, answers, prefix_ids, query_len, max_answer_tokens)
    J_Q = score_queries(scorer_fn, params, *queries, chunk_size=chunk_size)
    J_Q = np.concatenate([J_Q, np.zeros(1, np.float32)])  # index -1 (unscored) reads 0
    J_Nxk, J_b_N = J_Q[j_query], J_Q[jb_query]
    valid = sel["sel_valid_Nxk"] & (j_query >= 0)
    adv, S, _ = advantage_from_surrogates(J_Nxk, J_b_N, sel["sel_idx_Nxk"], valid, sel["seg_of_token_NxT"],
                                          np.asarray(rows.response_mask_NxR, np.float32), w=w, w_on=w_on,
                                          min_segments=min_segments, **switches)
    scored = valid.sum(axis=1) >= min_segments
    last = np.where(scored, J_Nxk[np.arange(num), np.maximum(valid.sum(axis=1) - 1, 0)], 0.0)
    denom = max(int(scored.sum()), 1)
    adv = np.asarray(adv)
    mask = np.asarray(rows.response_mask_NxR, bool)
    metrics = {
        "repro/scored_frac": float(scored.mean()) if num else 0.0,
        "repro/queries": float(len(contexts)),
        "repro/segments_mean": float(sel["seg_valid_NxM"].sum() / max(num, 1)),
        "repro/J_b_mean": float(np.sum(np.where(scored, J_b_N, 0.0)) / denom),
        "repro/J_last_mean": float(np.sum(last) / denom),
        "repro/score_mean": float(np.sum(np.where(valid & scored[:, None], S, 0.0)) / max(int(valid[scored].sum()), 1)),
        "repro/adv_abs_mean": float(np.abs(adv[mask]).sum() / max(int(mask.sum()), 1)),
    }
    return adv.astype(np.float32), metrics


def make_repro_advantage_fn(graphdef: nnx.GraphDef, tokenizer, *, alpha: float, k: int, w: float, delimiter: str,
                            answer_prefix: str, think_end: str = "", query_sharding=None,
                            spec: LogpSpec = LogpSpec(), param_shardings=None, **kwargs) -> Callable:
    """The loop's hook: `fn(rows, policy_params) -> (alpha * process_adv_NxR, metrics)`.

    `rows` (`train.contracts.Rows`) carry the gold answers as `answer_N` ([N] strings). `delimiter` /
    `think_end` are text, tokenized once here (`think_end=""`: the whole response is thinking). `spec`,
    `query_sharding`, `param_shardings`: as in `make_answer_scorer`. `**kwargs` go to `process_advantage_for_rows`
    (w_on, max_answer_tokens, chunk_size, the [INFERRED] switches).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 to use REPRO, got {alpha}.")
    scorer = make_answer_scorer(graphdef, query_sharding, spec, param_shardings)
    fixed = dict(delimiter_ids=token_ids(tokenizer, delimiter), answer_prefix=answer_prefix, k=k, w=w,
                 think_end_ids=token_ids(tokenizer, think_end) or None, **kwargs)
    if not fixed["delimiter_ids"]:
        raise ValueError(f"the delimiter {delimiter!r} tokenizes to no tokens.")

    def fn(rows, policy_params):
        if rows.answer_N is None:
            raise ValueError("REPRO needs the gold answers in the rows' answer_N (train/rollout.py sample_round).")
        adv, metrics = process_advantage_for_rows(rows, rows.answer_N, tokenizer, scorer, policy_params, **fixed)
        return alpha * adv, metrics

    return fn


# ------------------------------------------------------------------------------- the method: section, recipe, hook

QUERY_CHUNK = 64  # answer queries per call of the scorer


def section(config) -> config_dict.ConfigDict:
    s = config_dict.ConfigDict()
    s.alpha = 0.0  # weight of the process advantage added to the outcome advantage; 0 = off
    s.w = 0.5  # composite weight of the magnitude and stability scores
    s.k = 10  # segments scored per response
    s.delimiter = " "  # segment delimiter ("\n\n" for math text, " " for the char-level task)
    s.answer_prefix = "#### "  # template between the reasoning prefix and the gold answer
    s.think_end = "####"  # where the thinking part ends ("</think>" for R1-style models)
    return s


def _query_shardings(mesh, forward_shardings: dict) -> dict:
    """Answer queries over ('data', 'fsdp') when the query chunk splits over them."""
    if not forward_shardings or QUERY_CHUNK % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return {}
    return dict(query_sharding=sharding_lib.batch_sharding(mesh, 1),
                param_shardings=forward_shardings["policy_shardings"], chunk_size=QUERY_CHUNK)


def extra_advantage(config, graphdef, tokenizer, *, spec, mesh=None, forward_shardings=None):
    """`alpha * process_adv_NxR` and its metrics for each rollout batch (None with alpha 0)."""
    s = config.repro
    if s.alpha <= 0:
        return None
    return make_repro_advantage_fn(graphdef, tokenizer, alpha=s.alpha, k=s.k, w=s.w, delimiter=s.delimiter,
                                   answer_prefix=s.answer_prefix, think_end=s.think_end, spec=spec,
                                   **_query_shardings(mesh, forward_shardings or {}))


METHOD = Method(name="repro", recipes={"repro": {"repro.alpha": 0.1}}, section=section, stacks_on=("ppo", "grpo"),
                extra_advantage=extra_advantage)
