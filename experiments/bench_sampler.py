"""Sampler benchmark: our jitted AR sampler vs transformers `generate` (torch CPU), and diffusion rows.

  python experiments/bench_sampler.py              # full run, all cores
  python experiments/bench_sampler.py --one_core   # pin the process to one core (robust on a shared machine)
  python experiments/bench_sampler.py --quick      # smoke run (about a minute)
  python experiments/bench_sampler.py --issue      # the issue's rows in ~7 min on an idle 2-core machine:
                                                   # both models, batch 1 and 32, 256 new tokens, one timed call
                                                   # each (batch 32 in 1, 2 and 4 lanes); per-token table for
                                                   # llama-1M at 64/256/1024; no diffusion
  python experiments/bench_sampler.py --group      # table (4) only: group-16 rollouts, shared prefill/prefix vs not
  python experiments/bench_sampler.py --reshard    # table (5) only: trainer -> sampler weight transfer (bf16);
                                                   # on the CPU over --cpu_devices fake devices (default 8)

Tables (markdown on stdout):
  (1) AR generated tokens/s, ours vs transformers, same weights (built with torch, `save_pretrained`, imported
      with `load_hf`), same prompts, greedy, KV cache on both, no EOS (every row runs the full budget).
      transformers runs with `torch.set_num_threads(cores)`. Two metrics: wall-clock tokens/s, and tokens per
      CPU-second of the process ("tok/cpu-s"). On a machine shared with other jobs the wall-clock numbers of
      multi-threaded runtimes (XLA's pool, torch's OpenMP) are dominated by threads waiting for descheduled
      peers; `--one_core` pins everything to one core (XLA sizes its pool from the affinity mask) and the CPU
      metric then measures the work itself. Timings are the best of `--repeats` calls; our compile time is
      excluded and reported separately. "match" = fraction of generated tokens equal to transformers' ones.
      Batch > 1 rows run our sampler with each of `--lanes` (default 1, 2 and 4; `sampling/autoregressive.py`).
  (2) AR time per generated token at 64 / 256 / 1024 new tokens (batch 1, greedy, no EOS, prompt 32): one whole
      `generate` call (prefill + R decode steps, compile excluded) divided by R, by wall clock and by process CPU
      time. The MLP / projection work per token is constant; the attention of step t reads the cache slots the
      sampler carries (P + the end of t's decode segment, `sampling/autoregressive.py`), so its cost grows with R.
      Below the table: a least-squares line `cpu ms/token = a + b * R` per model, the slope b (µs per token per
      extra 1000 tokens of length; 0 = total time exactly linear in R) and the ratio ms/token(R_max) / ms/token(R_min)
      (1 = linear; a cost quadratic in R would give R_max / R_min).
  (3) the rows of `experiments/_bench_diffusion.py::diffusion_rows(quick)` when that module exists.
  (4) `--group`: an RL round of `--group_prompts` prompts x 16 samples, 256-token prompts, sampled at temperature
      1 with no EOS, decoded by today's sampler (every row prefilled), with `share_prefill` (each prompt
      prefilled once, its cache copied to its 16 samples: "shared") and with `share_prefix` too (the prompt cache
      kept once per group and read once per group at every decode step: "prefix"), same model and weights,
      compiled first, then timed alternately (best of `--repeats`). tokens/s counts generated tokens; the ratio
      is what to compare on a shared machine. A last row adds stop ids (every `--group_stop_every`-th id) so that
      rows stop at different lengths, and a fourth variant that also compacts finished rows between decode segments
      (`sampling/compaction.py`; "compact row-steps" = rows x steps decoded over batch x steps).
  (5) `--reshard`: the time to move the trainer's float32 weights (`--train_mesh`, default FSDP over every device)
      into the sampler's bf16 decode layout for each of `--decode_tensor` (`sampling/weights.py`), against the host
      round trip it replaces (`experiments/_bench_reshard.py`). On the CPU the fake devices share host memory and
      cores: a functional measurement; on accelerators it is the real transfer.
"""
import argparse
import os
import sys
import tempfile
import time

if "--one_core" in sys.argv:  # before jax / torch create their thread pools
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
if "--reshard" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    _n = sys.argv[sys.argv.index("--cpu_devices") + 1] if "--cpu_devices" in sys.argv else "8"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={_n}"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxrl_reason.models import hf  # noqa: E402
from jaxrl_reason.sampling import autoregressive as ar  # noqa: E402
from jaxrl_reason.sampling import compaction  # noqa: E402
from jaxrl_reason.sampling.processors import SamplingParams  # noqa: E402

MODELS = {  # Llama-style: (vocab, hidden, intermediate, layers, heads, kv_heads)
    "llama-1M": (1024, 128, 384, 4, 4, 2),
    "llama-30M": (8192, 512, 1408, 8, 8, 4),
}
PROMPT_LEN = 32
PAD = 0


def build_models(name, workdir):
    """A random torch Llama (seeded), saved with `save_pretrained` and imported with `load_hf`."""
    import torch
    import transformers
    vocab, hidden, inter, layers, heads, kv = MODELS[name]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                      max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                                      pad_token_id=PAD)
    torch_model = transformers.LlamaForCausalLM(config).eval()
    path = os.path.join(workdir, name)
    torch_model.save_pretrained(path)
    model, _ = hf.load_hf(path)
    return torch_model, model


def _best_of(fn, repeats):
    """(best wall seconds, best process-CPU seconds, output of the last call) over `repeats` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def time_ours(model, prompts, new_tokens, repeats, lanes=1):
    """(wall s, cpu s, compile s, tokens) of greedy decoding of `new_tokens` tokens (`lanes`: see the sampler)."""
    graphdef, state = nnx.split(model, nnx.Param)
    fn = ar.make_generate_fn(graphdef, max_prompt_len=prompts.shape[1], max_new_tokens=new_tokens, eos_ids=(),
                             pad_id=PAD, params=SamplingParams(greedy=True), lanes=lanes)
    mask = np.ones(prompts.shape, bool)
    run = lambda: jax.block_until_ready(fn(state, prompts, mask, jax.random.key(0)))  # noqa: E731
    t0 = time.perf_counter()
    run()
    first_s = time.perf_counter() - t0
    wall, cpu, rollout = _best_of(run, repeats)
    assert int(np.asarray(rollout.length_B).min()) == new_tokens
    return wall, cpu, max(first_s - wall, 0.0), np.asarray(rollout.tokens_BxR)  # compile = first call - a run


def time_hf(torch_model, prompts, new_tokens, repeats):
    """(wall s, cpu s, tokens) of transformers greedy `generate` with its default (dynamic) KV cache."""
    import torch
    ids = torch.tensor(prompts, dtype=torch.long)

    def run():
        with torch.inference_mode():
            return torch_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=new_tokens, pad_token_id=PAD, use_cache=True)
    run()  # warm-up
    wall, cpu, out = _best_of(run, repeats)
    return wall, cpu, out[:, prompts.shape[1]:].numpy()


def _table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def ar_vs_hf_rows(models, batches, new_tokens, repeats, lanes=(1,)):
    """Table (1): one row per (model, batch, lanes); batch-1 rows run in one lane.

    All our timings come first, then transformers' (once per (model, batch), compared with every lanes row): our
    sampler timed right after a torch `generate` in the same process ran up to 25% slower (measured), and the
    order must not decide the comparison.
    """
    cases = [(name, b, np.random.default_rng(b).integers(1, MODELS[name][0], (b, PROMPT_LEN)).astype(np.int32))
             for name in models for b in batches]
    ours = {(name, b, k): time_ours(models[name][1], prompts, new_tokens, repeats, k)
            for name, b, prompts in cases for k in lanes if b % k == 0 and (b > 1 or k == 1)}
    hf = {(name, b): time_hf(models[name][0], prompts, new_tokens, repeats) for name, b, prompts in cases}
    n_params = {name: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))) for name, (_, m) in models.items()}
    rows = []
    for (name, b, k), (wall, cpu, compile_s, ours_tok) in ours.items():
        hf_wall, hf_cpu, hf_tok = hf[(name, b)]
        n = b * new_tokens
        rows.append({"model": name, "params": f"{n_params[name] / 1e6:.2f}M", "batch": b, "lanes": k,
                     "new tokens": new_tokens, "ours tok/s": f"{n / wall:.0f}", "HF tok/s": f"{n / hf_wall:.0f}",
                     "speedup (wall)": f"{hf_wall / wall:.2f}x", "ours tok/cpu-s": f"{n / cpu:.0f}",
                     "HF tok/cpu-s": f"{n / hf_cpu:.0f}", "speedup (cpu)": f"{hf_cpu / cpu:.2f}x",
                     "ours compile s": f"{compile_s:.1f}", "match": f"{np.mean(ours_tok == hf_tok):.3f}"})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def scaling_rows(models, lengths, repeats):
    """Table (2): time per generated token vs the number of new tokens, batch 1."""
    rows = []
    for name, (_, model) in models.items():
        prompts = np.random.default_rng(0).integers(1, MODELS[name][0], (1, PROMPT_LEN)).astype(np.int32)
        for n in lengths:
            wall, cpu, compile_s, _ = time_ours(model, prompts, n, repeats)
            rows.append({"model": name, "batch": 1, "new tokens": n, "total s": f"{wall:.3f}",
                         "ms / token": f"{1e3 * wall / n:.3f}", "cpu ms / token": f"{1e3 * cpu / n:.3f}",
                         "compile s": f"{compile_s:.1f}"})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def per_token_fit(lengths, cpu_s):
    """Least-squares line through (R, per-token seconds = cpu_s / R): {"a_ms", "b_us_per_1k", "ratio"}.

    a_ms: intercept (ms / token), b_us_per_1k: slope in µs per token per 1000 extra new tokens, ratio: per-token time
    at the largest R over the one at the smallest R.
    """
    r = np.asarray(lengths, np.float64)
    per_token_ms = 1e3 * np.asarray(cpu_s, np.float64) / r
    if r.size < 2:
        raise ValueError("per_token_fit needs at least two lengths.")
    b, a = np.polyfit(r, per_token_ms, 1)
    lo, hi = int(np.argmin(r)), int(np.argmax(r))
    return {"a_ms": float(a), "b_us_per_1k": float(1e6 * b), "ratio": float(per_token_ms[hi] / per_token_ms[lo])}


def fit_lines(rows):
    """One line per model of table (2): the fit of `per_token_fit` on its cpu time per token."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        lengths = [r["new tokens"] for r in mine]
        fit = per_token_fit(lengths, [float(r["cpu ms / token"]) * r["new tokens"] / 1e3 for r in mine])
        lines.append(f"- {name}: cpu ms/token = a + b * R with a = {fit['a_ms']:.4f} ms, b = {fit['b_us_per_1k']:.2f} µs "
                     f"per 1k tokens of R; "
                     f"ms/token at R={max(lengths)} / at R={min(lengths)} = {fit['ratio']:.2f} "
                     f"(linear total cost: 1.00, quadratic: {max(lengths) / min(lengths):.0f})")
    return "\n".join(lines)


def _timed_alternately(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Compiles (first call) then times each run `repeats` times, alternating between them; (best s, outputs)."""
    outs = {name: run() for name, run in runs.items()}
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):  # alternate, so that a busy spell on the machine hits every variant
        for name, run in runs.items():
            best[name] = min(best[name], _best_of(run, 1)[0])
    return best, outs


def group_rows(model, prompts_per_round, new_tokens_list, repeats, group=16, prompt_len=256, stop_every=0):
    """Table (4): generated tokens/s of one round: today's sampler, shared prefill, shared-prefix decode, and
    (with stop ids, one every `stop_every` vocabulary ids, so that rows stop at different lengths) shared prefill
    + compaction."""
    graphdef, state = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, model.cfg.vocab_size, (prompts_per_round, prompt_len)).astype(np.int32)
    tokens, mask = np.repeat(prompts, group, axis=0), np.ones((prompts_per_round * group, prompt_len), bool)
    eos = tuple(range(stop_every, model.cfg.vocab_size, stop_every)) if stop_every else ()
    rows = []
    for new_tokens in new_tokens_list:
        kw = dict(max_prompt_len=prompt_len, max_new_tokens=new_tokens, eos_ids=eos, pad_id=PAD,
                  params=SamplingParams(), group_size=group)
        fns = {"today": ar.make_generate_fn(graphdef, **kw),
               "shared": ar.make_generate_fn(graphdef, share_prefill=True, **kw),
               "prefix": ar.make_generate_fn(graphdef, share_prefill=True, share_prefix=True, **kw)}
        if eos:
            fns["shared+compact"] = compaction.make_compacting_generate_fn(graphdef, share_prefill=True, **kw)
        runs = {name: (lambda f=f: jax.block_until_ready(f(state, tokens, mask, jax.random.key(0))))
                for name, f in fns.items()}
        best, outs = _timed_alternately(runs, repeats)
        row = {"rows": f"{prompts_per_round} x {group}", "prompt": prompt_len, "new tokens": new_tokens,
               "stop ids": len(eos)}
        for name in fns:
            n = int(np.asarray(outs[name].length_B).sum())  # generated tokens (EOS included)
            row[f"{name} tok/s"] = f"{n / best[name]:.0f}"
            row[f"{name} speedup"] = f"{best['today'] / best[name]:.2f}x"
        if eos:
            stats = fns["shared+compact"].last_stats
            row["compact row-steps"] = f"{stats['row_steps'] / stats['full_row_steps']:.2f}"
        rows.append(row)
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def diffusion_bench_rows(quick):
    """Table (3): the diffusion sampler's rows (experiments/_bench_diffusion.py)."""
    from experiments import _bench_diffusion

    return _bench_diffusion.diffusion_rows(quick)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--issue", action="store_true", help="the issue's rows, one timed call each (~7 min)")
    parser.add_argument("--one_core", action="store_true", help="pin the process (jax and torch) to one core")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (best is kept)")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    parser.add_argument("--skip_diffusion", action="store_true")
    parser.add_argument("--lanes", type=int, nargs="+", default=None,
                        help="sampler lanes for batch > 1 rows (default: 1, 2 and 4)")
    parser.add_argument("--group", action="store_true", help="table (4) only: shared prefill / prefix at group 16")
    parser.add_argument("--group_prompts", type=int, default=2, help="prompts per round in table (4)")
    parser.add_argument("--group_new_tokens", type=int, nargs="+", default=[32, 128],
                        help="response budgets of table (4)")
    parser.add_argument("--group_stop_every", type=int, default=32,
                        help="table (4)'s last row: every n-th vocabulary id stops a row (lengths vary)")
    parser.add_argument("--reshard", action="store_true", help="table (5) only: trainer -> sampler weight transfer")
    parser.add_argument("--reshard_models", nargs="+", default=["llama-30M", "qwen2.5-0.5B"],
                        help="table (5)'s models: names of experiments/_bench_reshard.py SHAPES or "
                             "vocab,hidden,intermediate,layers,heads,kv_heads")
    parser.add_argument("--train_mesh", type=int, nargs=3, default=[1, -1, 1], metavar=("DATA", "FSDP", "TENSOR"),
                        help="the trainer's mesh in table (5) (-1: all devices the other axes leave)")
    parser.add_argument("--decode_tensor", type=int, nargs="+", default=None,
                        help="sampler tensor sizes of table (5) (default: 1, 2 and all devices)")
    parser.add_argument("--cpu_devices", type=int, default=8, help="fake CPU devices for table (5) on the CPU")
    args = parser.parse_args(argv)
    if args.group:
        return group_main(args)
    if args.reshard:
        return reshard_main(args)
    import torch
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    repeats = args.repeats or (1 if args.quick or args.issue else 3)
    names = args.models or (["llama-1M"] if args.quick else list(MODELS))
    scaling_names = ["llama-1M"] if args.issue and "llama-1M" in names else names
    with tempfile.TemporaryDirectory() as workdir:
        models = {n: build_models(n, workdir) for n in names}
        print(f"\n## AR sampler vs transformers generate (CPU, {cores} of {os.cpu_count()} cores, load average "
              f"{os.getloadavg()[0]:.1f} at start, jax {jax.__version__}, torch {torch.__version__} on {cores} "
              f"threads)\n")
        scaling = scaling_rows({n: models[n] for n in scaling_names}, [16, 64] if args.quick else [64, 256, 1024],
                               repeats)  # ours only: before any torch generate (see ar_vs_hf_rows)
        rows = ar_vs_hf_rows(models, [1, 4] if args.quick else [1, 32], 32 if args.quick else 256, repeats,
                             args.lanes or (1, 2, 4))
        print(_table(rows, list(rows[0])), flush=True)
        print("\n## AR time per generated token vs length (greedy, no EOS)\n")
        print(_table(scaling, list(scaling[0])), flush=True)
        print("\nLine fit of the per-token CPU time against R (see the module docstring):\n")
        print(fit_lines(scaling), flush=True)
    if not args.skip_diffusion and not args.issue:
        rows = diffusion_bench_rows(args.quick)
        if rows:
            print("\n## Diffusion sampler (experiments/_bench_diffusion.py)\n")
            print(_table(rows, list(dict.fromkeys(k for r in rows for k in r))), flush=True)


def group_main(args):
    name = (args.models or ["llama-1M"])[0]
    with tempfile.TemporaryDirectory() as workdir:
        model = build_models(name, workdir)[1]
    cores = len(os.sched_getaffinity(0))
    print(f"\n## Group-16 rollout, shared prefill / prefix vs every row prefilled ({name}, CPU, {cores} of "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, jax {jax.__version__})\n")
    rows = group_rows(model, args.group_prompts, args.group_new_tokens, args.repeats or 3)
    rows += group_rows(model, args.group_prompts, args.group_new_tokens[-1:], args.repeats or 3,
                       stop_every=args.group_stop_every)
    print(_table(rows, list(dict.fromkeys(k for r in rows for k in r))), flush=True)


def reshard_main(args):
    from jaxrl_reason.models import sharding as sharding_lib
    from experiments import _bench_reshard as module
    for name in args.reshard_models:
        module.parse_shape(name)  # a bad shape fails before any model is built
    mesh = sharding_lib.make_mesh(*sharding_lib.resolve_mesh_shape(*args.train_mesh, jax.device_count()))
    tensors = args.decode_tensor or sorted({1, 2, jax.device_count()})
    dev = jax.devices()[0]
    print(f"\n## Trainer -> sampler weight reshard (float32 -> bf16, {jax.device_count()} {dev.platform} devices "
          f"({dev.device_kind}), {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start, jax {jax.__version__}, best of {args.repeats or 5})\n")
    rows = module.reshard_rows(args.reshard_models, mesh, tensors, args.repeats or 5)
    print(_table(rows, list(rows[0])), flush=True)


if __name__ == "__main__":
    main()
