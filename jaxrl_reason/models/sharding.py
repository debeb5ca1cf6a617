"""Logical axis names -> mesh axes.

Parameters carry `logical_axes` metadata (see `models/transformer.py`); a rules table maps each logical name
to a mesh axis (or a tuple of axes, or None = replicated). Meshes use `AxisType.Auto` so XLA propagates
shardings GSPMD-style (`jax.make_mesh` would default to Explicit axes, which need every sharding spelled out).
A parameter dimension that does not divide its mesh axes' size, or reuses a mesh axis already taken by an earlier
dimension, falls back to replicated for that dimension (tiny test models). Different layouts for training and
sampling are just different rules tables passed to the same functions.

Activations have their own logical names ("act_batch", "act_len", "act_embed", "act_heads", "act_kv_heads",
"act_mlp"): the batch goes over ("data", "fsdp"), the embedding stays whole, heads and MLP columns go over
"tensor". `constrain` pins an activation to that layout inside a jitted function traced under
`jax.set_mesh(mesh)`; with the batch pinned, XLA gathers the fsdp-sharded weights for each matmul (ZeRO-3)
instead of resharding the activations between layouts. Outside a mesh it returns its input.
"""
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, str | tuple | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),  # the leading axis of stacked (scanned) layer params
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one of data / fsdp given as -1 ("all devices the other axes leave");
    ValueError with one sentence when the sizes cannot cover `num_devices`."""
    if tensor < 1 or data == 0 or fsdp == 0 or min(data, fsdp) < -1 or (data == -1 and fsdp == -1):
        raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: sizes must be positive, with at most "
                         "one of data and fsdp set to -1 (all devices the other axes leave).")
    fixed = tensor * max(data, 1) * max(fsdp, 1)
    rest = num_devices // fixed if num_devices % fixed == 0 else 0
    data, fsdp = (rest if data == -1 else data), (rest if fsdp == -1 else fsdp)
    if data < 1 or fsdp < 1 or data * fsdp * tensor != num_devices:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} does not cover the {num_devices} "
                         "available devices.")
    return data, fsdp, tensor


def make_mesh(data: int, fsdp: int, tensor: int, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    if data * fsdp * tensor != len(devices):
        raise ValueError(f"Mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {data * fsdp * tensor} does not "
                         f"equal the number of devices ({len(devices)}).")
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _lookup(name, rules):
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    raise ValueError(f"Logical axis {name!r} has no rule in the sharding rules table.")


def _axes_tuple(mesh_axes):
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(logical_axes, rules=DEFAULT_RULES, shape=None, mesh=None) -> PartitionSpec:
    """Logical names (None = replicated dim) -> PartitionSpec via `rules`.

    With `shape` and `mesh`, a dim whose size is not divisible by its mesh axes' total size is replicated;
    a mesh axis already used by an earlier dim is never used twice (that dim is replicated).
    """
    used, spec = set(), []
    for i, name in enumerate(logical_axes):
        axes = () if name is None else _axes_tuple(_lookup(name, rules))
        if used & set(axes):
            axes = ()
        if axes and shape is not None and mesh is not None:
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[i] % size:
                axes = ()
        used |= set(axes)
        spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*spec)


def _is_var(x):
    return isinstance(x, nnx.Variable)


def _spec_of(var, rules, mesh):
    axes = var.get_metadata().get("logical_axes")
    shape = tuple(var.get_value().shape)
    if axes is None:  # no annotation -> replicated
        return PartitionSpec(*([None] * len(shape)))
    if len(axes) != len(shape):
        raise ValueError(f"logical_axes {axes} do not match a parameter of shape {shape}.")
    return logical_to_spec(axes, rules, shape, mesh)


def param_specs(state, rules=DEFAULT_RULES, mesh=None):
    """nnx.State of Params -> the same tree with each Variable holding its PartitionSpec.

    Pass `mesh` to apply the divisibility fallback (param_shardings / shard_state always do).
    """
    return jax.tree.map(lambda v: v.replace(_spec_of(v, rules, mesh)), state, is_leaf=_is_var)


def param_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """nnx.State of Params -> the same tree with each Variable holding its NamedSharding (jit in/out_shardings)."""
    return jax.tree.map(lambda v: v.replace(NamedSharding(mesh, _spec_of(v, rules, mesh))), state, is_leaf=_is_var)


def shard_state(state, mesh: Mesh, rules=DEFAULT_RULES):
    """Places an nnx.State of Params on `mesh` with `jax.device_put` (values resharded, metadata kept)."""
    return jax.device_put(state, param_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch arrays: leading dim over ("data", "fsdp"), the rest replicated."""
    if ndim < 1:
        raise ValueError(f"batch_sharding needs ndim >= 1, got {ndim}.")
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def activation_shards(size: int, logical_axis: str = "act_batch", rules=DEFAULT_RULES) -> int:
    """Into how many blocks `constrain` splits an activation dim of `size` named `logical_axis` on the current
    mesh (`jax.set_mesh`): the product of its mesh axes, 1 outside a mesh or where `size` does not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return 1
    shards = int(np.prod([mesh.shape[a] for a in _axes_tuple(_lookup(logical_axis, rules))]))
    return shards if size % shards == 0 else 1


def constrain(x: jax.Array, logical_axes, rules=DEFAULT_RULES) -> jax.Array:
    """`with_sharding_constraint` of `x` to the spec of its logical axes on the current mesh (`jax.set_mesh`).

    A no-op outside a mesh or on a mesh without the (data, fsdp, tensor) axes. Dims that do not divide their
    mesh axes stay replicated (as for parameters).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"logical_axes {logical_axes} do not match an activation of shape {x.shape}.")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules, x.shape, mesh))
