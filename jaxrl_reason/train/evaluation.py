"""Held-out evaluation: pass@1 averaged over k samples, pass@k, maj@k, greedy accuracy, length, truncation.

Used before / after RL by `train/loop.py` and standalone by `experiments/evaluate.py`. The batch shape is fixed
(`batch_rows`, the last batch padded with repeats) so evaluation compiles once per sampler.
"""
from __future__ import annotations

import collections
from typing import Callable, Sequence

import jax
import numpy as np

from jaxrl_reason.data.example import Example
from jaxrl_reason.data.tokenizer import decode_until_eos, encode_batch_left_padded


def _generate_texts(generate_fn, params, tokenizer, prompts: list[str], key, batch_rows: int, max_prompt_len: int):
    """Runs the sampler over `prompts` in fixed-size batches; returns texts, lengths, truncated flags."""
    texts, lengths, truncated = [], [], []
    for start in range(0, len(prompts), batch_rows):
        chunk = prompts[start : start + batch_rows]
        padded = chunk + [chunk[-1]] * (batch_rows - len(chunk))
        ids, mask = encode_batch_left_padded(tokenizer, padded, max_prompt_len)
        key, sub = jax.random.split(key)
        ro = jax.device_get(generate_fn(params, ids, mask, sub))
        n = len(chunk)
        texts += decode_until_eos(tokenizer, np.asarray(ro.tokens_BxR))[:n]
        lengths.append(np.asarray(ro.length_B)[:n])
        truncated.append(np.asarray(ro.truncated_B)[:n])
    return texts, np.concatenate(lengths), np.concatenate(truncated)


def _final_answer(text: str) -> str:
    idx = text.rfind("####")
    return text[idx + 4 :].strip() if idx >= 0 else ""


def evaluate(
    params,
    examples: Sequence[Example],
    *,
    tokenizer,
    scorer: Callable[[list[str], list[str]], np.ndarray],
    sample_fn,
    greedy_fn=None,
    samples: int = 4,
    batch_rows: int = 256,
    max_prompt_len: int,
    key,
    count_fn: Callable[[str], int] | None = None,
) -> dict:
    """Accuracy metrics on `examples` (mean pass@1 over k samples, the number the method papers report).

    Returns a flat dict: pass@1 (mean over the k samples), pass@k, maj@k (majority vote over the final answers),
    greedy accuracy (if `greedy_fn`), mean response length and truncation rate of the samples, the mean of
    `count_fn` (e.g. re-checks per response), and per-level pass@1 when examples carry `extra["level"]`.
    """
    n = len(examples)
    if n == 0:
        raise ValueError("the held-out set is empty; nothing to evaluate.")
    with_examples = getattr(scorer, "accepts_examples", False)
    prompts = [ex.prompt for ex in examples for _ in range(samples)]
    golds = [ex if with_examples else ex.answer for ex in examples for _ in range(samples)]
    texts, lengths, truncated = _generate_texts(sample_fn, params, tokenizer, prompts, key, batch_rows,
                                                max_prompt_len)
    score_NxK = np.asarray(scorer(texts, golds), np.float32).reshape(n, samples)
    out = {
        "pass@1": float(score_NxK.mean()),
        f"pass@{samples}": float((score_NxK > 0).any(axis=1).mean()),
        "length_mean": float(lengths.mean()),
        "truncated_frac": float(truncated.mean()),
    }
    votes, final_answer = [], getattr(scorer, "final_answer", _final_answer)
    for i in range(n):
        finals = [final_answer(t) for t in texts[i * samples : (i + 1) * samples]]
        top = collections.Counter(finals).most_common(1)[0][0]
        votes.append(score_NxK[i, finals.index(top)])
    out[f"maj@{samples}"] = float(np.mean(votes))
    if count_fn is not None:
        out["recheck_per_response"] = float(np.mean([count_fn(t) for t in texts]))
    levels = [ex.extra.get("level") for ex in examples]
    if all(lv is not None for lv in levels):
        for lv in sorted(set(levels)):
            rows = [i for i, x in enumerate(levels) if x == lv]
            out[f"pass@1/level{lv}"] = float(score_NxK[rows].mean())
    out.update(_per_source(examples, score_NxK, np.asarray(votes)))
    if greedy_fn is not None:
        key, sub = jax.random.split(key)
        g_texts, g_len, _ = _generate_texts(greedy_fn, params, tokenizer, [ex.prompt for ex in examples], sub,
                                            batch_rows, max_prompt_len)
        out["greedy_acc"] = float(np.mean(scorer(g_texts, [ex if with_examples else ex.answer for ex in examples])))
        out["greedy_length_mean"] = float(g_len.mean())
    return out


def _per_source(examples: Sequence[Example], score_NxK: np.ndarray, vote_N: np.ndarray) -> dict:
    """pass@1, pass@k and maj@k of each `data_source` when the examples come from more than one."""
    sources = [ex.data_source for ex in examples]
    if len(set(sources)) < 2:
        return {}
    out, k = {}, score_NxK.shape[1]
    for src in sorted(set(sources)):
        rows = [i for i, s in enumerate(sources) if s == src]
        out[f"pass@1/{src}"] = float(score_NxK[rows].mean())
        out[f"pass@{k}/{src}"] = float((score_NxK[rows] > 0).any(axis=1).mean())
        out[f"maj@{k}/{src}"] = float(vote_N[rows].mean())
    return out
