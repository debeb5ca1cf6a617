"""Decode attention over a KV cache whose prompt part is stored once per group of rows.

An RL round samples G responses per prompt, so the G rows of a group hold the same prompt K/V. The shared-prefix
cache (`PrefixLayerCache`) keeps that part once per group (`prompt`: [B / G, ...] over the P prompt slots) and the
response K/V once per row (`own`: [B, ...] over the response slots). A decode step groups its queries as
[B / G, G, ...], so each group's prompt keys are read once for its G rows (one matmul of G x query-heads rows
instead of G matrix-vector products), and scores its own response keys per row; both score blocks go through
one softmax (one shared max, one normaliser), so the output equals softmax attention over [prompt; response]
keys up to float rounding.

The prompt part's mask is the prompt's key validity only: every query of the cached decode sits after the
prompt, so causality never hides a prompt key. The own part's mask is [B, T, S] over the S own slots.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class PrefixLayerCache(NamedTuple):
    """One layer's shared-prefix cache: two `LayerCache`s (K [.., n_kv, head_dim, slots], V [.., n_kv, slots,
    head_dim]), the prompt one with a row per group, the own one with a row per sample. With stacked layers each
    field carries a leading layer axis."""
    prompt: Any  # LayerCache, [B / G, ...] rows, P slots
    own: Any  # LayerCache, [B, ...] rows, response slots

    @property
    def slots(self) -> int:
        return self.own.v.shape[-2]


class PrefixMask(NamedTuple):
    """Visibility for `attend`: prompt key validity per group, and "query t may attend own slot s" per row."""
    prompt_valid_bxP: jax.Array  # bool [B / G, P]
    own_BxTxS: jax.Array  # bool [B, T, S]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, T, S) of the own part: the shape the model checks against its queries and cache."""
        return tuple(self.own_BxTxS.shape)


def _to_rows(x_bxKxGxQxY):
    """[b, K, G, Q, ...] (per group) -> [B, K, Q, ...] (per row, rows of a group contiguous)."""
    b, kv, g_rows = x_bxKxGxQxY.shape[:3]
    return jnp.swapaxes(x_bxKxGxQxY, 1, 2).reshape(b * g_rows, kv, *x_bxKxGxQxY.shape[3:])


def _to_groups(x_BxKxQxY, groups):
    """[B, K, Q, ...] (per row) -> [b, K, G, Q, ...] (per group)."""
    b_all, kv = x_BxKxQxY.shape[:2]
    return jnp.swapaxes(x_BxKxQxY.reshape(groups, b_all // groups, kv, *x_BxKxQxY.shape[2:]), 1, 2)


def attend(q_BxTxNxH, prompt_k_bxKxHxP, prompt_v_bxKxPxH, own_k_BxKxHxS, own_v_BxKxSxH, mask: PrefixMask):
    """Grouped-query softmax attention of q [B, T, N, H] over a group's prompt K/V ([B / G, K, H, P] and
    [B / G, K, P, H]) and the row's own K/V ([B, K, H, S] and [B, K, S, H]), one softmax
    over both, scores in float32. Query head n uses kv head n // (N // K), as `attention_ops.einsum_attention`.
    Returns [B, T, N, H] in q's dtype; a query with no visible key gets zeros."""
    b_all, t, n, h = q_BxTxNxH.shape
    groups, kv = prompt_k_bxKxHxP.shape[:2]
    if b_all % groups:
        raise ValueError(f"{b_all} query rows do not split into the {groups} groups of the prompt cache.")
    s = own_k_BxKxHxS.shape[-1]
    g, q_rows = n // kv, n // kv * t
    q_BxKxQxH = q_BxTxNxH.reshape(b_all, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b_all, kv, q_rows, h)
    q_bxKxGQxH = _to_groups(q_BxKxQxH, groups).reshape(groups, kv, -1, h)
    scale = h ** -0.5
    sp_bxKxGQxP = jnp.einsum("bkqh,bkhp->bkqp", q_bxKxGQxH, prompt_k_bxKxHxP,
                             preferred_element_type=jnp.float32) * scale
    sp_BxKxQxP = _to_rows(sp_bxKxGQxP.reshape(groups, kv, b_all // groups, q_rows, -1))
    so_BxKxQxS = jnp.einsum("bkqh,bkhs->bkqs", q_BxKxQxH, own_k_BxKxHxS, preferred_element_type=jnp.float32) * scale
    valid_p = jnp.repeat(mask.prompt_valid_bxP.astype(bool), b_all // groups, axis=0)[:, None, None, :]
    valid_o = jnp.broadcast_to(mask.own_BxTxS.astype(bool)[:, None, None], (b_all, 1, g, t, s)).reshape(
        b_all, 1, q_rows, s)
    low = jnp.finfo(jnp.float32).min
    m_BxKxQ = jnp.maximum(jnp.max(jnp.where(valid_p, sp_BxKxQxP, low), axis=-1),
                          jnp.max(jnp.where(valid_o, so_BxKxQxS, low), axis=-1))
    ep_BxKxQxP = jnp.where(valid_p, jnp.exp(sp_BxKxQxP - m_BxKxQ[..., None]), 0.0)
    eo_BxKxQxS = jnp.where(valid_o, jnp.exp(so_BxKxQxS - m_BxKxQ[..., None]), 0.0)
    norm_BxKxQ = jnp.sum(ep_BxKxQxP, axis=-1) + jnp.sum(eo_BxKxQxS, axis=-1)
    ep_bxKxGQxP = _to_groups(ep_BxKxQxP, groups).reshape(groups, kv, -1, ep_BxKxQxP.shape[-1])
    out_p = jnp.einsum("bkqp,bkph->bkqh", ep_bxKxGQxP.astype(prompt_v_bxKxPxH.dtype), prompt_v_bxKxPxH,
                       preferred_element_type=jnp.float32)
    out_o = jnp.einsum("bkqs,bksh->bkqh", eo_BxKxQxS.astype(own_v_BxKxSxH.dtype), own_v_BxKxSxH,
                       preferred_element_type=jnp.float32)
    out_BxKxQxH = _to_rows(out_p.reshape(groups, kv, b_all // groups, q_rows, h)) + out_o
    out_BxKxQxH = out_BxKxQxH / jnp.where(norm_BxKxQ > 0, norm_BxKxQ, 1.0)[..., None]
    out = out_BxKxQxH.reshape(b_all, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b_all, t, n, h)
    return out.astype(q_BxTxNxH.dtype)
