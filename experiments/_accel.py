"""What the benchmarks count and compare with: model FLOPs of an update, named model shapes, and each
accelerator's dense bf16 peak and HBM bandwidth (shared by `bench_train.py` and its whole-iteration mode)."""
from __future__ import annotations

import dataclasses


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul: q/k/v/o, gate/up/down per layer, and the LM head (tied or not)."""
    d, h = cfg.hidden_size, cfg.head_dim_
    attn = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2
    if cfg.qkv_bias:
        attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * h
    mlp = 3 * d * cfg.intermediate_size
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def update_flops(cfg, rows: int, seq_len: int) -> dict:
    """FLOPs of forward + backward over `rows` x `seq_len` tokens (PaLM App. B): 6·N·tok + 12·L·H·Q·T·tok."""
    tokens = rows * seq_len
    dense = 6 * matmul_params(cfg) * tokens
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim_ * seq_len * tokens
    return {"tokens": tokens, "dense": dense, "attention": attention, "total": dense + attention}


def shape_config(shape: str, dtype: str):
    """TransformerConfig of a named shape (experiments/_compile_targets.SHAPES) with parameters and compute in
    `dtype` (where the model separates a compute dtype from parameter storage, both are set)."""
    from experiments import _compile_targets as ct

    from jaxrl_reason.models.hf import config_from_hf
    from jaxrl_reason.models.transformer import TransformerConfig

    cfg = config_from_hf(ct.SHAPES[shape])
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    changes = {k: dtype for k in ("param_dtype", "compute_dtype") if k in fields}
    return dataclasses.replace(cfg, **changes)



# Dense bfloat16 peak of one device, TFLOP/s (vendor figures; an H200 has the H100's compute). Checked in order:
# the first key that is part of the device kind wins ("TPU v5 lite" is a v5e, "TPU v5" alone a v5p).
BF16_PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
                    ("TPU v6 lite", 918.0), ("TPU v5p", 459.0), ("TPU v5", 459.0))


# HBM bandwidth of one device, GB/s (vendor figures; H100 and A100 are the SXM parts, an H100 PCIe has 2000),
# matched like BF16_PEAK_TFLOPS.
HBM_GBPS = (("H100 PCIe", 2000.0), ("H100", 3350.0), ("H200", 4800.0), ("A100", 2039.0), ("TPU v5 lite", 819.0),
            ("TPU v5e", 819.0), ("TPU v5p", 2765.0), ("TPU v5", 2765.0))


def bf16_peak(device_kind: str) -> float | None:
    """FLOP/s of the device's dense bf16 peak, None for a device without an entry (a CPU)."""
    return next((tf * 1e12 for key, tf in BF16_PEAK_TFLOPS if key in device_kind), None)


def hbm_bandwidth(device_kind: str) -> float | None:
    """Bytes/s of the device's HBM, None for a device without an entry (a CPU)."""
    return next((gb * 1e9 for key, gb in HBM_GBPS if key in device_kind), None)
