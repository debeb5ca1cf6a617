"""Model shapes, compile targets and compiled-HLO reading for `experiments/compile_check.py`.

Importing this module does not import jax (the compile check must set XLA_FLAGS from its target first).

Targets: `tpu:<slice>` with a Cloud TPU slice name (v5e-8, v5litepod-16, v6e-8: the number counts chips; v5p-8,
v4-32: the number counts TensorCores, two per chip) or a topology string (v5e:4x4, v5p:2x2x1), compiled ahead of
time on this machine with libtpu; or `cpu:N`, N simulated CPU devices.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

GIB = float(2**30)

_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "rope_theta": 1000000.0,
          "torch_dtype": "bfloat16", "use_sliding_window": False}
# Hugging Face config.json values of each named shape (the fields a TransformerConfig reads).
SHAPES: dict[str, dict] = {
    "Qwen2.5-0.5B": {**_QWEN2, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 32768},
    "Qwen2.5-1.5B": {**_QWEN2, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "max_position_embeddings": 131072},
    "Qwen2.5-7B": {**_QWEN2, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "max_position_embeddings": 131072},
    "Qwen2.5-14B": {**_QWEN2, "vocab_size": 152064, "hidden_size": 5120, "intermediate_size": 13824,
                    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
                    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 131072},
    # Llama 3.1's "llama3" RoPE frequency scaling changes neither shapes, FLOPs nor memory: the check uses plain RoPE.
    "Llama-3.1-8B": {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rope_theta": 500000.0,
                     "torch_dtype": "bfloat16", "vocab_size": 128256, "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                     "max_position_embeddings": 131072},
}

# HBM per chip in GiB (one JAX device per chip on v4 / v5p, whose two TensorCores act as one megacore device).
CHIP_HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_GEN_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v4": "v4", "v5p": "v5p", "v5e": "v5e",
                "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the program is compiled for: platform 'tpu' or 'cpu', device count, libtpu topology string."""

    platform: str
    num_devices: int
    topology: str | None = None  # e.g. "v5e:2x4" (tpu only)
    generation: str | None = None  # v4 | v5e | v5p | v6e

    @property
    def hbm_gib(self) -> float | None:
        return CHIP_HBM_GIB[self.generation] if self.generation else None


def _grid(chips: int, ndim: int) -> str:
    """The usual topology of `chips` chips: double the last smallest dimension, from 1x1(x1) (2x2x1 for 3-D)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"a TPU slice of {chips} chips is not a power of two; give a topology such as v5e:4x4.")
    dims = [2, 2, 1] if ndim == 3 and chips >= 4 else [1] * ndim
    while int(np.prod(dims)) < chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    return "x".join(map(str, dims))


def parse_target(target: str) -> Target:
    """'tpu:v5p-8' | 'tpu:v5e:4x4' | 'cpu:8' -> Target; ValueError with one sentence otherwise."""
    kind, _, rest = target.partition(":")
    if kind == "cpu":
        if not rest.isdigit() or int(rest) < 1:
            raise ValueError(f"cpu target {target!r} needs a device count, e.g. cpu:8.")
        return Target("cpu", int(rest))
    if kind != "tpu" or not rest:
        raise ValueError(f"unknown target {target!r}; use tpu:<slice> (tpu:v5p-8, tpu:v5e:4x4) or cpu:<N>.")
    m = re.fullmatch(r"([a-z0-9]+)[-:]([0-9x]+)", rest)
    gen = _GEN_ALIASES.get(m.group(1)) if m else None
    if gen is None:
        raise ValueError(f"unknown TPU slice {rest!r}; use v4-N, v5e-N, v5p-N, v6e-N or <gen>:<AxB[xC]>.")
    ndim = 3 if gen in ("v4", "v5p") else 2
    if "x" in m.group(2):  # a topology string: chips along each axis
        dims = [int(d) for d in m.group(2).split("x")]
        if len(dims) != ndim or min(dims) < 1:
            raise ValueError(f"a {gen} topology has {ndim} dimensions, got {m.group(2)!r}.")
        return Target("tpu", int(np.prod(dims)), f"{gen}:{m.group(2)}", gen)
    count = int(m.group(2))
    chips, cores_left = divmod(count, _CORES_PER_CHIP[gen])
    if cores_left or chips < 1:
        raise ValueError(f"{gen}-{count} does not name whole chips ({_CORES_PER_CHIP[gen]} TensorCores per chip).")
    return Target("tpu", chips, f"{gen}:{_grid(chips, ndim)}", gen)


def model_hf_config(model: str) -> tuple[str, dict]:
    """(display name, HF config dict) of a shape name or a config.json path (a directory holding one works too)."""
    if model in SHAPES:
        return model, dict(SHAPES[model])
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"--model {model!r} is neither a shape ({', '.join(SHAPES)}) nor a config.json file.")
    with open(path) as f:
        hf = json.load(f)
    rope = hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "llama3":  # frequency scaling only: same shapes and FLOPs
        hf.pop("rope_scaling")
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or path, hf


def count_params(cfg) -> int:
    """Parameters of a TransformerConfig decoder (embedding, layers, final norm, LM head unless tied)."""
    d, h, kv = cfg.hidden_size, cfg.head_dim_, cfg.num_kv_heads
    attn = d * cfg.num_heads * h * 2 + d * kv * h * 2
    if cfg.qkv_bias:
        attn += (cfg.num_heads + 2 * kv) * h
    if cfg.qk_norm:
        attn += 2 * h
    layer = attn + 3 * d * cfg.intermediate_size + 2 * d
    return cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + cfg.num_layers * layer + d


def model_flops(cfg, rows: int, prompt_len: int, response_len: int, *, backward: bool, value: bool = False):
    """(weight matmul FLOPs, attention FLOPs) of one pass over `rows` sequences of prompt_len + response_len tokens.

    Weights: 2 x (matmul params of the layers: q, k, v, o, gate, up, down) x (all tokens) + 2 x (LM-head params) x
    (response tokens: the chunked log-prob path multiplies only the positions that predict a response token); the
    embedding is a gather and counts nothing. Attention: 4 x heads x head_dim x seq^2 per layer and row for the
    scores and the context, halved by the causal mask (MaxText's and Megatron's convention). With `backward` the
    forward and the backward count (x 3: the backward multiplies twice per forward matmul, remat excluded). With
    `value`, GAE's critic (the same layers and a hidden -> 1 head on every token) counts too.
    """
    d, hd, seq = cfg.hidden_size, cfg.head_dim_, prompt_len + response_len
    layer = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    passes, bodies = (3 if backward else 1), (2 if value else 1)
    weights = 2 * passes * rows * (bodies * cfg.num_layers * layer * seq + cfg.vocab_size * d * response_len
                                   + (d * seq if value else 0))
    attention = 2 * passes * rows * bodies * cfg.num_layers * cfg.num_heads * hd * seq**2
    return float(weights), float(attention)


# Architecture fields where config.model's 0 means "take the model's value".
_ARCH = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
_FROM_HF = _ARCH + ("head_dim", "rope_theta", "rms_norm_eps", "qkv_bias", "qk_norm", "tie_embeddings",
                    "mask_token_id", "max_position_embeddings")


def model_config(config, hf_config: dict, layers: int = 0):
    """TransformerConfig of the HF dict, with config.model's non-zero architecture fields and its other
    TransformerConfig fields (dtypes, attention kind, and any memory knob the model grows) applied."""
    from jaxrl_reason.models.hf import config_from_hf
    from jaxrl_reason.models.transformer import TransformerConfig

    cfg = config_from_hf(hf_config)
    m, changes = config.model, {}
    for field in dataclasses.fields(TransformerConfig):
        if field.name not in m:
            continue
        if field.name in _ARCH:
            if m[field.name]:
                changes[field.name] = m[field.name]
        elif field.name not in _FROM_HF:
            changes[field.name] = m[field.name]
    if layers:
        changes["num_layers"] = layers
    seq = config.rollout.max_prompt_len + config.rollout.max_new_tokens
    changes["max_position_embeddings"] = max(cfg.max_position_embeddings, seq)
    cfg = dataclasses.replace(cfg, **changes)
    cfg.validate()
    return cfg


# ------------------------------------------------------------------------------------------------- compiled HLO
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = r"([a-z0-9]+)\[([0-9,]*)\]"
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = " + _SHAPE + r"\S* ([\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \((.*)\) -> .* \{$")


def _dims(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def gib(nbytes) -> str:
    """Bytes as GiB with two decimals, as every table of the compile check prints them."""
    return f"{nbytes / GIB:.2f}"


def print_largest_buffers(hlo_text: str, k: int) -> None:
    for nbytes, shape, op in largest_buffers(hlo_text, k):
        print(f"  {nbytes / GIB:8.3f} GiB  {shape}  {op}")


def largest_buffers(hlo_text: str, k: int = 8) -> list[tuple[int, str, str]]:
    """The k largest array results of instructions in compiled HLO text: (bytes, 'dtype[dims]', the op's name in
    the traced program, or 'argument' for an input of the program)."""
    seen, entry = {}, False
    for line in hlo_text.splitlines():
        if _COMP.match(line):
            entry = line.startswith("ENTRY")
        m = _INSTR.match(line)
        if m and m.group(4) == "parameter" and not entry:
            continue  # a fused computation's view of a buffer that its caller names with more context
        if m and m.group(2) in _BYTES:
            nbytes = int(np.prod(_dims(m.group(3)), dtype=np.int64)) * _BYTES[m.group(2)]
            key = f"{m.group(2)}[{m.group(3)}]"
            meta = re.search(r'op_name="([^"]+)"', line)
            rank, label = ((0, "argument") if m.group(4) == "parameter" else (1, meta.group(1)[-90:]) if meta
                           else (2, m.group(4)))
            if key not in seen or rank < seen[key][0]:  # one row per shape, under its most telling name
                seen[key] = (rank, nbytes, label)
    return sorted(((nbytes, key, label) for key, (_, nbytes, label) in seen.items()), reverse=True)[:k]


def parse_oom(message: str) -> dict:
    """{'temp_bytes', 'hbm_bytes'} from XLA:TPU's RESOURCE_EXHAUSTED message (keys absent when not stated)."""
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    out = {}
    for key, pattern in (("temp_bytes", r"HLO temporaries \(([\d.]+)([KMGT]?)\)"),
                         ("hbm_bytes", r"available HBM \(([\d.]+)([KMGT]?)\)")):
        m = re.search(pattern, message)
        if m:
            out[key] = int(float(m.group(1)) * scale[m.group(2)])
    return out


def print_memory(compiled, refusal, *, args: int, resident: int, per_temp: tuple[int, str] | None = None):
    """Prints a program's per-device memory (a refused one's from XLA's message) and returns the bytes it needs per
    device with what stays resident beside it (None: unknown). `per_temp` = (bytes, name) adds the temporaries'
    ratio to that reference (the rollout's KV-cache estimate)."""
    if compiled is None:
        return refused_need(args, refusal, resident)
    from jaxrl_reason.train import preflight

    mem = preflight.memory_report(compiled)
    need = mem.peak + resident
    ratio = f" ({mem.temp / per_temp[0]:.2f} x {per_temp[1]})" if per_temp else ""
    print(f"  arguments {gib(mem.argument)} GiB | outputs {gib(mem.output - mem.alias)} GiB (beyond donated) | "
          f"temporaries {gib(mem.temp)} GiB{ratio} | code {gib(mem.code)} GiB | resident beside it {gib(resident)} "
          f"GiB | total {gib(need)} GiB per device")
    return need


def refused_need(args: int, refusal: dict, resident: int) -> int | None:
    """Prints and returns the bytes per device a program XLA refused would need: its arguments, the temporaries
    XLA's out-of-memory message names, and what stays resident beside it (None: the message names no size)."""
    temp = refusal.get("temp_bytes")
    if temp is None:
        print("  XLA's message gives no temporaries size")
        return None
    need = args + temp + resident
    print(f"  arguments {gib(args)} GiB | temporaries {gib(temp)} GiB (from XLA's refusal) | resident beside it "
          f"{gib(resident)} GiB | total {gib(need)} GiB per device")
    return need
