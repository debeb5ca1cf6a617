"""`bench_train.py --accel_iteration`: one GRPO iteration of a Qwen2.5-0.5B-shaped policy on one accelerator.

The RL loop's own pieces in the loop's order (`train/loop.py`), on random weights built on the device and synthetic
arithmetic prompts left-padded to P tokens:

    sampler_copy (float32 training layout -> compute-dtype sampler layout)
    -> rollout.collect_batch (the sampler and the arithmetic scorer, each wrapped in a timer)
    -> parts.build_batch (old and, with the recipe's KL, reference log-probs; advantages)
    -> parts.split + the update step, compiled ahead of time by the loop's preflight.

The config is `configs/grpo.py:full` (float32 masters with bf16 compute, scanned layers, full remat, shared prefill,
chunked LM head, k3 KL 0.001 to a reference copy) with the model, the task (arithmetic, random init) and the batch
replaced. The first iteration compiles the sampler and the log-prob pass; the table reports the last one.

What the table reports (B rows, P prompt and R new tokens, d hidden, V vocabulary):
  sampling tokens/s   generated tokens / seconds inside the sampler call;
  decode step         sampler seconds / decode steps (the longest response); the shared prefill (P tokens of one row
                      per group) is inside it: at the defaults 4096 prefill tokens against 512 steps of 256 rows;
  decode bandwidth    (weight bytes + KV-cache bytes) read per decode step / decode step, against the chip's HBM
                      bandwidth (`_accel.HBM_GBPS`). Weight bytes: the matmul weights in the compute dtype (the
                      embedding gather reads B rows, a tied table is read once as the LM head). KV bytes of step t:
                      B * layers * 2 * kv_heads * head_dim * itemsize * (P + end of t's decode segment): the sampler
                      attends over the whole cache it carries (`sampling/autoregressive.py`), averaged over the steps;
  weight transfer     bytes read (float32) and written (compute dtype) by sampler_copy / its seconds, against HBM;
  MFU                 model FLOPs / seconds / the chip's dense bf16 peak (`_accel.BF16_PEAK_TFLOPS`), update
                      FLOPs = ppo_epochs * (_accel.update_flops(B, P + R) - 6 d V B P): the loss's LM head runs
                      on the R response positions only (`train/logprobs.ar_logps`); a log-prob pass is a third of it
                      (forward only), once for the policy and once for the reference.

Defaults and time on one H100 (16 prompts x 16 samples = 256 rows, P = 256, R = 512, Qwen2.5-0.5B: 0.494B matmul
parameters, 24 layers, 2 KV heads of 64):
  decode step reads 0.99 GB of weights + 1.8 GB of KV cache on average (576 slots x 256 rows x 12 KiB): >= 0.8 ms at
  3.35 TB/s, 512 steps >= 0.43 s at the roofline, a few seconds at a realistic fraction of it;
  a log-prob pass is 0.19 PFLOP (two passes: < 1 s at 40% MFU), the update 0.57 PFLOP (~1.5 s at 40% MFU);
  the weight transfer moves 3 GB (~1 ms at the roofline);
  so an iteration is ~5-10 s, the compilations (sampler prefill + 4 decode segments, the log-prob pass, the update
  step ahead of time) one to three minutes, the random init and the task a few seconds: well under 8 minutes for
  the default 2 iterations. The update step's memory is checked before it runs (the loop's preflight):
  `--iter_micro_batches` splits it when it does not fit.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class IterationCase:
    """Model and batch of the benchmarked iteration."""

    model: str  # a named shape of experiments/_compile_targets.py, or "tiny" (2-layer d=64: the CPU smoke run)
    prompts: int = 16
    group: int = 16
    prompt_len: int = 256
    new_tokens: int = 512
    iterations: int = 2
    micro_batches: int = 1

    @property
    def rows(self) -> int:
        return self.prompts * self.group


def model_config(case: IterationCase, config):
    """TransformerConfig of the case with the config's layer layout (scan, remat) and float32 masters."""
    from experiments._accel import shape_config

    from jaxrl_reason.models.transformer import TransformerConfig

    if case.model == "tiny":
        cfg = TransformerConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                num_kv_heads=2, qkv_bias=True, tie_embeddings=True)
    else:
        cfg = shape_config(case.model, "float32")
    m = config.model
    cfg = dataclasses.replace(cfg, param_dtype=m.param_dtype, scan_layers=bool(m.scan_layers), remat=m.remat,
                              remat_names=tuple(m.remat_names), attention_impl=m.attention_impl)
    cfg.validate()
    return cfg


def iteration_config(case: IterationCase):
    """`configs/grpo.py:full` with the arithmetic task, a random init and the case's batch (model fields mirror
    `model_config`, which builds the policy: the loop's `load_policy` has no named shapes)."""
    from configs.grpo import get_config

    c = get_config("full")
    c.model.init, c.task.name = "random", "arithmetic"
    r = c.rollout
    r.prompts_per_step, r.group_size, r.max_prompt_len, r.max_new_tokens = (case.prompts, case.group, case.prompt_len,
                                                                            case.new_tokens)
    c.optim.micro_batches = case.micro_batches
    if case.rows % max(c.optim.logp_micro_batch_rows, 1):
        c.optim.logp_micro_batch_rows = 0  # fewer rows than one log-prob micro-batch: one pass
    c.train.num_steps, c.train.export_hf = case.iterations, False
    c.eval.num_problems = 16
    if case.model == "tiny":  # replicated weights: an FSDP split of a d=64 model over CPU devices only adds compile time
        c.mesh.data, c.mesh.fsdp = -1, 1
        c.rollout.share_prefix = False  # a few groups cannot give each of the CPU's fake devices whole groups
    cfg = model_config(case, c)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "rope_theta", "tie_embeddings"):
        c.model[name] = getattr(cfg, name)
    return c, cfg


# ------------------------------------------------------------------------------------------------- counts
def matmul_weight_bytes(cfg, itemsize: int) -> int:
    """Bytes of the weights one decode step reads: the matmul weights (_accel.matmul_params) in the compute
    dtype."""
    from experiments._accel import matmul_params

    return matmul_params(cfg) * itemsize


def kv_bytes_per_step(cfg, rows: int, prompt_len: int, new_tokens: int, steps: int, itemsize: int) -> float:
    """Mean KV-cache bytes the sampler's attention reads per decode step over the first `steps` steps: step t reads
    the P + (end of t's decode segment) slots of every layer's K and V (`sampling/autoregressive.py`)."""
    from jaxrl_reason.sampling.autoregressive import default_segment_len, segment_ends

    ends = segment_ends(new_tokens, default_segment_len(new_tokens))
    seg = min(default_segment_len(new_tokens), new_tokens)
    slots = [prompt_len + ends[t // seg] for t in range(steps)]
    per_slot = rows * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim_ * itemsize
    return per_slot * float(np.mean(slots))


def update_model_flops(cfg, rows: int, prompt_len: int, new_tokens: int) -> float:
    """FLOPs of one update over `rows` sequences: _accel.update_flops without the LM head on the prompt."""
    from experiments._accel import update_flops

    full = update_flops(cfg, rows, prompt_len + new_tokens)["total"]
    return full - 6 * cfg.hidden_size * cfg.vocab_size * rows * prompt_len


# ------------------------------------------------------------------------------------------------- the run
def _timed(fn, log: list):
    """fn with the seconds of each call (until its outputs are ready) appended to `log`."""
    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        log.append(time.perf_counter() - t0)
        return out
    wrapped.accepts_examples = getattr(fn, "accepts_examples", False)
    return wrapped


def _nbytes(tree) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def build(config, cfg):
    """(PolicyParts, TrainState, update function, task, preflight compile seconds, reference?) as the loop builds
    them (`train/policy.build_parts`, `train/loop._run`), with the policy initialised on the device."""
    from flax import nnx

    from jaxrl_reason.models import sharding as sharding_lib
    from jaxrl_reason.models.transformer import Transformer
    from jaxrl_reason.train import loop
    from jaxrl_reason.train import policy as policy_lib
    from jaxrl_reason.train import preflight as preflight_lib
    from jaxrl_reason.train.build import build_task, validate_config
    from jaxrl_reason.train.step import make_train_step

    validate_config(config)
    mesh, task = loop._mesh(config), build_task(config)
    make = lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)[1]  # noqa: E731
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(config.seed))), nnx.Param)[0]
    shardings = {"policy": sharding_lib.param_shardings(jax.eval_shape(make), mesh)}
    params = jax.jit(make, out_shardings=shardings["policy"])()  # on the device, never on the host
    kl = config.loss.kl_coef > 0 or config.loss.kl_in_reward_coef > 0
    ref = policy_lib.reference_copy(config, params, shardings) if kl else None
    parts = policy_lib.ar_parts(config, graphdef, task.tokenizer, ref_params=ref, mesh=mesh, shardings=shardings)
    o = config.optim
    state, tx, state_sh = loop._initial_state(config, mesh, {"policy": params},
                                              config.train.num_steps * o.ppo_epochs * o.mini_batches)
    batch_sh = loop._batch_sharding(config, mesh)
    step = make_train_step(parts.loss_fn, tx, num_micro_batches=o.micro_batches, state_shardings=state_sh,
                           batch_shardings=batch_sh)
    t0 = time.perf_counter()
    update = loop._preflight(config, mesh, step, state, batch_sh,
                             preflight_lib.device_capacity(mesh.devices.flat[0]))
    return parts, state, update, task, time.perf_counter() - t0, ref is not None


def one_iteration(config, parts, state, update, spec, stream, logs: dict, it: int):
    """One RL iteration of the loop's `_train`, each phase timed; returns (state, seconds by phase, rows)."""
    from jaxrl_reason.methods import registry as methods
    from jaxrl_reason.train import hparams
    from jaxrl_reason.train import loop
    from jaxrl_reason.train import rollout as rollout_lib
    from jaxrl_reason.train.sampler_layout import sampler_copy

    for log in logs.values():
        log.clear()
    t0 = time.perf_counter()
    sampler_params = jax.block_until_ready(sampler_copy(config, state.params["policy"]))
    t1 = time.perf_counter()
    copied = _nbytes(state.params["policy"]) + _nbytes(sampler_params)
    rows, _, _ = rollout_lib.collect_batch(
        spec, sampler_params, stream, jax.random.fold_in(jax.random.PRNGKey(config.seed), it),
        train_groups=config.rollout.prompts_per_step, reward_hp=hparams.reward_hp(config),
        filter_hp=hparams.filter_hp(config), sampler_args=methods.sampler_args(config, {}))
    del sampler_params
    t2 = time.perf_counter()
    batch, _, _ = parts.build_batch(rows, state.params)
    t3 = time.perf_counter()
    state, _, _ = loop._update(config, update, state, parts.split(batch, np.random.default_rng([config.seed, it])),
                               it, 0)
    t4 = time.perf_counter()
    sample, score = sum(logs["sample"]), sum(logs["score"])
    secs = {"transfer": t1 - t0, "sampling": sample, "rewards": score, "host": (t2 - t1) - sample - score,
            "logps": t3 - t2, "update": t4 - t3, "total": t4 - t0, "transfer_bytes": copied,
            "sampler_calls": len(logs["sample"])}
    return state, secs, rows


def run(case: IterationCase) -> dict:
    """Builds the loop's pieces for `case`, runs `case.iterations` iterations; the measurements of the last one."""
    from jaxrl_reason.train import rollout as rollout_lib
    from jaxrl_reason.train.logprobs import COMPUTE_DTYPES

    if case.iterations < 1:
        raise ValueError(f"--iter_iterations must be >= 1, got {case.iterations}.")
    config, cfg = iteration_config(case)
    parts, state, update, task, compile_s, with_ref = build(config, cfg)
    r = config.rollout
    logs = {"sample": [], "score": []}
    spec = rollout_lib.RolloutSpec(_timed(parts.train_gen, logs["sample"]), task.tokenizer,
                                   _timed(task.scorer, logs["score"]), r.prompts_per_step, r.group_size,
                                   r.max_prompt_len, r.max_new_tokens, r.sample_batch_rows)
    stream = rollout_lib.PromptStream(task.train, config.seed)
    totals = []
    for it in range(case.iterations):
        state, secs, rows = one_iteration(config, parts, state, update, spec, stream, logs, it)
        totals.append(secs["total"])
    itemsize = np.dtype(COMPUTE_DTYPES[config.model.compute_dtype]).itemsize
    lengths = np.asarray(rows.length_N)
    steps = int(lengths.max())
    stats = jax.devices()[0].memory_stats() or {}
    return {"case": case, "cfg": cfg, "secs": secs, "first_s": totals[0], "update_compile_s": compile_s,
            "params": sum(int(np.size(x)) for x in jax.tree.leaves(state.params["policy"])),
            "tokens": int(lengths.sum()), "decode_steps": steps,
            "weight_bytes": matmul_weight_bytes(cfg, itemsize),
            "kv_bytes": kv_bytes_per_step(cfg, case.rows, case.prompt_len, case.new_tokens, steps, itemsize),
            "update_flops": config.optim.ppo_epochs * update_model_flops(cfg, case.rows, case.prompt_len,
                                                                         case.new_tokens),
            "logp_passes": 1 + with_ref, "peak_bytes": stats.get("peak_bytes_in_use"),
            "compute_dtype": config.model.compute_dtype}


# ------------------------------------------------------------------------------------------------- the table
def _of(rate: float, peak: float | None, what: str) -> str:
    return f"{100 * rate / peak:.1f}% of {what}" if peak else "n/a"


def table(res: dict, device_kind: str) -> str:
    """One markdown table: each phase's seconds, its share of the iteration, its rate and that rate against the
    chip's peak (HBM bandwidth for the memory-bound phases, dense bf16 FLOP/s for the passes)."""
    from experiments._accel import bf16_peak, hbm_bandwidth

    c, s = res["case"], res["secs"]
    peak, hbm = bf16_peak(device_kind), hbm_bandwidth(device_kind)
    hbm_txt = f"{hbm / 1e9:.0f} GB/s HBM" if hbm else ""
    peak_txt = f"{peak / 1e12:.0f} TFLOP/s bf16" if peak else ""
    total = s["total"]
    step = s["sampling"] / max(res["decode_steps"], 1)
    read = res["weight_bytes"] + res["kv_bytes"]
    transfer_rate = s["transfer_bytes"] / s["transfer"]
    logp_flops = res["logp_passes"] * res["update_flops"] / 3
    dtype = res["compute_dtype"]
    rows = [
        (f"weight transfer (sampler_copy: float32 train layout -> {dtype} sampler layout)", s["transfer"],
         f"{transfer_rate / 1e9:.3g} GB/s ({s['transfer_bytes'] / 1e9:.3g} GB read + written)",
         _of(transfer_rate, hbm, hbm_txt)),
        (f"sampling ({s['sampler_calls']} sampler call{'s' * (s['sampler_calls'] != 1)}: prefill + "
         f"{res['decode_steps']} decode steps)", s["sampling"],
         f"{res['tokens'] / s['sampling']:.0f} tok/s; {1e3 * step:.3f} ms / decode step reading "
         f"{res['weight_bytes'] / 1e9:.3g} GB weights + {res['kv_bytes'] / 1e9:.3g} GB KV cache: "
         f"{read / step / 1e9:.3g} GB/s", _of(read / step, hbm, hbm_txt)),
        ("rewards (arithmetic scorer)", s["rewards"], f"{c.rows / s['rewards']:.0f} rows/s", ""),
        ("rollout host work (prompts, decoding text, filter)", s["host"], "", ""),
        (f"log-probs + advantages ({res['logp_passes']} forward passes)", s["logps"],
         f"{logp_flops / s['logps'] / 1e12:.3g} TFLOP/s ({logp_flops / 1e12:.3g} TFLOP)",
         _of(logp_flops / s["logps"], peak, f"{peak_txt} (MFU)")),
        ("update (forward + backward + AdamW)", s["update"],
         f"{res['update_flops'] / s['update'] / 1e12:.3g} TFLOP/s ({res['update_flops'] / 1e12:.3g} TFLOP)",
         _of(res["update_flops"] / s["update"], peak, f"{peak_txt} (MFU)")),
        ("**iteration**", total, f"{res['tokens'] / total:.0f} generated tok/s end to end", ""),
    ]
    mem = f"{res['peak_bytes'] / 2**30:.1f} GiB" if res.get("peak_bytes") else "n/a"
    lines = [f"### One GRPO iteration on one {device_kind}: {c.model} ({res['params'] / 1e6:.1f}M params, float32 "
             f"masters, {dtype} compute), {c.prompts} prompts x {c.group} = {c.rows} rows, P = {c.prompt_len} + "
             f"R = {c.new_tokens} tokens; iteration {c.iterations} of {c.iterations} (the first, with its "
             f"compilations: {res['first_s']:.1f} s; the update step compiled ahead: {res['update_compile_s']:.1f} s); "
             f"peak device memory {mem}", "",
             "| phase | s | share | rate | of chip peak |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {sec:.4f} | {100 * sec / total:.1f}% | {rate} | {vs} |" for name, sec, rate, vs in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- entry
def main(fv) -> str:
    """`bench_train.py --accel_iteration` from its parsed flags: prints and returns the report; `--accel_tiny` swaps
    the model for a 2-layer d=64 one and the sizes for small ones (sizes given as flags win)."""
    sizes = {"prompts": "iter_prompts", "group": "iter_group", "prompt_len": "iter_prompt_len",
             "new_tokens": "iter_new_tokens"}
    kw = {k: fv[name].value for k, name in sizes.items()}
    if fv.accel_tiny:
        small = {"prompts": 4, "group": 4, "prompt_len": 32, "new_tokens": 32}
        kw = {k: kw[k] if fv[name].present else small[k] for k, name in sizes.items()}
    case = IterationCase("tiny" if fv.accel_tiny else fv.iter_model, iterations=fv.iter_iterations,
                         micro_batches=fv.iter_micro_batches, **kw)
    t0 = time.perf_counter()
    text = table(run(case), jax.devices()[0].device_kind)
    report = (f"## bench_train --accel_iteration: backend {jax.default_backend()}, jax {jax.__version__}, "
              f"{time.perf_counter() - t0:.0f} s in all\n\n{text}")
    print(report, flush=True)
    return report
