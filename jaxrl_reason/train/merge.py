"""DLER update-selective weight merging (arXiv 2510.15110).

    Δ = θ_tuned − θ_base ;  mask = top-`top_frac` of |Δ| ;  θ_merge = θ_base + scale · (mask ⊙ Δ)

[INFERRED] The paper does not say whether the top-25% is taken per tensor or over all parameters, nor
whether embeddings / norms take part: `granularity="tensor"` (default, robust to scale differences between
tensors) or `"global"`, and an `include(path) -> bool` filter; excluded leaves (and non-float leaves) take the
base value (`excluded="base"`) or the tuned value (`excluded="tuned"`).

Exact top-k without a sort: |Δ| (float32) is non-negative, so its int32 bit pattern is monotone in the value;
a 31-step bisection over bit patterns finds the k-th largest value τ (one jitted counting pass per step, leaf by
leaf, recomputing |Δ|: a global top-k never concatenates or copies the model). Every |Δ| > τ is kept, plus the
first ties == τ in (leaf order of `jax.tree.leaves`, row-major index) order: exactly k = round(top_frac · n)
entries (half up), deterministic, equal to a stable argsort of −|Δ|. Host-driven (not jittable as a whole).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

GRANULARITIES = ("tensor", "global")
_INF_BITS = 0x7F800000  # bit pattern of +inf in float32: the largest finite |Δ| is below it


def path_str(path) -> str:
    """'a/b/0/c' from a jax key path (DictKey, SequenceKey, GetAttrKey, FlattenedIndexKey)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _abs_delta_bits(base, tuned):
    """int32 bit patterns of |tuned - base| (float32), flattened: monotone in the value for finite |Δ|."""
    delta = jnp.abs(tuned.astype(jnp.float32) - base.astype(jnp.float32)).ravel()
    return jax.lax.bitcast_convert_type(delta, jnp.int32)


# Bits are recomputed inside every pass instead of stored: memory stays at base + tuned + one leaf's temporaries.
@jax.jit
def _count_ge(base, tuned, t):
    return jnp.sum(_abs_delta_bits(base, tuned) >= t, dtype=jnp.int32)


@jax.jit
def _max_bits(base, tuned):
    return jnp.max(_abs_delta_bits(base, tuned), initial=0)


@jax.jit
def _select(base, tuned, tau, offset, need):
    bits = _abs_delta_bits(base, tuned)
    tie = bits == tau
    tie_rank = jnp.cumsum(tie, dtype=jnp.int32) + offset
    keep = (bits > tau) | (tie & (tie_rank <= need))
    return keep.reshape(base.shape), jnp.sum(tie, dtype=jnp.int32)


def _topk_masks(pairs, k: int):
    """Bool masks (leaf shapes) keeping exactly the k largest |Δ| over all (base, tuned) `pairs` (stable ties)."""
    if k <= 0:
        return [jnp.zeros(b.shape, bool) for b, _ in pairs]
    lo, hi = 0, _INF_BITS
    while lo < hi:  # largest t with count(bits >= t) >= k
        mid = lo + (hi - lo + 1) // 2
        if sum(int(_count_ge(b, t, mid)) for b, t in pairs) >= k:
            lo = mid
        else:
            hi = mid - 1
    n_above = sum(int(_count_ge(b, t, lo + 1)) for b, t in pairs)
    need, offset, masks = k - n_above, 0, []
    for b, t in pairs:
        m, n_tie = _select(b, t, lo, offset, need)
        masks.append(m)
        offset += int(n_tie)
    return masks


def _round_k(top_frac: float, n: int) -> int:
    return min(int(top_frac * n + 0.5), n)


def _check(base_params, tuned_params, top_frac, granularity):
    if not 0.0 <= top_frac <= 1.0:
        raise ValueError(f"top_frac must be in [0, 1], got {top_frac}.")
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown merge granularity {granularity!r}; expected one of {GRANULARITIES}.")
    if jax.tree.structure(base_params) != jax.tree.structure(tuned_params):
        raise ValueError("base_params and tuned_params must have the same pytree structure.")


def selection_mask(base_params, tuned_params, top_frac: float = 0.25, granularity: str = "tensor",
                   include: Optional[Callable[[str], bool]] = None):
    """Pytree of bool masks (leaf shapes) marking the kept updates; excluded / non-float leaves are all False."""
    _check(base_params, tuned_params, top_frac, granularity)
    flat_b, treedef = jax.tree_util.tree_flatten_with_path(base_params)
    flat_t = jax.tree.leaves(tuned_params)
    chosen, pairs = [], []
    for (path, b), t in zip(flat_b, flat_t):
        b, t = jnp.asarray(b), jnp.asarray(t)
        if b.shape != t.shape:
            raise ValueError(f"Leaf {path_str(path)!r} has shapes {b.shape} (base) and {t.shape} (tuned).")
        use = jnp.issubdtype(b.dtype, jnp.floating) and (include is None or include(path_str(path)))
        chosen.append(use)
        if use:
            if int(_max_bits(b, t)) >= _INF_BITS:
                raise ValueError(f"Leaf {path_str(path)!r} has a non-finite update tuned - base.")
            pairs.append((b, t))
    if granularity == "global":
        kept = iter(_topk_masks(pairs, _round_k(top_frac, sum(b.size for b, _ in pairs))))
    else:
        kept = iter(m for pair in pairs for m in _topk_masks([pair], _round_k(top_frac, pair[0].size)))
    masks = [next(kept) if use else jnp.zeros(jnp.shape(b), bool) for (_, b), use in zip(flat_b, chosen)]
    return jax.tree.unflatten(treedef, masks)


def update_selective_merge(base_params, tuned_params, top_frac: float = 0.25, scale: float = 0.7,
                           granularity: str = "tensor", include: Optional[Callable[[str], bool]] = None,
                           excluded: str = "base"):
    """θ = base + scale · (mask ⊙ (tuned − base)) on any pytree of arrays.

    Arithmetic in float32, result cast to each base leaf's dtype. `include(path)` gets 'a/b/0/c' paths;
    leaves it rejects (and non-float leaves) become `excluded` = "base" or "tuned". DLER: top_frac 0.25, scale 0.7.
    """
    if excluded not in ("base", "tuned"):
        raise ValueError(f"excluded must be 'base' or 'tuned', got {excluded!r}.")
    mask = selection_mask(base_params, tuned_params, top_frac, granularity, include)

    def merge_leaf(path, b, t, m):
        b, t = jnp.asarray(b), jnp.asarray(t)
        use = jnp.issubdtype(b.dtype, jnp.floating) and (include is None or include(path_str(path)))
        if not use:
            return b if excluded == "base" else t.astype(b.dtype)
        b32 = b.astype(jnp.float32)
        return (b32 + scale * jnp.where(m, t.astype(jnp.float32) - b32, 0.0)).astype(b.dtype)

    return jax.tree_util.tree_map_with_path(merge_leaf, base_params, tuned_params, mask)


def merge_stats(base_params, tuned_params, top_frac: float = 0.25, granularity: str = "tensor",
                include: Optional[Callable[[str], bool]] = None) -> dict:
    """Per included tensor: {"frac_kept", "numel", "mass_kept" (share of Σ|Δ| kept)}; plus "total" over them."""
    mask = selection_mask(base_params, tuned_params, top_frac, granularity, include)
    flat_b = jax.tree_util.tree_flatten_with_path(base_params)[0]
    stats, tot = {}, {"kept": 0, "numel": 0, "mass": 0.0, "mass_kept": 0.0}
    for (path, b), t, m in zip(flat_b, jax.tree.leaves(tuned_params), jax.tree.leaves(mask)):
        b = jnp.asarray(b)
        if not (jnp.issubdtype(b.dtype, jnp.floating) and (include is None or include(path_str(path)))):
            continue
        ad = jnp.abs(jnp.asarray(t, jnp.float32) - b.astype(jnp.float32))
        kept, mass, mass_kept = int(jnp.sum(m)), float(jnp.sum(ad)), float(jnp.sum(jnp.where(m, ad, 0.0)))
        stats[path_str(path)] = {"frac_kept": kept / max(b.size, 1), "numel": int(b.size),
                                 "mass_kept": mass_kept / mass if mass > 0 else 0.0}
        tot = {"kept": tot["kept"] + kept, "numel": tot["numel"] + b.size, "mass": tot["mass"] + mass,
               "mass_kept": tot["mass_kept"] + mass_kept}
    stats["total"] = {"frac_kept": tot["kept"] / max(tot["numel"], 1), "numel": tot["numel"],
                      "mass_kept": tot["mass_kept"] / tot["mass"] if tot["mass"] > 0 else 0.0}
    return stats
