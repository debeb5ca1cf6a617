"""Diffusion-sampler benchmark rows: block KV cache + dynamic threshold vs the naive loop.

    python experiments/_bench_diffusion.py [--quick]

`diffusion_rows(quick)` is also imported by `experiments/bench_sampler.py`, which appends the rows to its
table. Rows (one dict each, same keys):
  (a) block KV cache + dynamic threshold decoding (SDAR/TraDo `low_confidence_dynamic`, tau 0.9, 4 steps max
      per block of 4): `make_block_generate_fn(use_cache=True, remasking="dynamic")`;
  (b) the naive loop: one token per step, no cache, every step recomputes all P + R positions with the
      block-causal mask (`use_cache=False`, static, steps_per_block = block_size);
  (c) for attribution: the block KV cache with one token per step (static).
Model: a Qwen3-like block-diffusion transformer (~1.7M parameters, block 4) with random weights whose LM head
is scaled by `HEAD_SCALE` so its predictive distributions are peaked (mean confidence is reported): with the
plain random init every probability is ~1/V, no token ever passes tau = 0.9 and (a) would decode one token
per step. The measured forwards/token is what the threshold actually achieved on this model, nothing assumed:
rows decode in lock-step (static batching), so a block costs as many calls as its slowest row needs;
"tokens/step per row" is the parallelism each row achieved on its own (what continuous batching would get).
Every response runs the full budget (no EOS). Timing: best of 3 calls ((b): 1 call, it is slow) after a
compile + warm-up call; `quick` uses batch 2, 64 new tokens, 1 call.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx

from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.sampling.diffusion import make_block_generate_fn
from jaxrl_reason.sampling.processors import SamplingParams

HEAD_SCALE = 16.0
BLOCK = 4


def _model(vocab: int, mask_id: int):
    cfg = TransformerConfig(vocab_size=vocab, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=4,
                            num_kv_heads=2, qk_norm=True, attention="block", block_size=BLOCK,
                            mask_token_id=mask_id)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.lm_head[...] = model.lm_head[...] * HEAD_SCALE
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return graphdef, params, n_params


def _time(fn, params, prompts, mask, repeats: int):
    out = fn(params, prompts, mask, jax.random.key(0))          # compile + warm-up
    jax.block_until_ready(out)
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        out = fn(params, prompts, mask, jax.random.key(i + 1))
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return best, out


def diffusion_rows(quick: bool) -> list[dict]:
    """Measures the three samplers above; returns one dict per row (keys listed in the module docstring)."""
    vocab, mask_id = 512, 511
    batch, prompt_len = (2, 16) if quick else (4, 32)
    new_tokens = 64 if quick else 256
    graphdef, params, n_params = _model(vocab, mask_id)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, mask_id, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    sampling = SamplingParams(temperature=1.0)
    common = dict(prompt_len=prompt_len, max_new_tokens=new_tokens, block_size=BLOCK, mask_token_id=mask_id,
                  eos_ids=(), pad_id=0, sampling=sampling)
    variants = [
        ("(a) block KV cache + dynamic threshold 0.9", 3, dict(use_cache=True, remasking="dynamic",
                                                               steps_per_block=BLOCK, threshold=0.9)),
        ("(b) naive: 1 token/step, no cache", 1, dict(use_cache=False, remasking="static", steps_per_block=BLOCK)),
        ("(c) block KV cache, 1 token/step", 3, dict(use_cache=True, remasking="static", steps_per_block=BLOCK)),
    ]
    rows = []
    for name, repeats, kw in variants:
        fn = make_block_generate_fn(graphdef, **common, **kw)
        secs, (ro, aux) = _time(fn, params, prompts, mask, 1 if quick else repeats)
        n_tok = int(np.asarray(ro.length_B).sum())
        rows.append({
            "sampler": name, "params": f"{n_params / 1e6:.1f}M", "batch": batch, "new_tokens": new_tokens,
            "tokens/s": n_tok / secs, "forwards/token": int(aux["num_forwards"]) / new_tokens,
            "tokens/step per row": float(np.mean(np.asarray(ro.length_B) / (np.asarray(ro.step_map_BxR).max(1) + 1))),
            "mean confidence": float(np.asarray(ro.confidence_BxR).mean()), "seconds": secs,
        })
    base = rows[1]["tokens/s"]
    for row in rows:
        row["speedup vs (b)"] = row["tokens/s"] / base
    return rows


def _markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")
    print(_markdown(diffusion_rows(args.quick)))
