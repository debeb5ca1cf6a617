"""Training benchmark: matmul peak, RL update-step throughput and MFU, and the time split of an RL iteration.

  python experiments/bench_train.py [--quick] [--issue] [--sweep] [--steps=3] [--iterations=4] [--overlap]
  python experiments/bench_train.py --accel [--accel_models=Qwen2.5-0.5B,Qwen2.5-1.5B] [--accel_rows=4] [--steps=3]

`--issue`: the issue's rows in <= 6 min on an idle 2-core machine: the peak over n = 512, 1024 (3 repeats), the
full-size ~1M and ~30M update cases with one timed step each (after the compiling one), two RL iterations in (c).
`--quick`: a smoke run at reduced batch sizes.

Prints one markdown table per part, with the machine and its load average in the header:
  (a) the measured matmul peak of this machine: best GFLOP/s of a jitted float32 `a @ b` over a few sizes;
  (b) the RL update step (`train/objectives.rl_loss` through `train/step.make_train_step`: forward, backward,
      AdamW) on random data for a ~1M and a ~30M parameter decoder: tokens/s and model FLOP utilization
      MFU = update_flops / step time / measured peak, with
        update_flops = 6 · N_matmul · tokens + 12 · layers · heads · head_dim · seq · tokens      (PaLM, App. B)
      where N_matmul counts the parameters that take part in a matmul (projections, MLP, LM head; not the
      embedding gather or the norm scales) and the attention term is the full seq x seq score/value product
      that `models/transformer.attend` computes (the causal mask does not skip work). `--sweep` adds the levers
      for the ~30M model: batch size, micro-batches, bfloat16 parameters;
  (c) one RL iteration of the tiny config (`configs/grpo.py:tiny`, random init) run by `train/loop.run`:
      `time/rollout_s` (sampling + reward), `time/logps_adv_s`, `time/update_s` from its metrics.jsonl
      (mean over the iterations after the first, which compiles), plus the scorer timed alone on as many
      well-formed arithmetic solutions as the batch has rows. `--overlap` adds the same run at `rollout.staleness`
      0 and 1 (the next rollout samples in a background thread during the update; token_tis correction in both):
      the rollout's own seconds, the seconds the iteration waited for it, and the iteration's seconds
      (wait + log-probs + update).
Run the final numbers when the machine is idle (`uptime`): other processes share the cores.

`--accel`: the accelerator mode instead of (a)-(c): the bfloat16 update step of Qwen2.5-0.5B- and 1.5B-shaped
decoders (`--accel_models`; random weights built on the device, nothing downloaded) at `--accel_rows` x
(`--accel_prompt` + `--accel_response`) tokens on one device: compile seconds, step seconds, tokens/s, peak device
memory where the backend reports it, and MFU = update_flops / step time / the chip's dense bf16 peak
(`BF16_PEAK_TFLOPS`; n/a on a CPU). Each model is one compile and `--steps` timed steps (a few minutes on one
GPU). `--accel_tiny` swaps the models for a 2-layer d=64 one, so the mode runs end to end on a CPU.

`--accel_iteration`: one GRPO iteration of the RL loop's pieces for a Qwen2.5-0.5B-shaped policy (`--iter_model`) on
one device, 16 prompts x 16 samples, 256-token prompts, 512 new tokens (`--iter_*`): weight transfer, sampling
tokens/s and decode bandwidth against the chip's HBM (`HBM_GBPS`), log-prob and update MFU, and the split of the
iteration, under 8 minutes on one GPU (experiments/_bench_iteration.py has the arithmetic). With `--accel_tiny` a
2-layer d=64 model at small sizes, so it runs end to end on a CPU:
  python experiments/bench_train.py --accel_iteration [--accel_tiny] [--iter_new_tokens=1024] [--iter_micro_batches=2]
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import sys
import tempfile
import time

import numpy as np
from absl import flags

from experiments._accel import (BF16_PEAK_TFLOPS, HBM_GBPS, bf16_peak, hbm_bandwidth,  # noqa: F401
                                matmul_params, shape_config, update_flops)


@dataclasses.dataclass(frozen=True)
class UpdateCase:
    """One update-step measurement: model size, batch shape and the levers."""

    name: str
    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int = 32
    rows: int = 16  # sequences per update
    prompt_len: int = 32
    response_len: int = 224  # seq = prompt_len + response_len
    micro_batches: int = 1
    param_dtype: str = "float32"
    shape: str = ""  # a named model shape of experiments/_compile_targets.py (its sizes replace the ones above)


# ------------------------------------------------------------------------------------------------- (a) peak
def measure_matmul_peak(sizes=(512, 1024, 2048), repeats: int = 5, dtype: str = "float32") -> dict:
    """{n: {"wall": GFLOP/s, "cpu": GFLOP per CPU-second}} of a jitted n x n @ n x n matmul (2 n^3 FLOPs).

    Best of `repeats` timed calls each, by wall time and by process CPU time (all threads): on a shared machine
    the CPU-time figure is the less load-dependent one.
    """
    import jax
    import jax.numpy as jnp

    out = {}
    mm = jax.jit(jnp.matmul)
    for n in sizes:
        ka, kb = jax.random.split(jax.random.PRNGKey(n))
        a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
        b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
        mm(a, b).block_until_ready()
        wall, cpu = _best_times(lambda: mm(a, b).block_until_ready(), repeats)
        out[n] = {"wall": 2 * n**3 / wall / 1e9, "cpu": 2 * n**3 / cpu / 1e9}
    return out


def _best_times(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best process-CPU seconds) of `repeats` calls of fn()."""
    wall = cpu = float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return wall, max(cpu, 1e-9)


def best_peak(*peaks: dict) -> dict:
    """{"wall": best GFLOP/s, "cpu": best GFLOP/CPU-s} over one or more `measure_matmul_peak` results."""
    return {k: max(v[k] for p in peaks for v in p.values()) for k in ("wall", "cpu")}


# ------------------------------------------------------------------------------------------------- (b) update
def model_config(case: UpdateCase):
    from jaxrl_reason.models.transformer import TransformerConfig

    if case.shape:
        return shape_config(case.shape, case.param_dtype)
    cfg = TransformerConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.mlp,
                            num_layers=case.layers, num_heads=case.heads, num_kv_heads=case.heads,
                            param_dtype=case.param_dtype)
    cfg.validate()
    return cfg


def synthetic_batch(case: UpdateCase, seed: int = 0, vocab: int | None = None):
    """A full-length RL mini-batch (`train.contracts.UpdateBatch`; every token valid, random values)."""
    from jaxrl_reason.train.contracts import UpdateBatch

    rng = np.random.default_rng(seed)
    n, r, seq = case.rows, case.response_len, case.prompt_len + case.response_len
    vocab = vocab or case.vocab
    return UpdateBatch(
        tokens_NxL=rng.integers(0, vocab, (n, seq)).astype(np.int32),
        valid_NxL=np.ones((n, seq), bool),
        response_mask_NxR=np.ones((n, r), np.float32),
        logp_old_NxR=(-np.log(vocab) + 0.1 * rng.normal(size=(n, r))).astype(np.float32),
        adv_NxR=rng.normal(size=(n, r)).astype(np.float32),
        num_tokens_N=np.full((n,), n * r, np.float32),
        num_seqs_N=np.full((n,), n, np.float32),
    )


def bench_update(case: UpdateCase, steps: int = 3, seed: int = 0) -> dict:
    """Compiles the RL update step for `case`, times `steps` calls; returns the best wall and CPU seconds per step
    (best of `steps`, as for the peak) and the FLOP counts of `update_flops`."""
    import jax
    from flax import nnx

    from jaxrl_reason.models.transformer import Transformer
    from configs.base import get_base_config
    from jaxrl_reason.train.hparams import loss_hp
    from jaxrl_reason.train.objectives import rl_loss
    from jaxrl_reason.train.optimizer import make_optimizer
    from jaxrl_reason.train.state import init_train_state
    from jaxrl_reason.train.step import make_train_step

    cfg = model_config(case)
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))), nnx.Param)[0]
    # built by a jitted init: the weights appear on the device, never on the host
    params = jax.jit(lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)[1])()
    tx = make_optimizer(1e-5)
    state = init_train_state({"policy": params}, tx, seed)
    # the base config's loss: PPO clip 0.2, token-mean, no KL, no entropy bonus, no critic
    loss_fn = functools.partial(rl_loss, hp=loss_hp(get_base_config("tiny")), policy_graphdef=graphdef)
    update = make_train_step(loss_fn, tx, num_micro_batches=case.micro_batches)
    batch = jax.device_put(synthetic_batch(case, seed, cfg.vocab_size))
    t0 = time.perf_counter()
    state, metrics = update(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = update(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    seq = case.prompt_len + case.response_len
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    return {"case": case, "params": n_params, "matmul_params": matmul_params(cfg), "step_s": min(times),
            "step_cpu_s": max(min(cpu_times), 1e-9), "compile_s": compile_s, "loss": float(metrics["loss"]),
            **update_flops(cfg, case.rows, seq)}


# ------------------------------------------------------------------------------------------------- (c) iteration
def tiny_rl_config(iterations: int, eval_problems: int = 16, overrides: dict | None = None):
    """`configs/grpo.py:tiny` with a random-init policy, `iterations` RL steps, a small eval, no export;
    `overrides` maps dotted names ("rollout.group_size") to values."""
    from configs.grpo import get_config

    c = get_config("tiny")
    c.model.init = "random"
    c.train.num_steps = iterations
    c.train.time_budget_s = 0.0
    c.train.checkpoint_every = 10**6
    c.train.export_hf = False
    c.eval.num_problems = eval_problems
    c.eval.samples = 1
    c.eval.greedy = False
    c.eval.batch_size = eval_problems
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = c
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"config has no field {dotted!r}.")
        node[leaf] = value
    return c


def iteration_split(records: list[dict], skip_first: bool = True) -> dict:
    """Mean `time/*` seconds per RL iteration over the training records (the first one dropped: compilation)."""
    recs = [r for r in records if r.get("time/update_s") is not None]
    if skip_first and len(recs) > 1:
        recs = recs[1:]
    if not recs:
        raise ValueError("no training record with time/update_s in the metrics.")
    keys = ("time/rollout_s", "time/logps_adv_s", "time/update_s", "response/length_mean")
    return {k: float(np.mean([r[k] for r in recs])) for k in keys} | {"iterations_averaged": len(recs)}


def time_scorer(rows: int, seed: int = 0, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds of the arithmetic scorer over `rows` well-formed solution traces."""
    from jaxrl_reason.data import arithmetic
    from jaxrl_reason.train.build import arithmetic_scorer

    rng = np.random.default_rng(seed)
    problems = arithmetic.sample_problems(seed, rows)
    texts = [arithmetic.solution_trace(p, rng) for p in problems]
    answers = [p.answer for p in problems]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        score = arithmetic_scorer(texts, answers)
        best = min(best, time.perf_counter() - t0)
    if not np.all(score == 1.0):
        raise RuntimeError("the arithmetic scorer rejected a correct solution trace.")
    return best


def bench_iteration(iterations: int = 4, eval_problems: int = 16, overrides: dict | None = None) -> dict:
    """Runs `train/loop.run` on the tiny config (random init) in a temporary workdir; returns the per-iteration
    time split of its metrics.jsonl and the scorer's time on as many rows as one batch."""
    from jaxrl_reason.train.loop import run
    from jaxrl_reason.train.metrics import read_metrics

    config = tiny_rl_config(iterations, eval_problems, overrides)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
        t0 = time.perf_counter()
        run(config, workdir)
        total = time.perf_counter() - t0
        split = iteration_split(read_metrics(workdir))
    rows = config.rollout.prompts_per_step * config.rollout.group_size
    split["score_s"] = time_scorer(rows)
    return {**split, "rows": rows, "max_new_tokens": config.rollout.max_new_tokens, "run_total_s": total}


def overlap_split(records: list[dict]) -> dict:
    """Mean seconds per RL iteration after the first (compilation) of the rollout, the wait for it, the log-probs
    and the update, and the iteration = wait + log-probs + update."""
    recs = [r for r in records if r.get("time/update_s") is not None][1:]
    if not recs:
        raise ValueError("no training record after the first with time/update_s in the metrics.")
    keys = ("time/rollout_s", "time/rollout_wait_s", "time/logps_adv_s", "time/update_s")
    out = {k: float(np.mean([r[k] for r in recs])) for k in keys}
    out["iteration_s"] = out["time/rollout_wait_s"] + out["time/logps_adv_s"] + out["time/update_s"]
    return out | {"iterations_averaged": len(recs)}


def bench_overlap(iterations: int, eval_problems: int = 16) -> list[dict]:
    """`bench_iteration`'s run at rollout.staleness 0 and 1 (token_tis correction in both, so only the overlap
    differs); one `overlap_split` per staleness, with the run's wall seconds."""
    from jaxrl_reason.train.loop import run
    from jaxrl_reason.train.metrics import read_metrics

    out = []
    for staleness in (0, 1):
        config = tiny_rl_config(iterations, eval_problems, {"rollout.staleness": staleness,
                                                            "rollout.is_correction": "token_tis"})
        with tempfile.TemporaryDirectory(prefix="bench_overlap_") as workdir:
            t0 = time.perf_counter()
            run(config, workdir)
            total = time.perf_counter() - t0
            out.append({**overlap_split(read_metrics(workdir)), "staleness": staleness, "run_total_s": total})
    return out


# ------------------------------------------------------------------------------------------------- accelerator
def accel_cases(models: list[str], rows: int, prompt: int, response: int, tiny: bool) -> list[UpdateCase]:
    """bf16 update cases of the named shapes, or of a 2-layer d=64 decoder (`tiny`: the CPU smoke run)."""
    if tiny:
        return [UpdateCase("tiny (d64 L2)", hidden=64, layers=2, heads=4, mlp=128, vocab=512, rows=rows,
                           prompt_len=prompt, response_len=response, param_dtype="bfloat16")]
    return [UpdateCase(m, hidden=0, layers=0, heads=0, mlp=0, rows=rows, prompt_len=prompt, response_len=response,
                       param_dtype="bfloat16", shape=m) for m in models]


def bench_accel(cases: list[UpdateCase], steps: int) -> list[dict]:
    """`bench_update` per case on the default device, with its peak memory; a case that runs out of device memory
    is reported as such instead of ending the run."""
    import jax

    out = []
    for case in cases:
        try:
            r = bench_update(case, steps)
        except Exception as e:  # noqa: BLE001 - only running out of memory is a result
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            out.append({"case": case, "oom": str(e).splitlines()[0][:200]})
            continue
        stats = jax.devices()[0].memory_stats() or {}
        out.append({**r, "peak_bytes": stats.get("peak_bytes_in_use")})
    return out


def accel_table(results: list[dict], device_kind: str) -> str:
    peak = bf16_peak(device_kind)
    peak_txt = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "no bf16 peak known for this device: MFU n/a"
    lines = [f"### bf16 RL update step on one {device_kind} ({peak_txt}); best of timed steps", "",
             "| model | params | rows x seq | compile s | step s | tokens/s | TFLOP/update | TFLOP/s | MFU | "
             "peak memory GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["case"]
        if "oom" in r:
            lines.append(f"| {c.name} | | {c.rows} x {c.prompt_len + c.response_len} | out of memory: {r['oom']} "
                         "| | | | | | |")
            continue
        rate = r["total"] / r["step_s"]
        mfu = f"{100 * rate / peak:.1f}%" if peak else "n/a"
        mem = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "n/a"
        lines.append(f"| {c.name} | {r['params'] / 1e9:.3f}B | {c.rows} x {c.prompt_len + c.response_len} | "
                     f"{r['compile_s']:.1f} | {r['step_s']:.3f} | {r['tokens'] / r['step_s']:.0f} | "
                     f"{r['total'] / 1e12:.2f} | {rate / 1e12:.1f} | {mfu} | {mem} |")
    return "\n".join(lines)


def accel_main(fv) -> str:
    import jax

    t0 = time.perf_counter()
    cases = accel_cases(fv.accel_models, fv.accel_rows, fv.accel_prompt, fv.accel_response, fv.accel_tiny)
    table = accel_table(bench_accel(cases, fv.steps), jax.devices()[0].device_kind)
    report = (f"## bench_train --accel: backend {jax.default_backend()}, jax {jax.__version__}, "
              f"{time.perf_counter() - t0:.0f} s in all\n\n{table}")
    print(report, flush=True)
    return report


# ------------------------------------------------------------------------------------------------- tables
def machine_header(load_start, load_end) -> str:
    """One line: CPU model, cores, backend, jax version and the 1/5/15-min load average at start and end."""
    import jax

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    fmt = lambda la: "/".join(f"{x:.2f}" for x in la)
    return (f"## bench_train: {cpu}, {os.cpu_count()} cores, backend {jax.default_backend()} "
            f"({jax.devices()[0].device_kind}), jax {jax.__version__}; load average (1/5/15 min) "
            f"{fmt(load_start)} at start, {fmt(load_end)} at end")


def peak_table(peak: dict) -> str:
    lines = ["### (a) matmul peak (jitted float32 n x n @ n x n, best of repeats)", "",
             "| n | GFLOP/s (wall) | GFLOP per CPU-second |", "|---|---|---|"]
    lines += [f"| {n} | {g['wall']:.1f} | {g['cpu']:.1f} |" for n, g in peak.items()]
    best = best_peak(peak)
    return "\n".join(lines + [f"| **peak** | **{best['wall']:.1f}** | **{best['cpu']:.1f}** |"])


def update_table(results: list[dict], peak: dict) -> str:
    """MFU by wall time (vs the wall peak) and by process CPU time (vs the CPU-time peak)."""
    lines = ["### (b) RL update step (rl_loss via make_train_step: forward + backward + AdamW; best of timed steps)",
             "", "| model | params | matmul params | rows x seq | micro | dtype | step s | tokens/s | GFLOP/update "
             "(attn) | GFLOP/s | MFU (wall) | GFLOP/CPU-s | MFU (CPU time) |", "|---|---|---|---|---|---|---|---|---|"
             "---|---|---|---|"]
    for r in results:
        c, gflops, gcpu = r["case"], r["total"] / r["step_s"] / 1e9, r["total"] / r["step_cpu_s"] / 1e9
        lines.append(f"| {c.name} | {r['params'] / 1e6:.2f}M | {r['matmul_params'] / 1e6:.2f}M | "
                     f"{c.rows} x {c.prompt_len + c.response_len} | {c.micro_batches} | {c.param_dtype} | "
                     f"{r['step_s']:.3f} | {r['tokens'] / r['step_s']:.0f} | {r['total'] / 1e9:.1f} "
                     f"({r['attention'] / 1e9:.1f}) | {gflops:.1f} | {100 * gflops / peak['wall']:.1f}% | "
                     f"{gcpu:.1f} | {100 * gcpu / peak['cpu']:.1f}% |")
    return "\n".join(lines)


def iteration_table(split: dict) -> str:
    ro, lp, up = split["time/rollout_s"], split["time/logps_adv_s"], split["time/update_s"]
    total = ro + lp + up
    score = min(split["score_s"], ro)
    rows = [("sampling (rollout minus scorer)", ro - score), ("rewards (scorer alone)", score),
            ("log-probs + advantages", lp), ("update", up), ("**total**", total)]
    lines = [f"### (c) RL iteration split: configs/grpo.py:tiny, random init, {split['rows']} rows x "
             f"{split['max_new_tokens']} new tokens (mean sampled length {split['response/length_mean']:.1f}), "
             f"mean of {split['iterations_averaged']} iterations after the first", "",
             "| phase | s / iteration | share |", "|---|---|---|"]
    lines += [f"| {name} | {s:.4f} | {100 * s / max(total, 1e-12):.1f}% |" for name, s in rows]
    return "\n".join(lines)


def overlap_table(results: list[dict]) -> str:
    lines = ["### (c') rollout overlap: the same run at rollout.staleness 0 and 1 (token_tis), mean s / iteration "
             f"after the first ({results[0]['iterations_averaged']} iterations)", "",
             "| rollout.staleness | rollout (own) | waited for rollout | log-probs + adv. | update | iteration | "
             "run total s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['staleness']} | {r['time/rollout_s']:.4f} | {r['time/rollout_wait_s']:.4f} | "
              f"{r['time/logps_adv_s']:.4f} | {r['time/update_s']:.4f} | {r['iteration_s']:.4f} | "
              f"{r['run_total_s']:.1f} |" for r in results]
    return "\n".join(lines)


def update_cases(quick: bool, sweep: bool) -> list[UpdateCase]:
    """The ~1M and ~30M models (d=512, 8 layers, vocab 32, seq 256) and, with `sweep`, the levers of the 30M."""
    small = UpdateCase("~1M (d128 L4)", hidden=128, layers=4, heads=4, mlp=512, rows=32)
    big = UpdateCase("~30M (d512 L8)", hidden=512, layers=8, heads=8, mlp=2048, rows=16)
    if quick:
        return [dataclasses.replace(small, rows=8), dataclasses.replace(big, rows=4)]
    cases = [small, big]
    if sweep:
        cases += [dataclasses.replace(big, rows=8), dataclasses.replace(big, rows=32),
                  dataclasses.replace(big, rows=32, micro_batches=2), dataclasses.replace(big, micro_batches=4),
                  dataclasses.replace(big, param_dtype="bfloat16")]
    return cases


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """A fresh FlagValues parsed from `argv` (argv[0] is the program name)."""
    fv = flags.FlagValues()
    flags.DEFINE_bool("quick", False, "Small sizes, one timed step, two RL iterations.", flag_values=fv)
    flags.DEFINE_bool("issue", False, "Issue sizes, one timed step, two RL iterations (<= 6 min idle).",
                      flag_values=fv)
    flags.DEFINE_bool("sweep", False, "Also try batch size / micro-batches / bf16 for the ~30M model.", flag_values=fv)
    flags.DEFINE_integer("steps", 3, "Timed update steps per case (after one compiling step).", flag_values=fv)
    flags.DEFINE_integer("iterations", 4, "RL iterations of the tiny config for part (c).", flag_values=fv)
    flags.DEFINE_list("parts", ["a", "b", "c"], "Which parts to run.", flag_values=fv)
    flags.DEFINE_bool("overlap", False, "Part (c) also at rollout.staleness 0 vs 1 (rollout during the update).",
                      flag_values=fv)
    flags.DEFINE_bool("accel", False, "Accelerator mode: bf16 update step of 0.5B/1.5B shapes, MFU vs the chip's "
                      "bf16 peak (instead of parts a-c).", flag_values=fv)
    flags.DEFINE_list("accel_models", ["Qwen2.5-0.5B", "Qwen2.5-1.5B"], "Named shapes for --accel.", flag_values=fv)
    flags.DEFINE_integer("accel_rows", 4, "Sequences per update in --accel.", flag_values=fv)
    flags.DEFINE_integer("accel_prompt", 512, "Prompt tokens per sequence in --accel.", flag_values=fv)
    flags.DEFINE_integer("accel_response", 1536, "Response tokens per sequence in --accel.", flag_values=fv)
    flags.DEFINE_bool("accel_tiny", False, "--accel with a 2-layer d=64 model (runs on a CPU).", flag_values=fv)
    flags.DEFINE_bool("accel_iteration", False, "Accelerator mode: one GRPO iteration of a 0.5B-shaped policy "
                      "(experiments/_bench_iteration.py); with --accel_tiny a 2-layer d=64 one.", flag_values=fv)
    flags.DEFINE_string("iter_model", "Qwen2.5-0.5B", "Named shape of --accel_iteration.", flag_values=fv)
    flags.DEFINE_integer("iter_prompts", 16, "Prompts per iteration in --accel_iteration.", flag_values=fv)
    flags.DEFINE_integer("iter_group", 16, "Samples per prompt in --accel_iteration.", flag_values=fv)
    flags.DEFINE_integer("iter_prompt_len", 256, "Prompt tokens (left-padded) in --accel_iteration.", flag_values=fv)
    flags.DEFINE_integer("iter_new_tokens", 512, "New tokens per response in --accel_iteration.", flag_values=fv)
    flags.DEFINE_integer("iter_iterations", 2, "Iterations of --accel_iteration (the first compiles; the last is "
                         "reported).", flag_values=fv)
    flags.DEFINE_integer("iter_micro_batches", 1, "Micro-batches of the update in --accel_iteration.", flag_values=fv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(fv.get_help())
        raise SystemExit(0)
    fv(list(argv))
    return fv


def main(argv: list[str]) -> str:
    fv = parse_flags(argv)
    if fv.accel_iteration:
        from experiments import _bench_iteration

        return _bench_iteration.main(fv)
    if fv.accel:
        return accel_main(fv)
    load_start = os.getloadavg()
    short = fv.quick or fv.issue
    sizes, repeats = ((512, 1024), 3) if short else ((512, 1024, 2048), 5)
    peaks = [measure_matmul_peak(sizes, repeats)]
    parts = []
    if "b" in fv.parts:
        steps = 1 if short else fv.steps
        results = [bench_update(c, steps) for c in update_cases(fv.quick, fv.sweep)]
        peaks.append(measure_matmul_peak(sizes, repeats))  # again after (b): the best of both is the peak
    if "a" in fv.parts:
        parts.append(peak_table({n: {k: max(p[n][k] for p in peaks) for k in ("wall", "cpu")} for n in sizes}))
    if "b" in fv.parts:
        parts.append(update_table(results, best_peak(*peaks)))
    if "c" in fv.parts:
        parts.append(iteration_table(bench_iteration(2 if short else fv.iterations)))
    if "c" in fv.parts and fv.overlap:
        parts.append(overlap_table(bench_overlap(3 if short else fv.iterations)))
    report = "\n\n".join([machine_header(load_start, os.getloadavg())] + parts)
    print(report, flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv)
