"""Attention masks: boolean builders and `AttentionMask`, the form a fused kernel can take.

Every mask is "query q may attend key k". Every builder ANDs the key-padding mask and then forces the
diagonal (the query's own slot) to be allowed, so a row that would otherwise see nothing (a left-pad
query) still has one visible key and the softmax never sees an all-masked row (as the official diffusion
code's `process_pad` does).

`AttentionMask` keeps a mask as a pattern over slots (causal, bidirectional, block-causal) plus key validity
[B, S], so a kernel gets padding as segment ids or a key-padding mask instead of a dense [B, T, S] array;
`dense()` gives the boolean mask, the only form of the two-stream masks.

Shapes: `valid_BxT` / `key_valid_BxS` are boolean (True = real token); dense masks are `bool[B, T, S]`.
"""
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

ATTENTION_KINDS = ("causal", "bidirectional", "block")
MASK_KINDS = (*ATTENTION_KINDS, "dense")


def positions_from_mask(valid_BxT: jax.Array) -> jax.Array:
    """RoPE positions that skip padding: `cumsum(valid) - 1`, clipped at 0. int32[B, T]."""
    pos_BxT = jnp.cumsum(valid_BxT.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos_BxT, 0)


def _finish(allow_BxTxS, key_valid_BxS, q_slot_T, k_slot_S):
    """AND key padding, then force query slot == key slot allowed."""
    allow_BxTxS = allow_BxTxS & key_valid_BxS[:, None, :].astype(bool)
    diag_TxS = q_slot_T[:, None] == k_slot_S[None, :]
    return allow_BxTxS | diag_TxS[None]


def _blk(i, block_size, start):
    """Block id `floor((i - start) / block_size)` (negative for i < start)."""
    return jnp.floor_divide(i - start, block_size)


def _check_block_size(block_size):
    if isinstance(block_size, int) and block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}.")


def _allow(kind, q_slot_T, k_slot_S, block_size, start):
    """The pattern alone: bool[T, S], True where slot k is visible from slot q."""
    if kind == "causal":
        return k_slot_S[None, :] <= q_slot_T[:, None]
    if kind == "block":
        return _blk(k_slot_S, block_size, start)[None, :] <= _blk(q_slot_T, block_size, start)[:, None]
    return jnp.ones((q_slot_T.shape[0], k_slot_S.shape[0]), bool)


@struct.dataclass
class AttentionMask:
    """"Query t may attend key s" as a pattern over slots plus key padding, or an explicit boolean mask.

    kind "causal" | "bidirectional" | "block": key s is visible from query t when the pattern allows slot s
    from the query's slot and `key_valid_BxS[s]`; the query's own slot is always visible. Query t sits at slot t
    (`q_offset is None`: self-attention, T == S) or at `q_offset + t` over a KV cache (q_offset may be traced).
    Block ids are floor((slot - start) / block_size). kind "dense": `dense_BxTxS` is the mask (two-stream masks).
    """
    key_valid_BxS: jax.Array | None = None
    q_offset: Any = None
    dense_BxTxS: jax.Array | None = None
    kind: str = struct.field(pytree_node=False, default="causal")
    num_queries: int = struct.field(pytree_node=False, default=0)
    block_size: int = struct.field(pytree_node=False, default=1)
    start: int = struct.field(pytree_node=False, default=0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, T, S), the shape of `dense()`."""
        if self.kind == "dense":
            return tuple(self.dense_BxTxS.shape)
        return (self.key_valid_BxS.shape[0], self.num_queries, self.key_valid_BxS.shape[1])

    @property
    def self_attention(self) -> bool:
        """True when query t sits at slot t (no cache offset), so segment ids and kernel patterns apply."""
        return self.kind != "dense" and self.q_offset is None

    def dense(self) -> jax.Array:
        """The boolean mask bool[B, T, S]."""
        if self.kind == "dense":
            return self.dense_BxTxS.astype(bool)
        b, t, s = self.shape
        q_slot_T = (0 if self.q_offset is None else self.q_offset) + jnp.arange(t)
        k_slot_S = jnp.arange(s)
        allow_TxS = _allow(self.kind, q_slot_T, k_slot_S, self.block_size, self.start)
        return _finish(jnp.broadcast_to(allow_TxS, (b, t, s)), self.key_valid_BxS, q_slot_T, k_slot_S)

    def segment_ids(self) -> jax.Array:
        """int32[B, S]: 0 for real slots, slot + 1 for padding (self-attention only).

        Query and key share ids, so with the pattern a real query sees exactly the real keys it sees in
        `dense()`, and a padding query sees only its own slot (a finite row; `dense()` also lets it see real
        keys, a difference confined to padding rows, which no real token attends to).
        """
        if not self.self_attention:
            raise ValueError("segment_ids needs a self-attention pattern mask (no cache offset, not dense).")
        s = self.key_valid_BxS.shape[1]
        return jnp.where(self.key_valid_BxS.astype(bool), 0, jnp.arange(1, s + 1, dtype=jnp.int32)).astype(jnp.int32)


def _pattern_mask(kind, key_valid_BxS, num_queries=None, q_offset=None, block_size=1, start=0):
    _check_block_size(block_size)
    key_valid_BxS = jnp.asarray(key_valid_BxS).astype(bool)
    t = key_valid_BxS.shape[-1] if num_queries is None else num_queries
    return AttentionMask(key_valid_BxS=key_valid_BxS, q_offset=q_offset, kind=kind, num_queries=t,
                         block_size=block_size, start=start)


def causal(valid_BxT: jax.Array) -> AttentionMask:
    """Causal self-attention over T slots; `.dense()` == `causal_mask(valid_BxT)`."""
    return _pattern_mask("causal", valid_BxT)


def bidirectional(valid_BxT: jax.Array) -> AttentionMask:
    """Full self-attention over real keys; `.dense()` == `bidirectional_mask(valid_BxT)`."""
    return _pattern_mask("bidirectional", valid_BxT)


def block_causal(valid_BxT: jax.Array, block_size: int, start: int = 0) -> AttentionMask:
    """Block-causal self-attention; `.dense()` == `block_causal_mask(valid_BxT, block_size, start)`."""
    return _pattern_mask("block", valid_BxT, block_size=block_size, start=start)


def pattern(kind: str, valid_BxT: jax.Array, block_size: int = 1, start: int = 0) -> AttentionMask:
    """`AttentionMask` for kind in ("causal", "bidirectional", "block")."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"Unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}.")
    return _pattern_mask(kind, valid_BxT, block_size=block_size if kind == "block" else 1,
                         start=start if kind == "block" else 0)


def cached_causal(key_valid_BxS: jax.Array, cache_index, num_queries: int) -> AttentionMask:
    """`cached_causal_mask` as an `AttentionMask`."""
    return _pattern_mask("causal", key_valid_BxS, num_queries, cache_index)


def cached_block(key_valid_BxS: jax.Array, cache_index, num_queries: int, block_size: int,
                 start: int) -> AttentionMask:
    """`cached_block_mask` as an `AttentionMask`."""
    return _pattern_mask("block", key_valid_BxS, num_queries, cache_index, block_size, start)


def explicit(mask_BxTxS: jax.Array) -> AttentionMask:
    """An explicit boolean mask bool[B, T, S] (two-stream masks), taken by the einsum path only."""
    return AttentionMask(dense_BxTxS=jnp.asarray(mask_BxTxS), kind="dense")


def as_mask(mask) -> AttentionMask:
    """An `AttentionMask`, or a bool[B, T, S] array wrapped as an explicit one."""
    return mask if isinstance(mask, AttentionMask) else explicit(mask)


def causal_mask(valid_BxT: jax.Array) -> jax.Array:
    """Causal mask: key_valid[k] & (k <= q), diagonal forced. bool[B, T, T]."""
    return causal(valid_BxT).dense()


def bidirectional_mask(valid_BxT: jax.Array) -> jax.Array:
    """Full attention over real keys, diagonal forced. bool[B, T, T]."""
    return bidirectional(valid_BxT).dense()


def block_causal_mask(valid_BxT: jax.Array, block_size: int, start: int = 0) -> jax.Array:
    """Block-causal mask: key_valid[k] & blk(k) <= blk(q). bool[B, T, T].

    blk(i) = floor((i - start) / block_size); `start = P` gives response-aligned blocks (negative ids for
    the prompt), `start = 0` absolute alignment. block_size = 1 equals `causal_mask`.
    """
    return block_causal(valid_BxT, block_size, start).dense()


def attention_mask(kind: str, valid_BxT: jax.Array, block_size: int = 1, start: int = 0) -> jax.Array:
    """Dispatch on `kind` in ("causal", "bidirectional", "block") -> bool[B, T, T]."""
    if kind == "causal":
        return causal_mask(valid_BxT)
    if kind == "bidirectional":
        return bidirectional_mask(valid_BxT)
    if kind == "block":
        return block_causal_mask(valid_BxT, block_size, start)
    raise ValueError(f"Unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}.")


def cached_causal_mask(key_valid_BxS: jax.Array, cache_index, num_queries: int) -> jax.Array:
    """Causal mask of T = num_queries new tokens over an S-slot KV cache. bool[B, T, S].

    Query t sits at cache slot `cache_index + t` (cache_index may be traced); it sees valid slots
    `s <= cache_index + t`, plus its own slot. `key_valid_BxS` must mark the slots of real tokens,
    including the new ones.
    """
    return cached_causal(key_valid_BxS, cache_index, num_queries).dense()


def cached_block_mask(key_valid_BxS: jax.Array, cache_index, num_queries: int, block_size: int,
                      start: int) -> jax.Array:
    """Block-causal mask of T new tokens over an S-slot KV cache. bool[B,T,S].

    Query t sits at slot `cache_index + t`; it sees valid slots s with blk(s) <= blk(cache_index + t),
    blk(i) = floor((i - start) / block_size), plus its own slot. Slots of later blocks (stale or empty)
    stay invisible, so a denoise pass of block j sees the committed prefix and block j itself.
    """
    return cached_block(key_valid_BxS, cache_index, num_queries, block_size, start).dense()


def bd3_two_stream_mask(n: int, block_size: int) -> jax.Array:
    """BD3-LM / SDAR two-stream mask over `[x_t (n) ; x_0 (n)]`. bool[2n, 2n].

    noisy->noisy same block; noisy->clean strictly earlier blocks; clean->clean same or earlier blocks;
    clean->noisy never. Both copies share positions, so the caller passes positions `concat([p, p])`.
    """
    _check_block_size(block_size)
    idx = jnp.arange(2 * n)
    clean = idx >= n
    blk = jnp.floor_divide(idx - n * clean, block_size)
    cq, ck = clean[:, None], clean[None, :]
    bq, bk = blk[:, None], blk[None, :]
    return ((~cq & ~ck & (bk == bq))
          | (~cq & ck & (bk < bq))
          | (cq & ck & (bk <= bq)))


def tracerl_mask(prompt_len: int, response_len: int, block_size: int,
                 key_valid_BxL: jax.Array) -> jax.Array:
    """TraceRL mask over `[prompt (P) ; clean response (R) ; noisy response (R)]`.

    Classes: prompt q < P, clean P <= q < P+R, noisy q >= P+R; blocks counted from the response start
    (negative ids for the prompt). prompt->prompt block-causal; clean->prompt all, clean->clean j' <= j;
    noisy->prompt all, noisy->clean j' < j, noisy->noisy j' == j; everything else never.
    Then AND key_valid[k] and force the diagonal. Returns bool[B, L, L], L = P + 2R.
    """
    _check_block_size(block_size)
    p, r = prompt_len, response_len
    length = p + 2 * r
    if key_valid_BxL.shape[-1] != length:
        raise ValueError(f"key_valid_BxL has length {key_valid_BxL.shape[-1]} but P + 2R = {length}.")
    idx = jnp.arange(length)
    cls = jnp.where(idx < p, 0, jnp.where(idx < p + r, 1, 2))
    blk = jnp.floor_divide(jnp.where(cls == 2, idx - p - r, idx - p), block_size)
    cq, ck = cls[:, None], cls[None, :]
    bq, bk = blk[:, None], blk[None, :]
    allow_LxL = (((ck == 0) & ((cq != 0) | (bk <= bq)))
               | ((cq == 1) & (ck == 1) & (bk <= bq))
               | ((cq == 2) & (ck == 1) & (bk < bq))
               | ((cq == 2) & (ck == 2) & (bk == bq)))
    allow_BxLxL = jnp.broadcast_to(allow_LxL, (key_valid_BxL.shape[0], length, length))
    return _finish(allow_BxLxL, key_valid_BxL, idx, idx)
