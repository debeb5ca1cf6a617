"""Hugging Face checkpoints <-> `Transformer` (Qwen2, Qwen3, Llama), from/to a local directory.

A checkpoint directory holds `config.json` plus `model.safetensors`, or a sharded
`model.safetensors.index.json` with its shards; float32 or bfloat16. Torch linear weights are `(out, in)`;
our kernels are `(in, out)`, so they are transposed. With tied embeddings `lm_head.weight` is absent.
Tensors the config does not use (a tied checkpoint's stray `lm_head.weight`, rotary buffers) are ignored.
transformers 5 stores the rope theta in `rope_parameters` (older files: top-level `rope_theta`).

Our diffusion metadata (`attention`, `block_size`, `mask_token_id`) is written to config.json under the key
`jaxrl_reason` on export and read back on import (transformers keeps unknown keys as attributes).
Import streams every tensor from the files into its device shards (`load_hf`); export writes the file one
tensor at a time, each assembled on the host from its device shards (single host). Stacked (scanned) layer
params map to the per-layer HF tensors `model.layers.<i>.*`, so both layouts read and write the same files.
"""
import contextlib
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors.numpy)
import numpy as np
import safetensors.numpy
from flax import nnx
from safetensors import safe_open

from jaxrl_reason.models.sharding import DEFAULT_RULES, param_shardings
from jaxrl_reason.models.transformer import Transformer, TransformerConfig

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM")
_MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
_EXTRA_KEY = "jaxrl_reason"


def _architecture(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or [_MODEL_TYPES.get(hf_config.get("model_type"), "")]
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unsupported architecture {arch or hf_config.get('model_type')!r}; "
                         f"supported: {ARCHITECTURES}.")
    return arch


def _rope_theta(hf_config: dict) -> float:
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"Unsupported rope_type {rope_type!r}; only 'default' RoPE is implemented.")
    return float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def config_from_hf(hf_config: dict) -> TransformerConfig:
    """HF config.json dict (Qwen2/Qwen3/Llama ForCausalLM) -> TransformerConfig; ValueError if unsupported."""
    arch = _architecture(hf_config)
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Unsupported hidden_act {hf_config['hidden_act']!r}; only 'silu' is implemented.")
    if hf_config.get("use_sliding_window") or "sliding_attention" in (hf_config.get("layer_types") or []):
        raise ValueError("Sliding-window attention layers are not supported.")
    if arch != "Qwen2ForCausalLM" and (hf_config.get("attention_bias") or hf_config.get("mlp_bias")):
        raise ValueError(f"{arch} with attention_bias or mlp_bias is not supported.")
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    extra = hf_config.get(_EXTRA_KEY) or {}
    cfg = TransformerConfig(
        vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"], num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
        head_dim=hf_config.get("head_dim"), rope_theta=_rope_theta(hf_config),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6), qkv_bias=arch == "Qwen2ForCausalLM",
        qk_norm=arch == "Qwen3ForCausalLM", tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention=extra.get("attention", "causal"), block_size=extra.get("block_size", 1),
        mask_token_id=extra.get("mask_token_id"),
        param_dtype="bfloat16" if dtype == "bfloat16" else "float32",
        max_position_embeddings=hf_config.get("max_position_embeddings", 4096))
    cfg.validate()
    return cfg


def default_architecture(cfg: TransformerConfig) -> str:
    """Qwen3 if qk_norm, Qwen2 if qkv_bias, else Llama."""
    return "Qwen3ForCausalLM" if cfg.qk_norm else ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")


def config_to_hf(cfg: TransformerConfig, architecture: str) -> dict:
    """TransformerConfig -> HF config.json dict for `architecture`; ValueError if it cannot express cfg."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unsupported architecture {architecture!r}; supported: {ARCHITECTURES}.")
    if cfg.qkv_bias != (architecture == "Qwen2ForCausalLM"):
        raise ValueError(f"{architecture} cannot express qkv_bias={cfg.qkv_bias}.")
    if cfg.qk_norm != (architecture == "Qwen3ForCausalLM"):
        raise ValueError(f"{architecture} cannot express qk_norm={cfg.qk_norm}.")
    model_type = {v: k for k, v in _MODEL_TYPES.items()}[architecture]
    out = {
        "architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim_, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_position_embeddings,
        "dtype": cfg.param_dtype,
        _EXTRA_KEY: {"attention": cfg.attention, "block_size": cfg.block_size, "mask_token_id": cfg.mask_token_id},
    }
    if architecture == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
        if architecture == "Qwen3ForCausalLM":
            out.update(attention_bias=False)
    return out


def _name_map(cfg: TransformerConfig) -> list[tuple[str, tuple, bool]]:
    """(HF tensor name, path in the unrolled pure param dict, transpose?) for every parameter of cfg."""
    names = [("model.embed_tokens.weight", ("embed",), False), ("model.norm.weight", ("final_norm",), False)]
    if not cfg.tie_embeddings:
        names.append(("lm_head.weight", ("lm_head",), True))
    for i in range(cfg.num_layers):
        pre, at = f"model.layers.{i}.", ("layers", i, "attn")
        names += [(pre + "input_layernorm.weight", ("layers", i, "input_norm"), False),
                  (pre + "post_attention_layernorm.weight", ("layers", i, "post_attn_norm"), False)]
        names += [(pre + f"mlp.{p}.weight", ("layers", i, p), True) for p in ("gate_proj", "up_proj", "down_proj")]
        names += [(pre + f"self_attn.{p}.weight", at + (p,), True) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if cfg.qkv_bias:
            names += [(pre + f"self_attn.{p}_proj.bias", at + (f"{p}_bias",), False) for p in "qkv"]
        if cfg.qk_norm:
            names += [(pre + f"self_attn.{p}_norm.weight", at + (f"{p}_norm",), False) for p in "qk"]
    return names


def _param_sources(cfg: TransformerConfig) -> dict[tuple, tuple[tuple[str, ...], bool]]:
    """{path in our pure param dict: (HF names, transpose?)}; a stacked (scanned) layer param has one HF name
    per layer, stacked on its leading axis in layer order."""
    out: dict = {}
    for name, path, transpose in _name_map(cfg):
        key = ("layers",) + path[2:] if cfg.scan_layers and path[0] == "layers" else path
        out[key] = (out.get(key, ((), transpose))[0] + (name,), transpose)
    return out


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


class _Tensors:
    """Lazy access to HF tensors by name: safetensors files (read slice by slice) or an in-memory dict."""

    def __init__(self, files: dict[str, object] | None = None, arrays: dict | None = None):
        self.files, self.arrays = files or {}, arrays

    def names(self):
        return set(self.arrays) if self.arrays is not None else set(self.files)

    def shape(self, name) -> tuple:
        if self.arrays is not None:
            return tuple(np.shape(self.arrays[name]))
        return tuple(self.files[name].get_slice(name).get_shape())

    def read(self, name, index) -> np.ndarray:
        if self.arrays is not None:
            return np.asarray(self.arrays[name])[index]
        return self.files[name].get_slice(name)[index]


def _check_tensors(cfg, tensors: _Tensors, abstract_pure, source):
    """ValueError naming the first HF tensor that is missing or whose shape the config does not expect."""
    have = tensors.names()
    for path, (names, transpose) in _param_sources(cfg).items():
        stacked = cfg.scan_layers and path[0] == "layers"
        want = tuple(_get(abstract_pure, path).shape)[1 if stacked else 0:]
        for name in names:
            if name not in have:
                raise ValueError(f"{source} is missing tensor {name!r}.")
            shape = tensors.shape(name)
            if (shape[::-1] if transpose else shape) != want:
                raise ValueError(f"Tensor {name!r} in {source} has shape {shape} but the config expects "
                                 f"{want[::-1] if transpose else want}.")


def _read_shard(tensors: _Tensors, names, transpose, stacked, index, dtype) -> np.ndarray:
    """The `index` block (a tuple of slices of our layout) of one parameter, read from the HF tensors."""
    def one(name, idx):
        x = tensors.read(name, tuple(reversed(idx)) if transpose else tuple(idx))
        return np.asarray(x.T if transpose else x).astype(dtype)
    if not stacked:
        return one(names[0], index)
    return np.stack([one(names[i], index[1:]) for i in range(len(names))[index[0]]])


def _index_key(index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _sharded_params(cfg, tensors: _Tensors, abstract_state, shardings) -> dict:
    """Pure param dict of jax Arrays built shard by shard (`make_array_from_callback`) from the HF tensors.

    Each device's block is read from the checkpoint on its own (transposed / stacked per block); blocks of
    replicated dims are read once per parameter and reused.
    """
    abstract_pure = nnx.to_pure_dict(abstract_state)
    shard_pure = nnx.to_pure_dict(shardings)
    pure: dict = {}
    for path, (names, transpose) in _param_sources(cfg).items():
        leaf = _get(abstract_pure, path)
        stacked = cfg.scan_layers and path[0] == "layers"
        blocks: dict = {}

        def callback(index, names=names, transpose=transpose, stacked=stacked, blocks=blocks):
            key = _index_key(index)
            if key not in blocks:
                blocks[key] = _read_shard(tensors, names, transpose, stacked, index, cfg.dtype)
            return blocks[key]

        _set(pure, path, jax.make_array_from_callback(tuple(leaf.shape), _get(shard_pure, path), callback))
    return pure


def load_hf_tensors(model: Transformer, tensors: dict) -> None:
    """Writes HF-named tensors (torch layout) into `model` in place; ValueError on missing/mis-shaped ones."""
    state = nnx.state(model, nnx.Param)
    source = _Tensors(arrays=tensors)
    _check_tensors(model.cfg, source, nnx.to_pure_dict(state), "the checkpoint")
    shardings = jax.tree.map(lambda x: x.sharding, state)
    nnx.replace_by_pure_dict(state, _sharded_params(model.cfg, source, state, shardings))
    nnx.update(model, state)


def _host_tensor(x: jax.Array, layer: int | None = None) -> np.ndarray:
    """`x` (or its slice `x[layer]`) on the host, assembled from its addressable shards, each distinct shard
    copied once: nothing larger than the tensor itself is gathered (single host)."""
    if not isinstance(x, jax.Array):  # already on the host (e.g. params fetched with jax.device_get)
        return np.asarray(x if layer is None else x[layer])
    shape = x.shape if layer is None else x.shape[1:]
    out = np.empty(shape, x.dtype)
    done = set()
    for shard in x.addressable_shards:
        index, data = shard.index, shard.data
        if layer is not None:
            start = index[0].start or 0
            if not start <= layer < (x.shape[0] if index[0].stop is None else index[0].stop):
                continue
            index, data = index[1:], data[layer - start]
        if _index_key(index) not in done:
            done.add(_index_key(index))
            out[index] = np.asarray(data)
    return out


def _hf_entries(model: Transformer) -> list[tuple[str, tuple, np.dtype, object]]:
    """(HF name, torch-layout shape, dtype, thunk giving the host array) for every parameter, in HF order."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    entries = []
    for name, path, transpose in _name_map(model.cfg):
        key = ("layers",) + path[2:] if model.cfg.scan_layers and path[0] == "layers" else path
        x = _get(pure, key)
        layer = path[1] if key != path else None
        shape = tuple(x.shape if layer is None else x.shape[1:])

        def thunk(x=x, layer=layer, transpose=transpose):
            y = _host_tensor(x, layer)
            return np.ascontiguousarray(y.T if transpose else y)

        entries.append((name, shape[::-1] if transpose else shape, np.dtype(x.dtype), thunk))
    return entries


def params_to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Model parameters -> {HF tensor name: numpy array in torch (out, in) layout}, gathered to the host."""
    return {name: thunk() for name, _, _, thunk in _hf_entries(model)}


_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(jnp.bfloat16): "BF16"}


def _write_safetensors(path: str, entries, metadata: dict) -> None:
    """A safetensors file written one tensor at a time (the header first, from shapes and dtypes alone)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype, _ in entries:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, _, _, thunk in entries:
            f.write(thunk().tobytes())


def _read_json(path, what):
    if not os.path.isfile(path):
        raise ValueError(f"No {what} found at {path}.")
    with open(path) as f:
        return json.load(f)


def _shard_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (one file, or the shards of its index)."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        raise ValueError(f"No model.safetensors or model.safetensors.index.json found in {path}.")
    files = [os.path.join(path, shard)
             for shard in sorted(set(_read_json(index, "safetensors index")["weight_map"].values()))]
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"Weight shard {f} listed in the index does not exist.")
    return files


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    tensors = {}
    for f in _shard_files(path):
        tensors.update(safetensors.numpy.load_file(f))
    return tensors


def load_hf(path: str, *, param_dtype: str | None = None, attention: str | None = None,
            block_size: int | None = None, attention_impl: str | None = None,
            scan_layers: bool | None = None, remat: str | None = None,
            remat_names: tuple[str, ...] | None = None, mesh: jax.sharding.Mesh | None = None,
            rules=DEFAULT_RULES) -> tuple[Transformer, TransformerConfig]:
    """Loads a local HF checkpoint directory into a Transformer.

    param_dtype None -> the checkpoint's `dtype` ("bfloat16" stays bfloat16, anything else float32).
    attention / block_size override the metadata (e.g. load an AR Qwen3 as a block-diffusion model);
    attention_impl picks the attention implementation (`TransformerConfig.attention_impl`).
    scan_layers / remat / remat_names pick the layer layout and remat policy (`TransformerConfig`).
    The model is built abstractly (no random init) and every parameter is streamed from the safetensors
    files straight into its shards: with `mesh`, sharded by the logical-axis `rules`, else on the default
    device. Each device's block is read as a slice of the file, so the host holds about one parameter's
    blocks at a time, never the whole checkpoint.
    """
    if not os.path.isdir(path):
        raise ValueError(f"Checkpoint directory {path} does not exist.")
    hf_config = _read_json(os.path.join(path, "config.json"), "config.json")
    cfg = config_from_hf(hf_config)
    overrides = dict(param_dtype=param_dtype, attention=attention, block_size=block_size,
                     attention_impl=attention_impl, scan_layers=scan_layers, remat=remat,
                     remat_names=remat_names)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    files = _shard_files(path)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = param_shardings(state, mesh, rules)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
    with contextlib.ExitStack() as stack:
        handles = {}
        for f in files:
            handle = stack.enter_context(safe_open(f, framework="numpy"))
            handles.update({name: handle for name in handle.keys()})
        tensors = _Tensors(files=handles)
        _check_tensors(cfg, tensors, nnx.to_pure_dict(state), f"checkpoint {path}")
        pure = _sharded_params(cfg, tensors, state, shardings)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), cfg


def save_hf(model: Transformer, cfg: TransformerConfig, path: str, *, architecture: str | None = None,
            extra_config: dict | None = None) -> None:
    """Writes `config.json` + `model.safetensors` loadable by `transformers.AutoModelForCausalLM`.

    architecture None -> `default_architecture(cfg)`. `extra_config` (e.g. bos/eos token ids of the source
    checkpoint) is merged into config.json.
    """
    structural = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim_", "qkv_bias", "qk_norm", "tie_embeddings")
    if any(getattr(cfg, k) != getattr(model.cfg, k) for k in structural):
        raise ValueError("cfg describes a different architecture than the model's own config.")
    architecture = architecture or default_architecture(cfg)
    hf_config = config_to_hf(cfg, architecture)
    hf_config.update(extra_config or {})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    _write_safetensors(os.path.join(path, "model.safetensors"), _hf_entries(model), {"format": "pt"})
