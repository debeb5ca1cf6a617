"""Tests for jaxrl_reason/train/merge.py (DLER update-selective merging) against a numpy stable-argsort reference."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_reason.train import merge as mg


def topk_ref(abs_flat, k):
  """Keep the k largest |Δ|, ties -> lower index first (stable argsort of -|Δ|)."""
  keep = np.zeros(abs_flat.size, bool)
  keep[np.argsort(-abs_flat, kind="stable")[:k]] = True
  return keep


def make_trees(seed=0, ties=False):
  rng = np.random.default_rng(seed)

  def draw(shape, scale):
    x = rng.integers(-3, 4, size=shape).astype(np.float32) if ties else rng.normal(size=shape).astype(np.float32)
    return x * scale

  base = {"embed": draw((6, 5), 1.0), "layers": [{"w": draw((4, 3), 1.0), "b": draw((3,), 1.0)} for _ in range(2)],
          "norm": draw((7,), 1.0), "step": np.array(3, np.int32)}
  tuned = {"embed": base["embed"] + draw((6, 5), 10.0),  # large updates: dominate a global top-k
           "layers": [{"w": l["w"] + draw((4, 3), 0.1), "b": l["b"] + draw((3,), 0.1)} for l in base["layers"]],
           "norm": base["norm"] + draw((7,), 1.0), "step": np.array(9, np.int32)}
  return base, tuned


def flat_float_leaves(tree):
  """(path, array) in jax.tree.leaves order (dict keys sorted), float leaves only."""
  out = []
  for key in sorted(tree):
    v = tree[key]
    if isinstance(v, list):
      for i, layer in enumerate(v):
        for k2 in sorted(layer):
          out.append((f"{key}/{i}/{k2}", layer[k2]))
    elif np.issubdtype(np.asarray(v).dtype, np.floating):
      out.append((key, v))
  return out


def get(tree, path):
  for p in path.split("/"):
    tree = tree[int(p)] if isinstance(tree, list) else tree[p]
  return np.asarray(tree)


@pytest.mark.parametrize("ties", [False, True])
def test_per_tensor_topk_equals_argsort_reference(ties):
  base, tuned = make_trees(1, ties)
  merged = mg.update_selective_merge(base, tuned, top_frac=0.25, scale=0.7)
  for path, b in flat_float_leaves(base):
    delta = (get(tuned, path) - b).reshape(-1)
    keep = topk_ref(np.abs(delta), int(0.25 * delta.size + 0.5))
    np.testing.assert_allclose(get(merged, path).reshape(-1), b.reshape(-1) + 0.7 * np.where(keep, delta, 0),
                               rtol=1e-6, atol=1e-6)
  assert int(merged["step"]) == 3  # non-float leaves keep the base value


@pytest.mark.parametrize("ties", [False, True])
def test_global_topk_equals_argsort_reference(ties):
  base, tuned = make_trees(2, ties)
  leaves = flat_float_leaves(base)
  deltas = [(get(tuned, p) - b).reshape(-1) for p, b in leaves]
  all_delta = np.concatenate(deltas)
  keep = topk_ref(np.abs(all_delta), int(0.3 * all_delta.size + 0.5))
  mask = mg.selection_mask(base, tuned, top_frac=0.3, granularity="global")
  got = np.concatenate([get(mask, p).reshape(-1) for p, _ in leaves])
  np.testing.assert_array_equal(got, keep)
  assert got.sum() == int(0.3 * all_delta.size + 0.5)


def test_global_and_tensor_differ_and_stats():
  base, tuned = make_trees(3)
  stats_t = mg.merge_stats(base, tuned, top_frac=0.25, granularity="tensor")
  stats_g = mg.merge_stats(base, tuned, top_frac=0.25, granularity="global")
  # per tensor: every tensor keeps round(25%) of its entries
  for path, b in flat_float_leaves(base):
    assert stats_t[path]["frac_kept"] == pytest.approx(int(0.25 * b.size + 0.5) / b.size)
  # global: the x10 embedding updates take (almost) the whole budget; the x0.1 layer updates get nothing
  n_total = sum(b.size for _, b in flat_float_leaves(base))
  assert stats_g["total"]["numel"] == n_total == stats_t["total"]["numel"]
  assert stats_g["embed"]["frac_kept"] > 0.5 and stats_g["layers/0/w"]["frac_kept"] == 0.0
  assert stats_g["total"]["mass_kept"] > stats_t["total"]["mass_kept"]
  assert 0.0 < stats_t["embed"]["mass_kept"] <= 1.0


def test_scale_include_dtype_and_edges():
  base, tuned = make_trees(4)
  only_layers = lambda path: path.startswith("layers")  # noqa: E731
  merged = mg.update_selective_merge(base, tuned, top_frac=1.0, scale=0.5, include=only_layers)
  np.testing.assert_allclose(merged["layers"][1]["w"], (base["layers"][1]["w"] + tuned["layers"][1]["w"]) / 2,
                             rtol=1e-6)
  np.testing.assert_array_equal(merged["embed"], base["embed"])  # excluded -> base
  merged_t = mg.update_selective_merge(base, tuned, top_frac=1.0, scale=0.5, include=only_layers, excluded="tuned")
  np.testing.assert_array_equal(merged_t["embed"], tuned["embed"])
  # top_frac 0 -> base; scale 1 with top_frac 1 -> tuned
  np.testing.assert_array_equal(mg.update_selective_merge(base, tuned, top_frac=0.0)["norm"], base["norm"])
  np.testing.assert_allclose(mg.update_selective_merge(base, tuned, 1.0, 1.0)["norm"], tuned["norm"], rtol=1e-6)
  # bf16 leaves: float32 arithmetic, result in bf16
  b16 = {"w": jnp.asarray(base["embed"], jnp.bfloat16)}
  t16 = {"w": jnp.asarray(tuned["embed"], jnp.bfloat16)}
  m16 = mg.update_selective_merge(b16, t16, top_frac=0.5, scale=0.7)["w"]
  assert m16.dtype == jnp.bfloat16
  d = (np.asarray(t16["w"], np.float32) - np.asarray(b16["w"], np.float32)).reshape(-1)
  ref = np.asarray(b16["w"], np.float32).reshape(-1) + 0.7 * np.where(topk_ref(np.abs(d), 15), d, 0)
  np.testing.assert_allclose(np.asarray(m16, np.float32).reshape(-1), ref, rtol=1e-2, atol=1e-2)


def test_errors():
  base, tuned = make_trees(5)
  with pytest.raises(ValueError, match="top_frac"):
    mg.update_selective_merge(base, tuned, top_frac=1.5)
  with pytest.raises(ValueError, match="granularity"):
    mg.update_selective_merge(base, tuned, granularity="layer")
  with pytest.raises(ValueError, match="structure"):
    mg.update_selective_merge(base, {"embed": tuned["embed"]})
  with pytest.raises(ValueError, match="shapes"):
    mg.update_selective_merge({"a": np.zeros(3)}, {"a": np.zeros(4)})
  with pytest.raises(ValueError, match="non-finite"):
    mg.update_selective_merge({"a": np.zeros(3, np.float32)}, {"a": np.array([1, np.nan, 0], np.float32)})
  with pytest.raises(ValueError, match="excluded"):
    mg.update_selective_merge(base, tuned, excluded="zero")
