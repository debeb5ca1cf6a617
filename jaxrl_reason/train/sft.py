"""Supervised warm start: next-token cross-entropy on responses (autoregressive policies).

The same jitted update step as RL (`train/step.py`) with a different loss. Determinism: the data order, the
initialization and XLA:CPU's reductions are fixed by the seed and shapes, so `experiments/sft.py` with the same
config rebuilds the shipped checkpoint bit for bit on the same software stack (tested on a short run).
"""
from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_reason.data import arithmetic
from jaxrl_reason.data.tokenizer import encode_batch_left_padded, encode_responses_right_padded
from jaxrl_reason.models.hf import save_hf
from jaxrl_reason.train.batch import make_forward_fns
from jaxrl_reason.train.contracts import UpdateBatch
from jaxrl_reason.train.objectives import ar_logps
from jaxrl_reason.train.optimizer import make_optimizer
from jaxrl_reason.train.state import init_train_state
from jaxrl_reason.train.step import make_train_step


def sft_arrays(tokenizer, prompts: list[str], responses: list[str], max_prompt_len: int, max_new_tokens: int):
    """Token arrays of a whole SFT set: tokens_NxL (left-padded prompt + response + EOS), masks."""
    p_ids, p_mask = encode_batch_left_padded(tokenizer, prompts, max_prompt_len)
    r_ids, r_mask = encode_responses_right_padded(tokenizer, responses, max_new_tokens)
    return {
        "tokens_NxL": np.concatenate([p_ids, r_ids], 1).astype(np.int32),
        "valid_NxL": np.concatenate([p_mask, r_mask], 1),
        "response_mask_NxR": r_mask.astype(np.float32),
    }


def _inputs(arrays: dict) -> UpdateBatch:
    """The forward passes' inputs of an SFT batch (the RL update batch's model-input fields)."""
    return UpdateBatch(tokens_NxL=arrays["tokens_NxL"], valid_NxL=arrays["valid_NxL"],
                       response_mask_NxR=arrays["response_mask_NxR"])


def ar_sft_loss(params, batch: dict, rng, *, graphdef) -> tuple[jax.Array, dict]:
    """Token-mean negative log-likelihood of the response tokens (incl. EOS), global token count normalizer."""
    del rng
    logp, _ = ar_logps(graphdef, params, _inputs(batch))
    mask = batch["response_mask_NxR"]
    nll = -jnp.sum(logp * mask) / batch["num_tokens_N"][0]
    return nll, {"nll_sum": -jnp.sum(logp * mask)}


def bucket_batch(batch: dict, prompt_len: int, bucket: int = 32) -> dict:
    """Trims the response padding of a batch to its longest response rounded up to `bucket` tokens.

    Cuts SFT compute on short responses; at most `R / bucket` distinct shapes are compiled.
    """
    resp = batch["response_mask_NxR"]
    used = int(np.max(np.nonzero(resp.any(0))[0], initial=0)) + 1
    r = min(resp.shape[1], -(-used // bucket) * bucket)
    return {"tokens_NxL": batch["tokens_NxL"][:, : prompt_len + r], "valid_NxL": batch["valid_NxL"][:, : prompt_len + r],
            "response_mask_NxR": resp[:, :r]}


def with_counts(batch: dict) -> dict:
    """Adds the global token count used by the loss normalizer (constant over micro-batches)."""
    n = batch["response_mask_NxR"].shape[0]
    return {**batch, "num_tokens_N": np.full((n,), max(float(batch["response_mask_NxR"].sum()), 1.0), np.float32)}


def arithmetic_sft_set(seed: int, n: int, levels, recheck_prob: float, error_prob: float, heldout_seed: int,
                       num_heldout: int):
    """SFT prompts and traces from training problems disjoint from the held-out set (data/arithmetic.py)."""
    train, _ = arithmetic.split_disjoint(n, num_heldout, levels, train_seed=seed, heldout_seed=heldout_seed)
    rng = np.random.default_rng([seed, 1])
    traces = [arithmetic.solution_trace(p, rng, recheck_prob=recheck_prob, error_prob=error_prob) for p in train]
    return [p.prompt for p in train], traces


def arithmetic_sft_set_from_config(config):
    """`arithmetic_sft_set` with the fields of a configs/sft.py or configs/sft_diffusion.py config."""
    c = config
    return arithmetic_sft_set(c.seed, c.sft.num_problems, c.task.train_levels, c.task.recheck_prob, c.task.error_prob,
                              c.task.eval_seed, c.sft.eval_problems)


def sft_loop(step_fn, state, arrays: dict, *, steps: int, batch_size: int, seed: int, prepare_batch,
             log_every: int = 50, log_fn=print, time_budget_s: float = 0.0, name: str = "sft",
             check_every: int = 0, check_fn=None):
    """The supervised loop shared by AR and masked-diffusion SFT; returns (state, history).

    Data order: epoch-wise shuffling with `np.random.default_rng([seed, 2])`; each epoch is one permutation
    of the N rows, cut into consecutive `batch_size` slices, and the `N % batch_size` rows left at its end
    are skipped. Step i trains on `prepare_batch({k: v[idx] for k, v in arrays.items()})` with
    `step_fn(state, batch) -> (state, metrics)`. The loss is logged (history row + `log_fn`) at step 1
    and every `log_every` steps; with `time_budget_s` > 0 the loop stops after the step that exceeds it.
    With `check_every` > 0, `check_fn(step, state) -> bool` runs after every `check_every`-th step and the loop
    stops when it returns True (e.g. `PlateauCheck` on a validation set).

    Args:
      arrays: dict of [N, ...] arrays sharing their first dimension N.
      prepare_batch: the host-side batch transform (bucketing, global token counts).
      name: the prefix of the log lines.
    """
    sizes = {v.shape[0] for v in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"SFT arrays must share their first dimension, got sizes {sorted(sizes)}.")
    n = sizes.pop()
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, N={n}], got {batch_size}.")
    rng = np.random.default_rng([seed, 2])
    order, pos, history, start = rng.permutation(n), 0, [], time.time()
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        state, metrics = step_fn(state, prepare_batch({k: v[idx] for k, v in arrays.items()}))
        if (step + 1) % log_every == 0 or step == 0:
            loss = float(metrics["loss"])
            history.append({"step": step + 1, "loss": loss, "time_s": time.time() - start})
            log_fn(f"{name} step {step + 1}/{steps}  loss {loss:.4f}  {time.time() - start:.0f}s")
        if time_budget_s and time.time() - start > time_budget_s:
            log_fn(f"{name} time budget reached at step {step + 1}")
            break
        if check_every and (step + 1) % check_every == 0 and check_fn(step + 1, state):
            log_fn(f"{name} stopped by its check at step {step + 1}")
            break
    return state, history


class PlateauCheck:
    """Stops SFT when a validation score has not beaten its best by `min_delta` for `patience` checks in a row.

    `score_fn(params) -> float` (higher is better, e.g. greedy accuracy on validation problems). Used as
    `sft_loop(check_fn=PlateauCheck(...))`; each check is logged with `log_fn` and kept in `history` as (step, score).
    """

    def __init__(self, score_fn, *, patience: int, min_delta: float, log_fn=print):
        if patience < 1:
            raise ValueError(f"plateau patience must be >= 1, got {patience}.")
        self.score_fn, self.patience, self.min_delta, self.log_fn = score_fn, patience, min_delta, log_fn
        self.best, self.stale, self.history = -np.inf, 0, []

    def __call__(self, step: int, state) -> bool:
        score = float(self.score_fn(state.params))
        self.history.append((step, score))
        if score >= self.best + self.min_delta:
            self.best, self.stale = score, 0
        else:  # a gain below min_delta does not move the best (Keras' EarlyStopping rule)
            self.stale += 1
        self.log_fn(f"plateau check at step {step}: validation {score:.4f}  best {self.best:.4f}  "
                    f"stale {self.stale}/{self.patience}")
        return self.stale >= self.patience


def train_sft(model, tokenizer, arrays: dict, *, steps: int, batch_size: int, lr: float, warmup_steps: int,
              seed: int, micro_batches: int = 1, log_every: int = 50, log_fn=print, time_budget_s: float = 0.0,
              prompt_len: int | None = None, schedule: str = "cosine", weight_decay: float = 0.01,
              check_every: int = 0, check_fn=None):
    """Runs `steps` SFT updates over `arrays` (epoch-wise shuffled, `sft_loop`) and returns (model, history).

    With `prompt_len` (the left-padded prompt width of `arrays`), each batch's response padding is trimmed
    (`bucket_batch`), which changes no loss value: trimmed columns are padding. AdamW with `weight_decay`, linear
    warm-up over `warmup_steps`, then `schedule`: "constant", or "cosine" decay to 0 at `steps`.
    `check_every` / `check_fn`: an early stop (`sft_loop`), e.g. `PlateauCheck`.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    tx = make_optimizer(lr, warmup_steps=warmup_steps, total_steps=steps, schedule=schedule, weight_decay=weight_decay)
    state = init_train_state(params, tx, seed)
    step_fn = make_train_step(functools.partial(ar_sft_loss, graphdef=graphdef), tx, num_micro_batches=micro_batches)

    def prepare(batch):
        return with_counts(batch if prompt_len is None else bucket_batch(batch, prompt_len))

    state, history = sft_loop(step_fn, state, arrays, steps=steps, batch_size=batch_size, seed=seed,
                              prepare_batch=prepare, log_every=log_every, log_fn=log_fn,
                              time_budget_s=time_budget_s, check_every=check_every, check_fn=check_fn)
    nnx.update(model, state.params)
    return model, history


def save_sft_checkpoint(model, cfg, tokenizer, out_dir: str) -> None:
    """Writes the policy as a Hugging Face checkpoint plus its tokenizer (what `model.init=sft` loads)."""
    os.makedirs(out_dir, exist_ok=True)
    save_hf(model, cfg, out_dir)
    tokenizer.save_pretrained(out_dir)


def heldout_nll(model, arrays: dict) -> float:
    """Mean response-token NLL of `arrays` under `model` (for plateau checks)."""
    graphdef, params = nnx.split(model, nnx.Param)
    logps, _ = make_forward_fns(graphdef)
    logp, _ = logps(params, _inputs(arrays))
    mask = arrays["response_mask_NxR"]
    return float(-np.sum(np.asarray(logp) * mask) / max(mask.sum(), 1.0))
