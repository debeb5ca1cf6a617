"""The sampler's own weight layout, and the in-process reshard of the trainer's weights into it.

Training keeps float32 master weights laid out for the update (with FSDP every matrix is split over 'fsdp' and
gathered whole for each matmul). Decoding is bound by weight bandwidth, and a decode step in that layout must
bring every weight shard and the rows together in every layer: it gathers the weights (or, for a small batch,
all rows' activations) over the whole mesh once per generated token. The sampler therefore decodes on a mesh of its
own over the same devices, (data, 1, tensor) (`decode_mesh`): with `DECODE_RULES` the weights are split over
'tensor' by heads, kv heads, MLP columns and vocabulary and replicated over 'data' (nothing over 'fsdp'), and the
prompt rows go over 'data'. A decode step then exchanges activation partial sums (all-reduces) and never a
weight; with tensor = 1 every device holds the whole model and decodes its own rows alone.

`sampler_params` moves the trainer's weights into that layout once per rollout: one jitted cast to the compute
dtype whose out_shardings are the sampler's, so XLA moves the shards device to device with collectives (nothing
goes through the host), and nothing is donated (the trainer keeps its arrays). A tensor group is adjacent
devices (the decode mesh is data-major), which suits the all-reduces of every decode step; XLA moves a training
shard into that device order by gathering the whole tensor and slicing it (its log warns of an "involuntary full
rematerialization"), up to twice the minimal traffic, paid once per rollout. The sampler
(`autoregressive.make_generate_fn`) takes its mesh and its parameter shardings from the arrays it is given, so
the resharded weights are all it needs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxrl_reason.models import sharding as sharding_lib

# The training rules with nothing over 'fsdp': heads / kv_heads / mlp / vocab over 'tensor', the rest replicated.
DECODE_RULES = tuple((name, None if name == "embed" else axes) for name, axes in sharding_lib.DEFAULT_RULES)


def decode_mesh(tensor: int, devices=None) -> Mesh:
    """The sampler's (data, fsdp=1, tensor) mesh over `devices` (default: all devices), data = devices / tensor."""
    devices = jax.devices() if devices is None else list(devices)
    if not isinstance(tensor, int) or tensor < 1 or len(devices) % tensor:
        raise ValueError(f"The sampler's tensor axis ({tensor!r}) must be a positive int dividing the "
                         f"{len(devices)} devices.")
    return sharding_lib.make_mesh(len(devices) // tensor, 1, tensor, devices)


def sampler_shardings(params, mesh: Mesh, rules=DECODE_RULES):
    """nnx.State of Params (arrays or ShapeDtypeStructs with `logical_axes` metadata) -> the same tree holding
    each parameter's NamedSharding in the sampler layout."""
    return sharding_lib.param_shardings(params, mesh, rules)


def sampler_params(train_params, shardings, dtype):
    """`train_params` cast to `dtype` (floating leaves) and resharded to `shardings` on device.

    `shardings` is the tree of `sampler_shardings` (or any matching tree of NamedShardings over the devices the
    params live on). The jitted program is cached per (tree, shardings, dtype): one compile per run.
    """
    return reshard_fn(train_params, shardings, dtype)(train_params)


def reshard_fn(train_params, shardings, dtype):
    """The cached jitted program of `sampler_params` for these params (`.lower(train_params)` to inspect it)."""
    leaves, treedef = jax.tree.flatten(train_params)
    targets = tuple(jax.tree.leaves(shardings))
    if len(targets) != len(leaves) or not all(isinstance(s, NamedSharding) for s in targets):
        raise ValueError(f"The sampler shardings must be {len(leaves)} NamedShardings, one per parameter; got "
                         f"{len(targets)} leaves.")
    have = {d for x in leaves if hasattr(x, "sharding") for d in x.sharding.device_set}
    want = {d for s in targets for d in s.device_set}
    if not have <= want:
        raise ValueError("The sampler layout's devices do not include every device the trainer's weights are on.")
    sources = tuple(x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else None for x in leaves)
    return _reshard_fn(treedef, sources, targets, jnp.dtype(dtype).name)


@functools.lru_cache(maxsize=16)
def _reshard_fn(treedef, sources: tuple, targets: tuple, dtype: str):
    """The jitted cast + reshard. Each leaf is cast where it lies (pinned to its training sharding) before it
    moves, so the partitioned program's collectives carry compute-dtype bytes (bf16: half of float32's; XLA:CPU
    alone widens bf16 collectives back to float32 in a later pass)."""
    def cast(x, source):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        y = x.astype(dtype)
        return y if source is None else jax.lax.with_sharding_constraint(y, source)

    def reshard(params):
        leaves = jax.tree.leaves(params)
        return jax.tree.unflatten(treedef, [cast(x, s) for x, s in zip(leaves, sources)])
    return jax.jit(reshard, out_shardings=jax.tree.unflatten(treedef, targets))
