"""Hugging Face checkpoints <-> `Transformer` (Qwen2, Qwen3, Llama), from/to a local directory (stack.md §4).

A checkpoint directory holds `config.json` plus `model.safetensors`, or a sharded
`model.safetensors.index.json` with its shards; float32 or bfloat16. Torch linear weights are `(out, in)`;
our kernels are `(in, out)`, so they are transposed. With tied embeddings `lm_head.weight` is absent.
Tensors the config does not use (a tied checkpoint's stray `lm_head.weight`, rotary buffers) are ignored.
transformers 5 stores the rope theta in `rope_parameters` (older files: top-level `rope_theta`).

Our diffusion metadata (`attention`, `block_size`, `mask_token_id`) is written to config.json under the key
`jaxrl_reason` on export and read back on import (transformers keeps unknown keys as attributes).
Export gathers every parameter to the host (single-host only).
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors.numpy, stack.md §4)
import numpy as np
import safetensors.numpy
from flax import nnx

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
    """(HF tensor name, path in our pure param dict, transpose?) for every parameter of cfg."""
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


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _pure_params_from_hf(cfg, tensors, abstract_pure, source="the checkpoint") -> dict:
    """HF tensors -> nested pure dict of jnp arrays in cfg.dtype, checking names and shapes."""
    pure = {}
    for name, path, transpose in _name_map(cfg):
        if name not in tensors:
            raise ValueError(f"{source} is missing tensor {name!r}.")
        x = np.asarray(tensors[name])
        x = x.T if transpose else x
        want = tuple(_get(abstract_pure, path).shape)
        if x.shape != want:
            raise ValueError(f"Tensor {name!r} in {source} has shape {tuple(x.shape)[::-1] if transpose else x.shape}"
                             f" but the config expects {want[::-1] if transpose else want}.")
        _set(pure, path, jnp.asarray(x, dtype=cfg.dtype))
    return pure


def load_hf_tensors(model: Transformer, tensors: dict) -> None:
    """Writes HF-named tensors (torch layout) into `model` in place; ValueError on missing/mis-shaped ones."""
    state = nnx.state(model, nnx.Param)
    pure = _pure_params_from_hf(model.cfg, tensors, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def params_to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """Model parameters -> {HF tensor name: numpy array in torch (out, in) layout}, gathered to the host."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}
    for name, path, transpose in _name_map(model.cfg):
        x = np.asarray(jax.device_get(_get(pure, path)))
        out[name] = np.ascontiguousarray(x.T if transpose else x)
    return out


def _read_json(path, what):
    if not os.path.isfile(path):
        raise ValueError(f"No {what} found at {path}.")
    with open(path) as f:
        return json.load(f)


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` or of the shards listed in `model.safetensors.index.json`."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return safetensors.numpy.load_file(single)
    if not os.path.isfile(index):
        raise ValueError(f"No model.safetensors or model.safetensors.index.json found in {path}.")
    tensors = {}
    for shard in sorted(set(_read_json(index, "safetensors index")["weight_map"].values())):
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
            raise ValueError(f"Weight shard {shard_path} listed in the index does not exist.")
        tensors.update(safetensors.numpy.load_file(shard_path))
    return tensors


def load_hf(path: str, *, param_dtype: str | None = None, attention: str | None = None,
            block_size: int | None = None,
            attention_impl: str | None = None) -> tuple[Transformer, TransformerConfig]:
    """Loads a local HF checkpoint directory into a Transformer.

    param_dtype None -> the checkpoint's `dtype` ("bfloat16" stays bfloat16, anything else float32).
    attention / block_size override the metadata (e.g. load an AR Qwen3 as a block-diffusion model);
    attention_impl picks the attention implementation (`TransformerConfig.attention_impl`).
    Parameters are created directly from the file (no random init).
    """
    if not os.path.isdir(path):
        raise ValueError(f"Checkpoint directory {path} does not exist.")
    hf_config = _read_json(os.path.join(path, "config.json"), "config.json")
    cfg = config_from_hf(hf_config)
    overrides = {k: v for k, v in dict(param_dtype=param_dtype, attention=attention, block_size=block_size,
                                          attention_impl=attention_impl).items()
                 if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate()
    tensors = read_hf_tensors(path)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = _pure_params_from_hf(cfg, tensors, nnx.to_pure_dict(state), source=f"checkpoint {path}")
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
    tensors = params_to_hf_tensors(model)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    safetensors.numpy.save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
