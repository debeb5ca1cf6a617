"""Boolean attention-mask builders (diffusion.md §5).

Every mask is "query q may attend key k". Every builder ANDs the key-padding mask and then forces the
diagonal (the query's own slot) to be allowed, so a row that would otherwise see nothing (a left-pad
query) still has one visible key and the softmax never sees an all-masked row (diffusion.md §5, the
official `process_pad`).

Shapes: `valid_BxT` / `key_valid_BxS` are boolean (True = real token); results are `bool[B, T, S]`.
"""
import jax
import jax.numpy as jnp

ATTENTION_KINDS = ("causal", "bidirectional", "block")


def positions_from_mask(valid_BxT: jax.Array) -> jax.Array:
    """RoPE positions that skip padding: `cumsum(valid) - 1`, clipped at 0. int32[B, T]."""
    pos_BxT = jnp.cumsum(valid_BxT.astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos_BxT, 0)


def _finish(allow_BxTxS, key_valid_BxS, q_slot_T, k_slot_S):
    """AND key padding, then force query slot == key slot allowed (diffusion.md §5)."""
    allow_BxTxS = allow_BxTxS & key_valid_BxS[:, None, :].astype(bool)
    diag_TxS = q_slot_T[:, None] == k_slot_S[None, :]
    return allow_BxTxS | diag_TxS[None]


def _blk(i, block_size, start):
    """Block id `floor((i - start) / block_size)` (negative for i < start), diffusion.md §5.3."""
    return jnp.floor_divide(i - start, block_size)


def _check_block_size(block_size):
    if isinstance(block_size, int) and block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}.")


def causal_mask(valid_BxT: jax.Array) -> jax.Array:
    """Causal mask (diffusion.md §5.1): key_valid[k] & (k <= q), diagonal forced. bool[B, T, T]."""
    t = valid_BxT.shape[-1]
    idx = jnp.arange(t)
    allow_TxT = idx[None, :] <= idx[:, None]
    return _finish(jnp.broadcast_to(allow_TxT, (valid_BxT.shape[0], t, t)), valid_BxT, idx, idx)


def bidirectional_mask(valid_BxT: jax.Array) -> jax.Array:
    """Full attention over real keys (diffusion.md §5.2), diagonal forced. bool[B, T, T]."""
    b, t = valid_BxT.shape
    idx = jnp.arange(t)
    return _finish(jnp.ones((b, t, t), bool), valid_BxT, idx, idx)


def block_causal_mask(valid_BxT: jax.Array, block_size: int, start: int = 0) -> jax.Array:
    """Block-causal mask (diffusion.md §5.3): key_valid[k] & blk(k) <= blk(q). bool[B, T, T].

    blk(i) = floor((i - start) / block_size); `start = P` gives response-aligned blocks (negative ids for
    the prompt), `start = 0` absolute alignment. block_size = 1 equals `causal_mask`.
    """
    _check_block_size(block_size)
    b, t = valid_BxT.shape
    idx = jnp.arange(t)
    blk = _blk(idx, block_size, start)
    allow_TxT = blk[None, :] <= blk[:, None]
    return _finish(jnp.broadcast_to(allow_TxT, (b, t, t)), valid_BxT, idx, idx)


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
    s = key_valid_BxS.shape[-1]
    q_slot_T = cache_index + jnp.arange(num_queries)
    k_slot_S = jnp.arange(s)
    allow_TxS = k_slot_S[None, :] <= q_slot_T[:, None]
    allow_BxTxS = jnp.broadcast_to(allow_TxS, (key_valid_BxS.shape[0], num_queries, s))
    return _finish(allow_BxTxS, key_valid_BxS, q_slot_T, k_slot_S)


def cached_block_mask(key_valid_BxS: jax.Array, cache_index, num_queries: int, block_size: int,
                      start: int) -> jax.Array:
    """Block-causal mask of T new tokens over an S-slot KV cache (diffusion.md §4.5, §5.3). bool[B,T,S].

    Query t sits at slot `cache_index + t`; it sees valid slots s with blk(s) <= blk(cache_index + t),
    blk(i) = floor((i - start) / block_size), plus its own slot. Slots of later blocks (stale or empty)
    stay invisible, so a denoise pass of block j sees the committed prefix and block j itself.
    """
    _check_block_size(block_size)
    s = key_valid_BxS.shape[-1]
    q_slot_T = cache_index + jnp.arange(num_queries)
    k_slot_S = jnp.arange(s)
    allow_TxS = _blk(k_slot_S, block_size, start)[None, :] <= _blk(q_slot_T, block_size, start)[:, None]
    allow_BxTxS = jnp.broadcast_to(allow_TxS, (key_valid_BxS.shape[0], num_queries, s))
    return _finish(allow_BxTxS, key_valid_BxS, q_slot_T, k_slot_S)


def bd3_two_stream_mask(n: int, block_size: int) -> jax.Array:
    """BD3-LM / SDAR two-stream mask over `[x_t (n) ; x_0 (n)]` (diffusion.md §5.4). bool[2n, 2n].

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
    """TraceRL mask over `[prompt (P) ; clean response (R) ; noisy response (R)]` (diffusion.md §5.5).

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
