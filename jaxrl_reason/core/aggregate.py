"""Loss aggregation over a per-token loss matrix (verl `agg_loss`).

Rows are responses (`N = B*G`), columns are response positions (`T`). Every denominator is guarded with
`max(count, 1)`, so empty rows and empty batches give 0, never NaN.

Modes:
  token-mean               Σ m·L / Σ m                                        (DAPO, DLER, LSPO, HAPO, PPO)
  seq-mean-token-sum       mean over non-empty rows of Σ_t m·L
  seq-mean-token-mean      mean over non-empty rows of (Σ_t m·L / Σ_t m)      (original GRPO, GSPO)
  seq-mean-token-sum-norm  mean over non-empty rows of (Σ_t m·L) / C          (Dr.GRPO; C = `const` or T)
  token-sum                Σ m·L, no normalization (Megatron's per-token loss; the learning rate absorbs the scale)

Each mode is one function registered in `AGGREGATIONS` under its name, with the uniform signature
`(seq_sum_N, tok_count_N, n_seqs, num_tokens, const, sum_norm_per_seq, T) -> scalar`; `aggregate` computes the
per-row sums once and calls `AGGREGATIONS[mode]`.

Micro-batching: pass the *global* token / sequence counts of the whole mini-batch as `num_tokens` /
`num_seqs`; then summing `aggregate` over micro-batches equals `aggregate` over the full mini-batch
(verl 0.8 global normalization).
"""
from typing import Callable, Optional

import jax.numpy as jnp

from jaxrl_reason.core.registry import registrar

AGGREGATIONS: dict[str, Callable] = {}
register_aggregation = registrar(AGGREGATIONS)  # @register_aggregation(name): its key is a valid `loss.agg`


def _nonempty(seq_sum_N, tok_count_N):
    return (tok_count_N > 0).astype(seq_sum_N.dtype)


@register_aggregation("token-mean")
def token_mean(seq_sum_N, tok_count_N, n_seqs, num_tokens, const, sum_norm_per_seq, T):
    del n_seqs, const, sum_norm_per_seq, T
    n_tok = jnp.sum(tok_count_N) if num_tokens is None else jnp.asarray(num_tokens, seq_sum_N.dtype)
    return jnp.sum(seq_sum_N) / jnp.maximum(n_tok, 1.0)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(seq_sum_N, tok_count_N, n_seqs, num_tokens, const, sum_norm_per_seq, T):
    del num_tokens, const, sum_norm_per_seq, T
    return jnp.sum(seq_sum_N * _nonempty(seq_sum_N, tok_count_N)) / n_seqs


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(seq_sum_N, tok_count_N, n_seqs, num_tokens, const, sum_norm_per_seq, T):
    del num_tokens, const, sum_norm_per_seq, T
    seq_mean_N = seq_sum_N / jnp.maximum(tok_count_N, 1.0)
    return jnp.sum(seq_mean_N * _nonempty(seq_sum_N, tok_count_N)) / n_seqs


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(seq_sum_N, tok_count_N, n_seqs, num_tokens, const, sum_norm_per_seq, T):
    del num_tokens
    if const is not None and isinstance(const, (int, float)) and const <= 0:
        raise ValueError(f"aggregate const must be positive, got {const}.")
    c = float(T) if const is None else const
    if not sum_norm_per_seq:
        return jnp.sum(seq_sum_N) / c
    return jnp.sum(seq_sum_N * _nonempty(seq_sum_N, tok_count_N)) / n_seqs / c


@register_aggregation("token-sum")
def token_sum(seq_sum_N, tok_count_N, n_seqs, num_tokens, const, sum_norm_per_seq, T):
    """Σ m·L: sums over micro-batches without any global count, so it needs none."""
    del tok_count_N, n_seqs, num_tokens, const, sum_norm_per_seq, T
    return jnp.sum(seq_sum_N)


AGG_MODES = tuple(AGGREGATIONS)


def check_agg_mode(mode: str) -> None:
    """Raises ValueError (at trace time) when `mode` is not a registered aggregation."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"Unknown loss aggregation mode {mode!r}; expected one of {tuple(AGGREGATIONS)}.")


def masked_mean(x, mask, axis=None):
    """Σ m·x / max(Σ m, 1) over `axis` (all axes when None); 0 where nothing is valid."""
    mask = jnp.asarray(mask, jnp.float32)
    x = jnp.asarray(x)
    total = jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis)
    return total / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def aggregate(
    loss_NxT,
    mask_NxT,
    mode: str = "token-mean",
    const: Optional[float] = None,
    num_tokens=None,
    num_seqs=None,
    sum_norm_per_seq: bool = True,
):
    """Aggregates a per-token loss `[N, T]` into a scalar.

    Args:
      loss_NxT: per-token loss `[N, T]`.
      mask_NxT: response mask `[N, T]` (1 = real token, 0 = padding); weights in [0, 1] also work.
      mode: a key of `AGGREGATIONS` (static; unknown -> ValueError at trace time).
      const: the constant C of `seq-mean-token-sum-norm` (e.g. the max response length); None -> T.
      num_tokens: optional global token count used as the token-mean denominator (micro-batching).
      num_seqs: optional global count of non-empty rows used as the seq-mean denominator (micro-batching).
      sum_norm_per_seq: `seq-mean-token-sum-norm` only. True (default): Σ m·L / (num_seqs · C), as verl 0.8,
        TRL `dr_grpo` and the Dr.GRPO paper. False: Σ m·L / C, the older verl (0.4-0.7) formula (it scales with
        the batch size). [switch; the two verl versions differ]

    Returns:
      Scalar loss (float32 or wider). 0 when no token is valid.
    """
    check_agg_mode(mode)
    mask = jnp.asarray(mask_NxT, jnp.float32)
    loss = jnp.asarray(loss_NxT)
    if loss.ndim != 2 or loss.shape != mask.shape:
        raise ValueError(f"aggregate needs loss and mask of the same [N, T] shape, got {loss.shape} and {mask.shape}.")
    # where() keeps NaN/inf in padded positions from leaking into the sum.
    masked = jnp.where(mask > 0, loss * mask, 0.0)
    tok_count_N = jnp.sum(mask, axis=-1)
    seq_sum_N = jnp.sum(masked, axis=-1)
    if num_seqs is None:
        n_seqs = jnp.sum(_nonempty(seq_sum_N, tok_count_N))
    else:
        n_seqs = jnp.asarray(num_seqs, seq_sum_N.dtype)
    n_seqs = jnp.maximum(n_seqs, 1.0)
    return AGGREGATIONS[mode](seq_sum_N, tok_count_N, n_seqs, num_tokens, const, sum_norm_per_seq, loss.shape[-1])
