"""Will it fit? Compiles the RL update step and the log-prob pass ahead of time for a model and a target.

  python experiments/compile_check.py --config=configs/grpo.py:full [--config.x=y ...] \
      --model=<Qwen2.5-0.5B | Qwen2.5-1.5B | Qwen2.5-7B | Qwen2.5-14B | Llama-3.1-8B | path/to/config.json> \
      --target=<tpu:v5p-8 | tpu:v5e-8 | tpu:v5e:4x4 | cpu:8> [--layers=4]

No weight is allocated: the model, its parameters and the optimizer state are abstract (shapes and shardings
only), built by the same functions the RL loop uses (`train/loop.abstract_state`, `update_batch_spec`,
`compile_update`, the PolicyParts loss and `train/step.make_train_step`), so the program compiled here is the
loop's. TPU targets compile on this machine through libtpu's topology API (`pip install libtpu`); `cpu:N` uses N
simulated CPU devices (XLA:CPU keeps float32 copies where a TPU keeps bfloat16: its memory is pessimistic).

The update step sees one mini-batch of prompts_per_step x group_size / optim.mini_batches rows, scanned in
optim.micro_batches micro-batches; the log-prob pass (old / reference log-probs: one program) one micro-batch of
those rows. Every row has max_prompt_len + max_new_tokens tokens. Model architecture comes from --model; a non-zero
config.model.{num_layers, hidden_size, ...} overrides it (e.g. --config.model.num_layers=4 for a quick check), and
every other config.model key that names a TransformerConfig field (param_dtype, ...) is passed through.

Per program it prints, per device: arguments, outputs, temporaries, what stays resident beside it (the rest of the
train state, the compute-dtype KL reference), the total against the chip's memory, the model FLOPs (weight matmuls:
layers on every token, LM head on response tokens; causal attention) and the matmul FLOPs of the compiled HLO (loop
bodies counted by their trip counts, split into forward / backward / recompute; custom-call kernels such as splash
attention are opaque and named), compile time and the largest buffers. When XLA:TPU refuses with RESOURCE_EXHAUSTED,
the temporaries it asked for are read from its message. `--what=rollout` (or `all`) compiles the loop's sampler
for sub-batches of the round's rows instead (or as well), beside its KV-cache estimate, and prints the largest that
fits as `rollout.sample_batch_rows=<n>`. The last line is
  fits=yes|no peak_gib=<per device> capacity_gib=<per device>
and the exit status is 0 whenever the check ran to its verdict (also when it does not fit).
"""
from __future__ import annotations

import os
import re
import sys


def _set_platform_env(argv: list[str]) -> None:
    """XLA_FLAGS / JAX_PLATFORMS from --target, before anything imports jax (the config file imports the package)."""
    target = ""
    for i, a in enumerate(argv):
        if a.startswith("--target="):
            target = a.split("=", 1)[1]
        elif a == "--target" and i + 1 < len(argv):
            target = argv[i + 1]
    if target.startswith("cpu:") and target[4:].isdigit():
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={target[4:]}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"  # TPU programs are compiled through the topology API, not a local device
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: this is not a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: several processes may load libtpu


_set_platform_env(sys.argv)

import time  # noqa: E402
import types  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import _compile_rollout as cr  # noqa: E402
from experiments import _compile_targets as ct  # noqa: E402
from experiments import _hlo_flops as hf  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/grpo.py:full", "Method config (with overrides).")
_MODEL = flags.DEFINE_string("model", "Qwen2.5-1.5B", f"Shape name ({', '.join(ct.SHAPES)}) or HF config.json.")
_TARGET = flags.DEFINE_string("target", "cpu:8", "tpu:<slice or topology> or cpu:<N>.")
_LAYERS = flags.DEFINE_integer("layers", 0, "Decoder layers (0: the model's); a quick check at reduced depth.")
_TOP = flags.DEFINE_integer("top", 6, "How many of the largest buffers to list per program.")
_WHAT = flags.DEFINE_enum("what", "update", ["update", "rollout", "all"],
                          "update: the update step and the log-prob pass; rollout: the sampler on one sub-batch.")
_TRIES = flags.DEFINE_integer("rollout_tries", 3, "At most this many rollout sub-batch sizes to compile.")
_DUMP = flags.DEFINE_string("dump_hlo", "", "Directory to write each compiled program's HLO text into.")

def target_devices(target: ct.Target):
    import jax

    if target.platform == "cpu":
        if jax.device_count() != target.num_devices:
            raise ValueError(f"{target.num_devices} CPU devices asked, {jax.device_count()} present: XLA_FLAGS was "
                             "set before this script could set it.")
        return jax.devices()
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=target.topology, platform="tpu").devices
    except Exception as e:  # noqa: BLE001 - libtpu missing or the topology unknown to it: say which
        raise RuntimeError(f"libtpu could not describe topology {target.topology!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); install libtpu (setup.py's test extra).")


def capacity_bytes(target: ct.Target, devices) -> int:
    """The chip's HBM for TPU targets; for cpu:N this machine's RAM shared by the N simulated devices."""
    from jaxrl_reason.train import preflight

    reported = preflight.device_capacity(devices[0])
    if reported:
        return reported
    if target.platform == "tpu":
        return int(target.hbm_gib * ct.GIB)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // target.num_devices


def build(config, mcfg, devices):
    """The loop's update step and log-prob forward on abstract weights: everything `report_program` compiles."""
    import jax
    from flax import nnx

    from jaxrl_reason.models import sharding as sharding_lib
    from jaxrl_reason.models.transformer import Transformer
    from jaxrl_reason.models.value import ValueModel
    from jaxrl_reason.train import batch as batch_lib
    from jaxrl_reason.train import loop
    from jaxrl_reason.train import policy as policy_lib
    from jaxrl_reason.train.step import make_train_step

    if config.model.attention != "causal":
        raise ValueError("the compile check covers autoregressive (model.attention='causal') policies.")
    m = config.mesh
    mesh = sharding_lib.make_mesh(*sharding_lib.resolve_mesh_shape(m.data, m.fsdp, m.tensor, len(devices)),
                                  devices=devices)
    policy = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(config.seed)))
    graphdef, policy_params = nnx.split(policy, nnx.Param)
    params, value_graphdef = {"policy": policy_params}, None
    if config.advantage.estimator == "gae":
        value = nnx.eval_shape(lambda: ValueModel.from_policy(Transformer(mcfg, rngs=nnx.Rngs(0)),
                                                              rngs=nnx.Rngs(config.seed)))
        value_graphdef, params["value"] = nnx.split(value, nnx.Param)
    tokenizer = types.SimpleNamespace(eos_token_id=0, pad_token_id=0)  # the loss never reads token ids
    shardings = {k: sharding_lib.param_shardings(v, mesh) for k, v in params.items()}
    parts = policy_lib.ar_parts(config, graphdef, tokenizer, value_graphdef=value_graphdef, mesh=mesh,
                                shardings=shardings)
    o = config.optim
    state, tx, state_sh = loop.abstract_state(config, mesh, params, config.train.num_steps * o.ppo_epochs *
                                              o.mini_batches)
    batch_sh = loop._batch_sharding(config, mesh)
    step = make_train_step(parts.loss_fn, tx, num_micro_batches=o.micro_batches, state_shardings=state_sh,
                           batch_shardings=batch_sh)
    batch = loop.update_batch_spec(config, batch_sh)
    # The loop's old / reference pass: micro-batched over rows, sharded like the update step, in compute dtype.
    logps_fn = batch_lib.make_forward_fns(
        graphdef, value_graphdef, spec=policy_lib.logp_spec(config), micro_batch_rows=o.logp_micro_batch_rows,
        **policy_lib.forward_shardings(config, mesh, shardings))[0]
    micro_rows = config.rollout.prompts_per_step * config.rollout.group_size  # the whole rollout batch
    fwd_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((micro_rows,) + x.shape[1:], x.dtype),
                             batch.model_inputs())
    return types.SimpleNamespace(mesh=mesh, step=step, state=state, batch=batch, logps_fn=logps_fn,
                                 fwd_batch=fwd_batch, micro_rows=micro_rows, loop=loop, parts=parts,
                                 shardings=shardings)


def compile_program(name, fn, mesh):
    """(compiled or None, seconds, refusal dict from an out-of-memory message or None)."""
    import jax

    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = fn()
        return compiled, time.perf_counter() - t0, None
    except Exception as e:  # noqa: BLE001 - XLA's out-of-memory refusal is a result here, anything else is not
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        refusal = ct.parse_oom(str(e))
        refusal["message"] = next((ln for ln in str(e).splitlines() if "RESOURCE_EXHAUSTED" in ln), str(e))[:300]
        print(f"{name}: XLA refused: {refusal['message']}", flush=True)
        return None, time.perf_counter() - t0, refusal


def _flop(x: float) -> str:
    """FLOPs with a unit that keeps a few significant digits (tiny test models print MFLOP, not 0.00 TFLOP)."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOP"


def print_flops(text, compiled, model_flops, n_devices):
    """The compiled matmul FLOPs (all devices, per pass) against the model FLOPs (weights, attention)."""
    weights, attention = model_flops
    phases = {k: v * n_devices for k, v in hf.dot_flops_by_phase(text).items()}
    hlo, model = sum(phases.values()), weights + attention
    kernels = hf.custom_kernel_names(text)
    cost = (compiled.cost_analysis() or {}).get("flops", 0.0) * n_devices
    print(f"  model FLOPs {_flop(model)} = weight matmuls {_flop(weights)} + causal attention {_flop(attention)}")
    split = " + ".join(f"{k} {_flop(phases[k])}" for k in ("forward", "backward", "recompute") if k in phases)
    print(f"  compiled matmul FLOPs {_flop(hlo)} (all devices; {split or 'none'}) = {hlo / model:.2f} x the model "
          f"FLOPs, {hlo / weights:.2f} x its weight matmuls; XLA cost analysis (loop bodies once) {_flop(cost)}")
    if kernels:
        print(f"  not counted: {len(kernels)} custom-call kernel(s) ({', '.join(sorted(set(kernels)))}), whose FLOPs "
              "the HLO does not state: where the attention runs in them (splash on TPU), compare the weight figure")


def report_program(name, compiled, seconds, refusal, *, args, resident, model_flops, n_devices, top):
    """Prints one program's per-device table; returns the bytes it needs per device (None: unknown)."""
    print(f"\n### {name} (compiled in {seconds:.1f} s)")
    need = ct.print_memory(compiled, refusal, args=args, resident=resident)
    if compiled is None:
        return need
    text = compiled.as_text()
    if _DUMP.value:
        os.makedirs(_DUMP.value, exist_ok=True)
        with open(os.path.join(_DUMP.value, re.sub(r"\W+", "_", name).strip("_") + ".hlo.txt"), "w") as f:
            f.write(text)
    print_flops(text, compiled, model_flops, n_devices)
    ct.print_largest_buffers(text, top)
    return need


def check_update(b, config, mcfg, n_devices, mem):
    """Compiles and reports the update step and the log-prob pass; returns (needs, XLA's stated HBM or None)."""
    from jaxrl_reason.train import preflight

    r = config.rollout
    rows = b.batch.tokens_NxL.shape[0]
    gae = config.advantage.estimator == "gae"
    step_c, step_s, step_r = compile_program(
        "update step", lambda: b.loop.compile_update(b.step, b.state, b.batch, b.mesh), b.mesh)
    needs = [report_program("update step", step_c, step_s, step_r, args=mem.state
                            + preflight.per_device_bytes(b.batch), resident=mem.ref,
                            model_flops=ct.model_flops(mcfg, rows, r.max_prompt_len, r.max_new_tokens,
                                                       backward=True, value=gae), n_devices=n_devices,
                            top=_TOP.value)]
    fwd_c, fwd_s, fwd_r = compile_program(
        "log-prob pass", lambda: b.logps_fn.lower(b.state.params["policy"], b.fwd_batch).compile(), b.mesh)
    needs.append(report_program("log-prob pass (old / reference)", fwd_c, fwd_s, fwd_r, args=mem.policy,
                                resident=mem.state - mem.policy + mem.ref,
                                model_flops=ct.model_flops(mcfg, b.micro_rows, r.max_prompt_len,
                                                           r.max_new_tokens, backward=False), n_devices=n_devices,
                                top=_TOP.value))
    return needs, (step_r or {}).get("hbm_bytes")


def check_rollout(b, config, mcfg, capacity, mem):
    """Compiles the loop's sampler for sub-batches of rows (the configured one, else from the KV-cache estimate)
    and prints the largest that fits as `rollout.sample_batch_rows=<n>`; returns that sub-batch's need."""
    import jax.numpy as jnp

    from jaxrl_reason.train.logprobs import COMPUTE_DTYPES

    r = config.rollout
    prefix = r.share_prefill and r.share_prefix
    total, seq = r.prompts_per_step * r.group_size, cr.slots_per_row(r.max_prompt_len, r.max_new_tokens,
                                                                       r.group_size, prefix)
    shards = b.mesh.shape["data"] * b.mesh.shape["fsdp"]
    dtype = jnp.dtype(COMPUTE_DTYPES[config.model.compute_dtype])
    copy = dtype != jnp.dtype(mcfg.param_dtype)  # the loop samples with a compute-dtype copy of the policy
    sampler_params = mem.policy * dtype.itemsize / jnp.dtype(mcfg.param_dtype).itemsize
    resident = mem.state + mem.ref if copy else mem.state - mem.policy + mem.ref
    cands = cr.candidates(total, r.group_size, shards, whole_groups=prefix)
    if r.sample_batch_rows and r.sample_batch_rows not in cands:
        cands = sorted(set(cands) | {r.sample_batch_rows}, reverse=True)
    row_bytes = cr.kv_cache_bytes(mcfg, 1, seq, shards, dtype.itemsize)
    budget = capacity - resident - sampler_params
    start = (cands.index(r.sample_batch_rows) if r.sample_batch_rows
             else cr.start_index(cands, row_bytes, 0.8 * budget))  # 20% beside the cache: logits, activations
    print(f"\n## rollout: {total} rows ({r.prompts_per_step} prompts x {r.group_size}) of {r.max_prompt_len} + "
          f"{r.max_new_tokens} tokens, share_prefill={r.share_prefill}, share_prefix={prefix}, rows over {shards} "
          f"data x fsdp shards; "
          f"KV cache {row_bytes * total / ct.GIB:.2f} GiB per device for every row at once; sub-batch "
          f"candidates {cands[:8]}{' ...' if len(cands) > 8 else ''}")
    needs = {}

    def compile_rows(n):
        c, secs, refusal = compile_program(f"rollout {n} rows", lambda: cr.lower_rollout(
            b.parts, b.state.params["policy"], b.shardings["policy"], n, r.max_prompt_len, dtype).compile(), b.mesh)
        needs[n] = cr.report(f"rollout sub-batch of {n} rows", c, secs, refusal, args=sampler_params,
                             resident=resident, kv_bytes=cr.kv_cache_bytes(mcfg, n, seq, shards, dtype.itemsize),
                             top=_TOP.value)
        return needs[n] is not None and needs[n] <= capacity

    seen, best = cr.search(compile_rows, cands, start, _TRIES.value)
    tried = ", ".join(f"{n} rows {'fits' if ok else 'does not fit'}" for n, ok in seen.items())
    print(f"\nrollout sub-batches compiled: {tried}")
    if best is None:
        print(f"rollout: none of the compiled sub-batches fits; try below {min(seen)} rows")
        return max((v for v in needs.values() if v is not None), default=None)
    print(f"rollout.sample_batch_rows={best}")
    return needs[best]


def main(argv):
    del argv
    import jax
    import numpy as np

    from jaxrl_reason.train import preflight
    from jaxrl_reason.train.logprobs import COMPUTE_DTYPES

    config, target = _CONFIG.value, ct.parse_target(_TARGET.value)
    name, hf = ct.model_hf_config(_MODEL.value)
    mcfg = ct.model_config(config, hf, _LAYERS.value)
    devices = target_devices(target)
    b = build(config, mcfg, devices)
    r, o = config.rollout, config.optim
    seq = r.max_prompt_len + r.max_new_tokens
    n_params = ct.count_params(mcfg)
    rows = b.batch.tokens_NxL.shape[0]
    capacity = capacity_bytes(target, devices)
    print(f"## compile check: {name} ({n_params / 1e9:.3f}B params, {mcfg.num_layers} layers, {mcfg.param_dtype}) on "
          f"{_TARGET.value} = {len(devices)} x {devices[0].device_kind}, mesh {dict(b.mesh.shape)}, jax "
          f"{jax.__version__}")
    print(f"   update: {rows} rows x {seq} tokens ({r.max_prompt_len} + {r.max_new_tokens}) in {o.micro_batches} "
          f"micro-batch(es); log-prob pass: {b.micro_rows} rows in passes of {o.logp_micro_batch_rows or b.micro_rows}"
          f"; capacity {capacity / ct.GIB:.2f} GiB per device")
    policy = preflight.per_device_bytes(b.state.params["policy"])
    kl = config.loss.kl_coef > 0 or config.loss.kl_in_reward_coef > 0
    compute = np.dtype(COMPUTE_DTYPES[config.model.compute_dtype]).itemsize / np.dtype(mcfg.param_dtype).itemsize
    mem = types.SimpleNamespace(state=preflight.per_device_bytes(b.state), policy=policy,
                                ref=policy * compute if kl else 0)  # the KL reference is a compute-dtype copy
    needs = []
    if _WHAT.value in ("update", "all"):
        step_needs, hbm = check_update(b, config, mcfg, len(devices), mem)
        needs += step_needs
        capacity = hbm or capacity  # what XLA itself says the chip offers
    if _WHAT.value in ("rollout", "all"):
        needs.append(check_rollout(b, config, mcfg, capacity, mem))
    known = [n for n in needs if n is not None]
    peak = max(known) if known else float("nan")
    fits = bool(known) and len(known) == len(needs) and peak <= capacity
    print(f"\n{'fits' if fits else 'does NOT fit'}: {peak / ct.GIB:.2f} GiB needed of {capacity / ct.GIB:.2f} GiB "
          f"per device ({100 * peak / capacity:.0f}%)" if np.isfinite(peak) else "\nno memory figure")
    print(f"fits={'yes' if fits else 'no'} peak_gib={peak / ct.GIB:.2f} capacity_gib={capacity / ct.GIB:.2f}",
          flush=True)


if __name__ == "__main__":
    app.run(main)
