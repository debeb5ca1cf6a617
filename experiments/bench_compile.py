"""Compile time of the update step vs depth: unrolled layers against scanned layers (no weights allocated).

For each depth in --layers and each layout (unrolled Python loop of blocks, or one stacked block under
`lax.scan`), builds the model abstractly (`nnx.eval_shape`), takes the abstract `TrainState` (AdamW) with
`jax.eval_shape`, and lowers + compiles `train/step.make_train_step` with a next-token cross-entropy loss on
abstract [rows, seq] token batches. Prints one table row per (layers, layout): lowering and compile seconds
and, for the scanned layout, the ratio of the deepest to the shallowest compile.

    python experiments/bench_compile.py                        # Qwen2.5-1.5B width, 4 vs 28 layers
    python experiments/bench_compile.py --width=d512 --remat=full
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxrl_reason.models import attention
from jaxrl_reason.models.transformer import REMAT_POLICIES, Transformer, TransformerConfig
from jaxrl_reason.train.state import init_train_state
from jaxrl_reason.train.step import make_train_step

# name -> (vocab, hidden, intermediate, heads, kv heads, head_dim, qkv bias, tied)
WIDTHS = {
    "qwen2.5-1.5b": (151936, 1536, 8960, 12, 2, 128, True, True),
    "qwen2.5-0.5b": (151936, 896, 4864, 14, 2, 64, True, True),
    "d512": (32768, 512, 1408, 8, 2, 64, True, True),
    "d256": (8192, 256, 704, 4, 2, 64, True, True),
}


def model_config(width: str, layers: int, scan: bool, remat: str, dtype: str) -> TransformerConfig:
    v, d, f, n, kv, h, bias, tied = WIDTHS[width]
    return TransformerConfig(vocab_size=v, hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=n,
                             num_kv_heads=kv, head_dim=h, qkv_bias=bias, tie_embeddings=tied, param_dtype=dtype,
                             scan_layers=scan, remat=remat)


def compile_seconds(cfg: TransformerConfig, rows: int, seq: int) -> tuple[float, float, float]:
    """(lowering seconds, compile seconds, compile CPU seconds of this process) of the update step of `cfg` on
    abstract weights and tokens. CPU seconds are less sensitive than wall time to other load on the machine."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)

    def loss_fn(p, batch, rng):
        tok_BxT = batch["tokens"]
        valid_BxT = jnp.ones(tok_BxT.shape, bool)
        logits, _ = nnx.merge(graphdef, p)(tok_BxT, attention.positions_from_mask(valid_BxT),
                                           attention.causal_mask(valid_BxT))
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tok_BxT[:, 1:, None], -1)), {}

    tx = optax.adamw(1e-6)
    state = jax.eval_shape(lambda p: init_train_state(p, tx, 0), params)
    step = make_train_step(loss_fn, tx, donate=False)
    batch = {"tokens": jax.ShapeDtypeStruct((rows, seq), jnp.int32)}
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1, c1 = time.perf_counter(), time.process_time()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", default="qwen2.5-1.5b", choices=sorted(WIDTHS))
    ap.add_argument("--layers", default="4,28", help="comma-separated depths")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--layouts", default="unrolled,scanned", help="comma-separated: unrolled, scanned")
    args = ap.parse_args(argv)
    depths = [int(x) for x in args.layers.split(",")]
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    print(f"# width {args.width}, {args.rows} x {args.seq} tokens, {args.dtype}, remat {args.remat}")
    print("| layers | layout | lower s | compile s (wall) | compile s (CPU) | lower+compile s |")
    print("|---|---|---|---|---|---|")
    layouts = args.layouts.split(",")
    if not layouts or set(layouts) - {"unrolled", "scanned"}:
        raise ValueError(f"--layouts takes unrolled and/or scanned, got {args.layouts!r}.")
    totals = {}
    for scan in [layout == "scanned" for layout in ("unrolled", "scanned") if layout in layouts]:
        for depth in depths:
            lower, comp, cpu = compile_seconds(model_config(args.width, depth, scan, args.remat, args.dtype),
                                          args.rows, args.seq)
            layout = "scanned" if scan else "unrolled"
            totals[layout, depth] = lower + comp
            print(f"| {depth} | {layout} | {lower:.1f} | {comp:.1f} | {cpu:.1f} | {lower + comp:.1f} |", flush=True)
    lo, hi = min(depths), max(depths)
    for layout in layouts:
        print(f"# {layout}: {hi} layers / {lo} layers = {totals[layout, hi] / totals[layout, lo]:.2f}x")


if __name__ == "__main__":
    main()
