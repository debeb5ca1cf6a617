"""Rows of `bench_sampler.py --reshard`: the trainer's float32 weights -> the sampler's bf16 decode layout.

For each model shape and sampler tensor size: a random model is initialised directly in the training layout
(`--train_mesh`, default FSDP over every device), then `sampling/weights.sampler_params` casts it to bf16 and
reshards it into the decode mesh (devices / tensor, 1, tensor) on device. The table reports that transfer (best of
`repeats` calls, compile excluded and reported apart), the bf16 bytes it produces per second, and for comparison
the host round trip it replaces (`jax.device_get`, cast in numpy, `jax.device_put` to the same shardings).
"match" = the two give bit-identical arrays with the same shardings.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.sampling import weights as weights_lib

SHAPES = {  # (vocab, hidden, intermediate, layers, heads, kv_heads)
    "llama-1M": (1024, 128, 384, 4, 4, 2),
    "llama-30M": (8192, 512, 1408, 8, 8, 4),
    "qwen2.5-0.5B": (151936, 896, 4864, 24, 14, 2),
    "llama-3.2-1B": (128256, 2048, 8192, 16, 32, 8),
}


def parse_shape(name: str) -> tuple:
    """A SHAPES name or six comma-separated ints (vocab,hidden,intermediate,layers,heads,kv_heads)."""
    if name in SHAPES:
        return SHAPES[name]
    parts = name.split(",")
    if len(parts) != 6 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"model shape {name!r} is neither one of {sorted(SHAPES)} nor six positive ints "
                         "vocab,hidden,intermediate,layers,heads,kv_heads.")
    return tuple(int(p) for p in parts)


def train_params(shape, mesh):
    """float32 params of a random model of `shape`, created directly in the training layout on `mesh`."""
    vocab, hidden, inter, layers, heads, kv = shape
    cfg = TransformerConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                            num_heads=heads, num_kv_heads=kv)
    make = lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)[1]  # noqa: E731
    shardings = sharding_lib.param_shardings(jax.eval_shape(make), mesh)
    return jax.jit(make, out_shardings=shardings)()


def _best(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best, out


def _mesh_str(mesh) -> str:
    return " x ".join(str(mesh.shape[a]) for a in sharding_lib.MESH_AXES)


def reshard_rows(names, train_mesh, tensors, repeats):
    """One row per (model shape, see `parse_shape`; sampler tensor size that divides the device count)."""
    rows = []
    for name in names:
        params = train_params(parse_shape(name), train_mesh)
        n = sum(x.size for x in jax.tree.leaves(params))
        for tensor in [t for t in tensors if jax.device_count() % t == 0]:
            mesh = weights_lib.decode_mesh(tensor)
            shardings = weights_lib.sampler_shardings(params, mesh)
            t0 = time.perf_counter()
            jax.block_until_ready(weights_lib.sampler_params(params, shardings, jnp.bfloat16))
            first = time.perf_counter() - t0
            dev_s, out = _best(lambda: weights_lib.sampler_params(params, shardings, jnp.bfloat16), repeats)
            host = lambda: jax.device_put(  # noqa: E731
                jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), jax.device_get(params)), shardings)
            host_s, ref = _best(host, repeats)
            same = all(a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))
                       for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
            rows.append({"model": name, "params": f"{n / 1e6:.1f}M", "bf16 MB": f"{2 * n / 2**20:.0f}",
                         "train mesh": _mesh_str(train_mesh), "sampler mesh": _mesh_str(mesh),
                         "reshard ms": f"{1e3 * dev_s:.2f}", "bf16 GB/s": f"{2 * n / dev_s / 1e9:.2f}",
                         "host round trip ms": f"{1e3 * host_s:.2f}", "compile s": f"{max(first - dev_s, 0):.2f}",
                         "match": same})
            del out, ref
        del params
    return rows
