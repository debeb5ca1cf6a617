"""TraceRL for masked-diffusion LMs: trace grouping, replay rows, policy / value losses, step-level GAE.

TraceRL scores each response token in the state the sampler decoded it from (the prompt plus the tokens committed
at earlier steps, the rest masked), one replayed row per group of decoding steps. Reference code: Gen-Verse/dLLM-RL
`train/rl_trado.py` (`collapse_k_unique`, `one_round_vectorized`, `forward_process`), `train/rl_llada.py`,
`train/train_trado_value.py`. Every shape is static (bounded row counts, zero-weight padding rows), so the jitted
programs compile once.

Conventions. `N` responses, `R` padded response length, `K` rows (replayed denoising states) per response.
`step_map_NxR[n, j]` is the decoding step at which response token `j` was unmasked (only the order matters;
ids must be `< BIG`); `valid_NxR` marks the tokens that can be training targets (real response tokens, plus the
first `post_num` pads if reproducing dLLM-RL's `post_num`). Invalid tokens get group `BIG`: they are masked in
every noisy row and never a target, as the official pads (step id `max + 1`, removed from the targets).

Pipeline: `trace_groups` -> `trace_rows` (or host `pack_rows`) -> model forward per row -> `logp [rows, R]`
-> `tracerl_policy_loss`. Value model: `merge_row_values` -> `outcome_reward_on_last_step` -> `step_level_gae`
(with `step_rank = trace_groups(shrink_step_map(step_map, valid, B, s), valid, None, 1)`, the global dense rank
of the shrunk step ids, as `train_trado_value.py` ranks the collapsed `step_map`) -> `tracerl_value_loss`.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

BIG = 2**31 - 1  # group / step id of invalid tokens (int32 max, = sampling.types.STEP_MAP_PAD)
NORMS = ("response_len", "targets")


def _check_block(block_size, shrink):
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None (full attention), got {block_size!r}.")
    concrete = isinstance(shrink, (int, np.integer)) and not isinstance(shrink, bool)
    if not (concrete or isinstance(shrink, jax.Array)) or (concrete and shrink < 1):
        raise ValueError(f"shrink must be a positive int (or an int array under jit), got {shrink!r}.")


def _to_blocks(x_NxR, block_size, fill):
    """[N, R] -> [N, nb, Bs] with the last block padded by `fill` (Bs = R when block_size is None)."""
    n, r = x_NxR.shape
    bs = r if block_size is None else block_size
    nb = -(-r // bs)
    x = jnp.pad(x_NxR, ((0, 0), (0, nb * bs - r)), constant_values=fill)
    return x.reshape(n, nb, bs)


def _dense_rank(x, valid):
    """Dense rank (0, 1, ... over distinct values, ascending) of the valid entries along the last axis."""
    xm = jnp.where(valid, x, BIG)
    order = jnp.argsort(xm, axis=-1, stable=True)
    srt = jnp.take_along_axis(xm, order, axis=-1)
    new = jnp.concatenate([jnp.ones_like(srt[..., :1], bool), srt[..., 1:] != srt[..., :-1]], axis=-1)
    dense_sorted = jnp.cumsum(new, axis=-1, dtype=jnp.int32) - 1
    dense = jnp.take_along_axis(dense_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(valid, dense, BIG)


def trace_groups(step_map_NxR, valid_NxR, block_size, shrink: int = 1):
    """Training group id of every response token (the shrinkage `s`, vectorised over responses).

    Dense rank of the step ids within each training block `[iB, (i+1)B)` (block models; `block_size=None`:
    over the whole response, full-attention models), then `// shrink`: every `shrink` consecutive distinct steps
    form one group, which is exactly the grouping of dLLM-RL's `collapse_k_unique` (that relabels a group with
    its LAST member's id; the order of the groups is the same). Invalid tokens -> `BIG`. `block_size` is static;
    `shrink` may be a traced int (no recompilation when it changes).

    Returns:
      group_NxR int32: row `k` of `trace_rows` targets the tokens with `group == k`.
    """
    _check_block(block_size, shrink)
    step_map_NxR = jnp.asarray(step_map_NxR, jnp.int32)
    valid_NxR = jnp.asarray(valid_NxR, bool)
    n, r = step_map_NxR.shape
    dense = _dense_rank(_to_blocks(step_map_NxR, block_size, BIG), _to_blocks(valid_NxR, block_size, False))
    group = dense.reshape(n, -1)[:, :r] // shrink
    return jnp.where(valid_NxR, group, BIG)


def shrink_step_map(step_map_NxR, valid_NxR, block_size, shrink: int = 1):
    """Vectorised `collapse_k_unique` per training block: every token gets the LAST step id of its group.

    This is the step map the official value pipeline ranks for step-level GAE.
    Invalid tokens -> `BIG`. Returns int32 `[N, R]`.
    """
    _check_block(block_size, shrink)
    step_map_NxR = jnp.asarray(step_map_NxR, jnp.int32)
    valid_NxR = jnp.asarray(valid_NxR, bool)
    n, r = step_map_NxR.shape
    sm, va = _to_blocks(step_map_NxR, block_size, BIG), _to_blocks(valid_NxR, block_size, False)
    bs = sm.shape[-1]
    seg = jnp.where(va, _dense_rank(sm, va) // shrink, bs)  # invalid -> dump segment bs
    seg_max = jax.vmap(lambda v, s: jax.ops.segment_max(v, s, num_segments=bs + 1))
    table = seg_max(sm.reshape(-1, bs), seg.reshape(-1, bs))  # [N*nb, bs+1] last id per group
    label = jnp.take_along_axis(table, seg.reshape(-1, bs), axis=-1).reshape(n, -1)[:, :r]
    return jnp.where(valid_NxR, label, BIG)


def num_rows_bound(block_size, shrink: int, max_steps=None) -> int:
    """Static bound `K` on the TraceRL rows per response (the jitted programs need a fixed row count).

    Block models: a block holds at most `block_size` distinct steps (and at most `max_steps` when given), so
    `K = ceil(min(B, max_steps) / s)`. Full attention (`block_size=None`): `K = ceil(max_steps / s)`, where
    `max_steps` bounds the distinct decoding steps of one response (e.g. the sampler's step count, or `R`).
    """
    _check_block(block_size, shrink)
    if not isinstance(shrink, int):
        raise ValueError(f"num_rows_bound needs a python int shrink, got {shrink!r}.")
    if block_size is None and max_steps is None:
        raise ValueError("num_rows_bound needs max_steps for full-attention models (block_size=None).")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    steps = max_steps if block_size is None else min(block_size, max_steps or block_size)
    return math.ceil(steps / shrink)


def trace_rows(response_NxR, group_NxR, valid_NxR, mask_token_id: int, num_rows: int):
    """Trajectory-replay rows: row `k` is the denoising state of the `k`-th group.

    Row `k` masks every token with `group >= k` (later groups and invalid tokens) and targets the tokens with
    `group == k`; with per-block groups this is round `k` of dLLM-RL's `one_round_vectorized` (every block at its
    `k`-th distinct step), with `block_size=None` groups it is the full-attention row of the `k`-th step group.
    Groups `>= num_rows` are never targets: take `num_rows` from `num_rows_bound`.

    Returns:
      noisy_NxKxR (response ids with masks), target_NxKxR bool, row_valid_NxK bool (row has >= 1 target;
      the official code drops the other rows, every loss here gives them zero weight).
    """
    if not isinstance(num_rows, int) or num_rows < 1:
        raise ValueError(f"num_rows must be a positive int, got {num_rows!r}.")
    group = jnp.asarray(group_NxR, jnp.int32)[:, None, :]
    k_1xKx1 = jnp.arange(num_rows, dtype=jnp.int32)[None, :, None]
    target = (group == k_1xKx1) & jnp.asarray(valid_NxR, bool)[:, None, :]
    response = jnp.asarray(response_NxR)
    noisy = jnp.where(group >= k_1xKx1, jnp.asarray(mask_token_id, response.dtype), response[:, None, :])
    return noisy, target, jnp.any(target, axis=-1)


def pack_rows(noisy_NxKxR, target_NxKxR, row_valid_NxK, micro_batch_size: int, num_micro_batches=None):
    """Host-side (numpy) packing: drop empty rows, pad to fixed-shape micro-batches (one compiled shape).

    Rows are kept in (response, row) order. Padding rows repeat the first kept row with no target and
    `row_valid = False`, so every loss here gives them zero weight. `num_micro_batches` fixes the count (the rows
    must fit); None -> as few as needed.

    Returns a dict of numpy arrays with leading dims `[M, mb]`: `noisy`, `target` (`[M, mb, R]`), `seq_index`,
    `row_index` (int32, which response / row each packed row came from), `row_valid` (bool).
    """
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}.")
    noisy, target, row_valid = np.asarray(noisy_NxKxR), np.asarray(target_NxKxR), np.asarray(row_valid_NxK)
    seq_idx, row_idx = np.nonzero(row_valid & target.any(-1))
    n_kept = len(seq_idx)
    m = max(-(-n_kept // micro_batch_size), 1) if num_micro_batches is None else num_micro_batches
    total = m * micro_batch_size
    if total < n_kept:
        raise ValueError(f"{n_kept} TraceRL rows do not fit in {m} micro-batches of {micro_batch_size}.")
    pad = total - n_kept
    fill_s, fill_k = (seq_idx[:1], row_idx[:1]) if n_kept else (np.zeros(1, int), np.zeros(1, int))
    seq_all = np.concatenate([seq_idx, np.repeat(fill_s, pad)]).astype(np.int32)
    row_all = np.concatenate([row_idx, np.repeat(fill_k, pad)]).astype(np.int32)
    is_real = np.arange(total) < n_kept
    out = {
        "noisy": noisy[seq_all, row_all],
        "target": target[seq_all, row_all] & is_real[:, None],
        "seq_index": seq_all,
        "row_index": row_all,
        "row_valid": is_real,
    }
    return {k: v.reshape((m, micro_batch_size) + v.shape[1:]) for k, v in out.items()}


def _row_mean(loss_rows, has_target, num_rows):
    """Σ over rows with targets / max(count, 1), or / num_rows (global count for micro-batch accumulation)."""
    total = jnp.sum(jnp.where(has_target, loss_rows, 0.0))
    denom = jnp.sum(has_target.astype(jnp.float32)) if num_rows is None else jnp.asarray(num_rows, jnp.float32)
    return total / jnp.maximum(denom, 1.0)


def tracerl_policy_loss(logp_new_RxT, logp_old_RxT, target_RxT, adv, eps_low: float = 0.2, eps_high: float = 0.2,
                        beta: float = 0.01, norm: str = "response_len", clip_logratio: float = 10.0, num_rows=None):
    """TraceRL clipped objective with a k3 KL to the old policy (dLLM-RL `forward_process`).

    Per row with targets T: `d = clamp(logp_new - logp_old, ±clip_logratio)` on T, `r = exp(d)`,
    `surr = Σ_T min(r A, clip(r, 1-eps_low, 1+eps_high) A)`, `kl = Σ_T (exp(-d) - 1 + d)`, and
      norm="response_len" (block models, `rl_trado.py`):    loss_row = -surr / T + beta * kl / T   (T = padded len)
      norm="targets"      (full attention, `rl_llada.py`):  loss_row = -surr / |T| + beta * kl
    Loss = mean over rows that have targets (or Σ / num_rows for micro-batch accumulation).

    Args:
      logp_new_RxT, logp_old_RxT: log-probs of the target tokens in each row (anything at non-targets,
        -inf included: it never reaches the loss or the gradient).
      target_RxT: bool targets. adv: `[rows]` (sequence advantage) or `[rows, T]` (value-model `A_j`).
    Returns:
      (loss, metrics) with metrics `pg_loss`, `kl`, `clip_frac` (target-token mean where the clipped branch is
      taken), `ratio_mean`, `num_rows` (rows with targets).
    """
    if norm not in NORMS:
        raise ValueError(f"Unknown TraceRL norm {norm!r}; expected one of {NORMS}.")
    target = jnp.asarray(target_RxT, bool)
    new, old = jnp.asarray(logp_new_RxT, jnp.float32), jnp.asarray(logp_old_RxT, jnp.float32)
    adv = jnp.asarray(adv, jnp.float32)
    adv = adv[:, None] if adv.ndim == 1 else adv
    d = jnp.clip(jnp.where(target, new - old, 0.0), -clip_logratio, clip_logratio)
    ratio = jnp.exp(d)
    unclipped, clipped = ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    surr = jnp.where(target, jnp.minimum(unclipped, clipped), 0.0)
    kl = jnp.where(target, jnp.exp(-d) - 1.0 + d, 0.0)
    n_tgt = jnp.sum(target.astype(jnp.float32), axis=-1)
    has_target = n_tgt > 0
    if norm == "response_len":
        pg_row, kl_row = -jnp.sum(surr, -1) / target.shape[-1], jnp.sum(kl, -1) / target.shape[-1]
    else:
        pg_row, kl_row = -jnp.sum(surr, -1) / jnp.maximum(n_tgt, 1.0), jnp.sum(kl, -1)
    loss = _row_mean(pg_row + beta * kl_row, has_target, num_rows)
    n_all = jnp.maximum(jnp.sum(n_tgt), 1.0)
    metrics = {
        "pg_loss": _row_mean(pg_row, has_target, num_rows),
        "kl": _row_mean(kl_row, has_target, num_rows),
        "clip_frac": jnp.sum(target & (unclipped > clipped)) / n_all,
        "ratio_mean": jnp.sum(jnp.where(target, ratio, 0.0)) / n_all,
        "num_rows": jnp.sum(has_target.astype(jnp.int32)),
    }
    return loss, metrics


def merge_row_values(x_NxKxR, target_NxKxR):
    """Token-level values `[N, R]` from per-row outputs: token j's value is read in the row where it is a target.

    `V_j = V(s_step(j), pos_j)` (dLLM-RL "aggregate fragments"). Every valid token is a target
    in exactly one row, so this is a masked sum over rows; tokens that are never a target get 0.
    """
    target = jnp.asarray(target_NxKxR, bool)
    return jnp.sum(jnp.where(target, jnp.asarray(x_NxKxR, jnp.float32), 0.0), axis=1)


def outcome_reward_on_last_step(reward_N, step_rank_NxR, valid_NxR):
    """Token rewards `[N, R]`: the outcome reward on every token of the LAST decoding step, 0 elsewhere.

    `step_rank_NxR` may be the shrunk step ids or their rank (only the order matters); invalid tokens get 0.
    """
    valid = jnp.asarray(valid_NxR, bool)
    rank = jnp.asarray(step_rank_NxR, jnp.int32)
    last_N = jnp.max(jnp.where(valid, rank, -1), axis=-1)
    on_last = valid & (rank == last_N[:, None])
    return jnp.where(on_last, jnp.asarray(reward_N, jnp.float32)[:, None], 0.0)


def step_level_gae(token_reward_NxR, values_NxR, step_rank_NxR, valid_NxR, gamma: float = 1.0,
                   lam: float = 1.0, max_steps=None):
    """Step-level GAE of the TraceRL diffusion value model (dLLM-RL `train_trado_value.py`).

    Step means `r*_t`, `V*_t` over the tokens of global step rank `t` (segment_sum, `max_steps` segments),
    backwards `R*_t = r*_t + γ R*_{t+1}`, `A*_t = r*_t - V*_t + γ V*_{t+1} + γλ A*_{t+1}` (reverse lax.scan, zero
    past the last step), then per token `R_j = r_j + γ R*_{t+1}`, `A_j = r_j - V_j + γ V*_{t+1} + γλ A*_{t+1}`.

    Args:
      step_rank_NxR: dense global step rank (0..S-1, no gaps) of each token, `< max_steps` for valid tokens.
      max_steps: static number of step slots; None -> R (always enough for dense ranks).
    Returns:
      (adv_NxR, returns_NxR) float32, 0 on invalid tokens.
    """
    valid = jnp.asarray(valid_NxR, bool)
    r = jnp.where(valid, jnp.asarray(token_reward_NxR, jnp.float32), 0.0)
    v = jnp.where(valid, jnp.asarray(values_NxR, jnp.float32), 0.0)
    n, length = r.shape
    s = length if max_steps is None else max_steps
    if not isinstance(s, int) or s < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    seg = jnp.where(valid, jnp.asarray(step_rank_NxR, jnp.int32), s)  # invalid -> dump segment s
    seg_sum = jax.vmap(lambda x, i: jax.ops.segment_sum(x, i, num_segments=s + 1))
    count = jnp.maximum(seg_sum(valid.astype(jnp.float32), seg)[:, :s], 1.0)
    r_star, v_star = seg_sum(r, seg)[:, :s] / count, seg_sum(v, seg)[:, :s] / count
    zero_N1 = jnp.zeros((n, 1), jnp.float32)
    v_next = jnp.concatenate([v_star[:, 1:], zero_N1], axis=1)

    def backward(carry, xs):
        ret_next, adv_next = carry
        r_t, v_t, vn_t = xs
        ret_t = r_t + gamma * ret_next
        adv_t = r_t - v_t + gamma * vn_t + gamma * lam * adv_next
        return (ret_t, adv_t), (ret_t, adv_t)

    init = (jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    _, (ret_star, adv_star) = jax.lax.scan(backward, init, (r_star.T, v_star.T, v_next.T), reverse=True)
    nxt = jnp.minimum(seg + 1, s)  # index of step t+1 in the zero-padded [N, s+1] tables

    def at_next(table_NxS):
        return jnp.take_along_axis(jnp.concatenate([table_NxS, zero_N1], axis=1), nxt, axis=1)

    returns = jnp.where(valid, r + gamma * at_next(ret_star.T), 0.0)
    adv = jnp.where(valid, r - v + gamma * at_next(v_star) + gamma * lam * at_next(adv_star.T), 0.0)
    return adv, returns


def tracerl_value_loss(values_RxT, values_old_RxT, returns_RxT, target_RxT, clip: float | None = 0.2,
                       norm: str = "response_len", num_rows=None):
    """PPO-clipped value loss of the TraceRL value model (dLLM-RL `train_trado_value.py`).

    `0.5 max((V - R)^2, (V_old + clip(V - V_old, ±clip) - R)^2)` summed over the row's targets, divided by the
    padded length T (`norm="response_len"`, official) or by `|T|` (`"targets"`), mean over rows with targets
    (or Σ / num_rows); `clip=None` drops the clipped term (plain `0.5 (V - R)^2`). Returns (loss, metrics) with
    `vf_clip_frac` (target tokens where the clipped term wins).
    """
    if norm not in NORMS:
        raise ValueError(f"Unknown TraceRL norm {norm!r}; expected one of {NORMS}.")
    target = jnp.asarray(target_RxT, bool)
    v, v_old = jnp.asarray(values_RxT, jnp.float32), jnp.asarray(values_old_RxT, jnp.float32)
    ret = jnp.asarray(returns_RxT, jnp.float32)
    l_unclipped = (v - ret) ** 2
    l_clipped = l_unclipped if clip is None else (v_old + jnp.clip(v - v_old, -clip, clip) - ret) ** 2
    per_tok = jnp.where(target, 0.5 * jnp.maximum(l_unclipped, l_clipped), 0.0)
    n_tgt = jnp.sum(target.astype(jnp.float32), axis=-1)
    denom = float(target.shape[-1]) if norm == "response_len" else jnp.maximum(n_tgt, 1.0)
    loss = _row_mean(jnp.sum(per_tok, -1) / denom, n_tgt > 0, num_rows)
    frac = jnp.sum(target & (l_clipped > l_unclipped)) / jnp.maximum(jnp.sum(n_tgt), 1.0)
    return loss, {"vf_loss": loss, "vf_clip_frac": frac}
