"""`run(config, workdir)`: the RL loop, readable top to bottom.

    validate config -> task, tokenizer, policy (+ reference, + critic) -> mesh, shardings, optimizer, state
    -> preflight: compile the update step for the real shapes, stop when it needs more memory than a device has
    -> restore the latest checkpoint if any -> evaluate -> for each RL iteration:
         collect_batch (sample, reward, shape, filter, refill) -> parts.build_batch (old/ref log-probs, values,
         advantages) -> ppo_epochs x mini-batches of the jitted update step -> log -> checkpoint
       (with `rollout.staleness` 1 the next iteration's collect_batch runs in a background thread during the
       update: train/pipeline.py)
    -> evaluate -> export the policy as a Hugging Face checkpoint.

What differs between policy kinds (autoregressive, masked diffusion) is bundled in `PolicyParts`, built by
`train/policy.py`: the samplers, the update-batch builder, the loss and the mini-batch split. What differs between
methods reaches the loop through the method hooks (`methods/registry.py`): extra sampler arguments from a state
carried between iterations. The loop itself is shared.

Determinism and exact resume: the rollout key of iteration i is `fold_in(PRNGKey(seed), i)`, mini-batch order
uses `np.random.default_rng([seed, i])`, and the prompt stream position, the methods' carried state and the
iteration count are stored in the checkpoint meta (and a pending background rollout beside it), so a resumed run
repeats the uninterrupted one (tested).

Multi-host (`experiments/train.py --multihost`, one process per host, all running this same loop on the same prompt
stream): each process samples and scores only its own whole groups of a round, then the round's rows are gathered
so that every process takes the same reward, filter, refill and padding decisions and logs the same metrics
(`train/rollout.py`). Every process then holds the same host batch, and the log-prob passes and the update read only
their own devices' slices of it: rows cross processes anyway (dynamic sampling keeps groups from whichever process
sampled them, mini-batches shuffle whole groups over the whole batch), and one gather of a round's rows is small
next to the model. Checkpoints are saved by every process with its global arrays (orbax writes each shard and the
meta once); metrics, the config and the Hugging Face export are written by process 0 after a gather of the policy;
a preemption signal or the time budget stops all processes at the same iteration (`train/multihost.py`; tested
with two CPU processes against one).
"""
from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np
import optax
from flax import nnx

from jaxrl_reason.methods import registry as methods
from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.train import console
from jaxrl_reason.train import export as export_lib
from jaxrl_reason.train import hparams
from jaxrl_reason.train import multihost
from jaxrl_reason.train import pipeline as pipeline_lib
from jaxrl_reason.train import policy as policy_lib
from jaxrl_reason.train import preflight as preflight_lib
from jaxrl_reason.train import rollout as rollout_lib
from jaxrl_reason.train import workdir as workdir_lib
from jaxrl_reason.train.build import build_task, validate_config
from jaxrl_reason.train.checkpoint import Checkpointer, catch_preemption
from jaxrl_reason.train.contracts import UpdateBatch
from jaxrl_reason.train.evaluation import evaluate
from jaxrl_reason.train.metrics import MetricsWriter, ProgressBar
from jaxrl_reason.train.optimizer import make_optimizer
from jaxrl_reason.train.parts import PolicyParts
from jaxrl_reason.train.sampler_layout import sampler_copy
from jaxrl_reason.train.state import init_train_state
from jaxrl_reason.train.step import make_train_step


def _mesh(config):
    m = config.mesh
    return sharding_lib.make_mesh(*sharding_lib.resolve_mesh_shape(m.data, m.fsdp, m.tensor, jax.device_count()))


def make_tx(config, params: dict, total_updates: int) -> optax.GradientTransformation:
    """Per-part optimizers (policy lr, critic lr) over the trainable params {"policy"[, "value"]}."""
    o = config.optim
    make = functools.partial(make_optimizer, warmup_steps=o.warmup_steps, total_steps=total_updates,
                             schedule=o.schedule, weight_decay=o.weight_decay, grad_clip=o.grad_clip, b1=o.b1,
                             b2=o.b2)
    txs = {name: make(o.value_lr if name == "value" else o.lr) for name in params}
    return optax.multi_transform(txs, {k: k for k in txs})


def _initial_state(config, mesh, params: dict, total_updates: int):
    """TrainState with per-part optimizers (policy lr, critic lr), sharded by the logical-axis rules."""
    tx = make_tx(config, params, total_updates)
    with jax.set_mesh(mesh):
        params = {k: sharding_lib.shard_state(v, mesh) for k, v in params.items()}
        state = init_train_state(params, tx, config.seed)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else replicated, state)
    return jax.device_put(state, shardings), tx, shardings


def state_shardings(state, mesh):
    """The shardings `_initial_state` gives a TrainState, from its structure alone (arrays or ShapeDtypeStructs):
    parameters and the optimizer moments (which keep the parameters' logical axes) by the rules, the rest
    replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda x: sharding_lib.param_shardings(x, mesh) if is_var(x) else replicated, state,
                        is_leaf=is_var)


def abstract_state(config, mesh, params: dict, total_updates: int):
    """(TrainState of ShapeDtypeStructs with the loop's shardings, tx, shardings) for abstract `params`: what
    `_initial_state` builds, without allocating a weight."""
    tx = make_tx(config, params, total_updates)
    shapes = jax.eval_shape(lambda p: init_train_state(p, tx, config.seed), params)
    shardings = state_shardings(shapes, mesh)
    spec = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    return spec, tx, shardings


def _batch_sharding(config, mesh):
    """Rows over ('data', 'fsdp') when every micro-batch splits evenly over them, else replicated."""
    o, r = config.optim, config.rollout
    rows = r.prompts_per_step * r.group_size // o.mini_batches
    if rows % (mesh.shape["data"] * mesh.shape["fsdp"] * o.micro_batches) == 0:
        return sharding_lib.batch_sharding(mesh, 1)  # a prefix: one sharding for every leaf of the batch
    return jax.sharding.NamedSharding(mesh, jax.P())


def update_batch_spec(config, sharding) -> UpdateBatch | None:
    """ShapeDtypeStructs of one mini-batch as `parts.split` hands it to the step (autoregressive policies; None for
    the masked-diffusion layout, whose row count depends on the sampled trajectories)."""
    if config.model.attention != "causal":
        return None
    r, o = config.rollout, config.optim
    n, resp = r.prompts_per_step * r.group_size // o.mini_batches, r.max_new_tokens
    seq = r.max_prompt_len + resp
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    f32_NxR = spec((n, resp), np.float32)
    kl = config.loss.kl_coef > 0 or config.loss.kl_in_reward_coef > 0
    gae = config.advantage.estimator == "gae"
    return UpdateBatch(
        tokens_NxL=spec((n, seq), np.int32), valid_NxL=spec((n, seq), np.bool_), response_mask_NxR=f32_NxR,
        logp_old_NxR=f32_NxR, adv_NxR=f32_NxR, logp_ref_NxR=f32_NxR if kl else None,
        returns_NxR=f32_NxR if gae else None, values_old_NxR=f32_NxR if gae else None,
        is_weight_NxR=f32_NxR if r.get("is_correction", "none") != "none" else None,
        num_tokens_N=spec((n,), np.float32), num_seqs_N=spec((n,), np.float32))


def compile_update(step, state, batch_spec, mesh):
    """Ahead-of-time lower + compile of the jitted update step for `state` (arrays or ShapeDtypeStructs) and
    `batch_spec`, under the mesh (what the compile check reports and the loop then runs)."""
    with jax.set_mesh(mesh):
        return step.lower(state, batch_spec).compile()


def _preflight(config, mesh, step, state, batch_sh, capacity: int | None):
    """Compiles the update step before the first rollout and stops the run (one sentence) when it needs more memory
    per device than `capacity` (None: the backend does not say, no check). Returns `update(state, mini_batch)`, which
    runs the compiled program on batches of the foreseen layout and the jitted step on any other."""
    spec = update_batch_spec(config, batch_sh)
    compiled = None
    if spec is not None:
        compiled = compile_update(step, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                    sharding=x.sharding), state),
                                  spec, mesh)
        if capacity is not None:
            preflight_lib.check_fits(preflight_lib.memory_report(compiled), capacity)
    layout = None if spec is None else jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), spec)

    def update(state, mb):
        batch = multihost.global_from_host(mb, batch_sh)
        if compiled is not None and jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), batch) == layout:
            return compiled(state, batch)
        with jax.set_mesh(mesh):  # traced under the mesh like the compiled program: same activation constraints
            return step(state, batch)

    return update


def _update(config, update, state, mini_batches: list[dict], it: int, skips: int):
    """ppo_epochs x mini-batches of the jitted step; stops the run after too many non-finite updates."""
    step_metrics = {}
    for _ in range(config.optim.ppo_epochs):
        for mb in mini_batches:
            state, step_metrics = update(state, mb)
            step_metrics = multihost.to_host(step_metrics)
            skips = skips + 1 if step_metrics["skipped"] else 0
            if skips >= config.train.max_consecutive_skips:
                raise FloatingPointError(
                    f"{skips} consecutive updates had a non-finite loss or gradient (last at RL iteration {it}); "
                    f"stopping without writing a checkpoint of the poisoned state.")
    return state, {f"train/{k}": float(v) for k, v in step_metrics.items()}, skips


def _fmt(m: dict) -> str:
    keys = [k for k in ("pass@1", "greedy_acc", "maj@4", "length_mean", "recheck_per_response") if k in m]
    return "  ".join(f"{k}={m[k]:.3f}" for k in keys)


def run(config, workdir: str) -> dict:
    """Runs RL as configured; returns the final metrics (eval before/after and the last step's).

    SIGTERM is handled from start-up on: before or during the first evaluation the run exits cleanly (saving the
    evaluation), during training it saves the iteration and exits; a restart resumes (`{"preempted": True}`).
    The trained parameters are in the run's last checkpoint (train/restore.py reads them back).
    """
    validate_config(config)
    multihost.check_config(config)
    with workdir_lib.claim(config, workdir), catch_preemption() as preempt:
        return _run(config, workdir, multihost.AgreedFlag(preempt) if multihost.active() else preempt)


def _run(config, workdir: str, preempt) -> dict:
    os.makedirs(workdir, exist_ok=True)
    mesh = _mesh(config)
    task = build_task(config)
    policy, mcfg, params, parts = policy_lib.build_parts(config, task, mesh)
    console.startup_summary(config, task, params, mesh)
    o = config.optim
    state, tx, state_sh = _initial_state(config, mesh, params, config.train.num_steps * o.ppo_epochs * o.mini_batches)
    batch_sh = _batch_sharding(config, mesh)
    step = make_train_step(parts.loss_fn, tx, num_micro_batches=o.micro_batches, state_shardings=state_sh,
                           batch_shardings=batch_sh)
    update = _preflight(config, mesh, step, state, batch_sh, preflight_lib.device_capacity(mesh.local_devices[0]))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.keep_checkpoints)
    meta = {"iteration": 0, "stream_position": 0, "method_state": {}, "eval_before": None}
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                                state, state_sh))
        meta = methods.upgrade_meta(meta)
        print(f"resumed from {ckpt.directory} at iteration {meta['iteration']}", flush=True)
    evaluate_fn = functools.partial(
        evaluate, examples=task.heldout, tokenizer=task.tokenizer, scorer=task.scorer,
        sample_fn=multihost.replicated_sampler(parts.eval_gen),
        greedy_fn=multihost.replicated_sampler(parts.greedy_gen) if config.eval.greedy else None,
        samples=config.eval.samples, batch_rows=config.eval.batch_size, max_prompt_len=config.rollout.max_prompt_len,
        count_fn=task.count_fn)
    # evaluation samples in the sampler's layout too (the compute-dtype copy in the training layout by default)
    eval_fn = lambda params, key: evaluate_fn(sampler_copy(config, params), key=key)  # noqa: E731
    # Lines after the restored iteration are written again; with no evaluation restored, step 0 is too (-1: drop all).
    writer = MetricsWriter(workdir, truncate_after=meta["iteration"] if meta["eval_before"] is not None else -1)
    if meta["eval_before"] is None and not preempt.requested:
        meta["eval_before"] = eval_fn(state.params["policy"], key=jax.random.PRNGKey(config.seed + 1))
        writer.write(0, {f"eval/{k}": v for k, v in meta["eval_before"].items()})
        print("held-out before RL: " + _fmt(meta["eval_before"]), flush=True)
        if preempt.requested:  # keep the evaluation: a restart goes straight to training
            ckpt.save(meta["iteration"], state, meta, force=True)
    if preempt.requested:
        ckpt.close()
        writer.close()
        print(f"preempted before iteration {meta['iteration'] + 1}: exiting cleanly", flush=True)
        return {"preempted": True}
    pipe, meta = _rollouts(config, parts, task, meta, ckpt)
    try:
        state, meta, last = _train(config, parts, update, state, meta, pipe, ckpt, writer, preempt, eval_fn)
    finally:
        pipe.close()  # after an error mid-iteration the background rollout finishes before the run unwinds
    if last.get("preempted"):
        writer.close()
        return last
    after = eval_fn(state.params["policy"], key=jax.random.PRNGKey(config.seed + 2))
    writer.write(meta["iteration"] + 1, {f"eval/{k}": v for k, v in after.items()})
    writer.close()
    print("held-out before RL: " + _fmt(meta["eval_before"]), flush=True)
    print("held-out after RL:  " + _fmt(after), flush=True)
    if config.train.export_hf:
        nnx.update(policy, multihost.to_host(state.params["policy"]))  # every process takes part in the gather
        if jax.process_index() == 0:
            export_lib.export_policy(config, policy, mcfg, task.tokenizer, os.path.join(workdir, "hf_export"))
    return {"eval_before": meta["eval_before"], "eval_after": after, "iterations": meta["iteration"], **last}


def _rollouts(config, parts: PolicyParts, task, meta: dict, ckpt) -> tuple[pipeline_lib.RolloutPipeline, dict]:
    """The pipeline that hands each iteration its rollout (the pending one of a restored checkpoint first) and
    `meta` without the pending rollout's file name."""
    reward_hp, filter_hp = hparams.reward_hp(config), hparams.filter_hp(config)
    r = config.rollout
    spec = rollout_lib.RolloutSpec(parts.train_gen, task.tokenizer, task.scorer, r.prompts_per_step, r.group_size,
                                   r.max_prompt_len, r.max_new_tokens, r.sample_batch_rows,
                                   baseline_gen=parts.greedy_gen if r.get("greedy_baseline", False) else None)
    stream = rollout_lib.PromptStream(task.train, config.seed, meta["stream_position"])
    base_key = jax.random.PRNGKey(config.seed)

    def collect(params, it: int, sampler_args: tuple):
        rows, metrics, _ = rollout_lib.collect_batch(
            spec, params, stream, jax.random.fold_in(base_key, it), train_groups=r.prompts_per_step,
            reward_hp=reward_hp, filter_hp=filter_hp, sampler_args=sampler_args)
        return rows, metrics

    pipe = pipeline_lib.RolloutPipeline(config, collect, stream, ckpt.directory.parent / pipeline_lib.PENDING_DIR)
    return pipe, pipe.restore(meta)


def _train(config, parts: PolicyParts, update, state, meta: dict, pipe, ckpt, writer, preempt, eval_fn):
    """The RL iterations from `meta["iteration"]` to `config.train.num_steps` (or the time budget); `pipe` hands
    each its rollout (with `rollout.staleness` 1 sampled during the previous update)."""
    bar, log = ProgressBar(config.train.num_steps, desc=config.algorithm), console.IterationLog(config)
    start, skips, last = time.time(), 0, {}
    for it in range(meta["iteration"], config.train.num_steps):
        rows, metrics, rollout_times = pipe.take(it, state.params["policy"],
                                                 methods.sampler_args(config, meta["method_state"]))
        t1 = time.time()
        batch, batch_metrics, entropy = parts.build_batch(rows, state.params)
        meta["method_state"] = methods.next_state(config, entropy, np.asarray(rows.response_mask_NxR, np.float32))
        t2 = time.time()
        pipe.prefetch(it + 1, state.params["policy"], methods.sampler_args(config, meta["method_state"]),
                      config.train.num_steps)
        mbs = parts.split(batch, np.random.default_rng([config.seed, it]))
        state, step_metrics, skips = _update(config, update, state, mbs, it, skips)
        last = {**metrics, **batch_metrics, **step_metrics, **rollout_times,
                "time/logps_adv_s": t2 - t1, "time/update_s": time.time() - t2}
        ckpt.wait()  # the previous save is on disk before iteration it+1 counts as done: a kill loses <= 1 interval
        writer.write(it + 1, last)
        log.iteration(it + 1, last)
        _periodic_eval(config, eval_fn, state, it + 1, writer)
        bar.update(it + 1, reward=metrics["reward/accuracy"], length=metrics["response/length_mean"])
        meta.update(iteration=it + 1, stream_position=pipe.position)
        out_of_time = multihost.any_process(config.train.time_budget_s > 0 and
                                            time.time() - start > config.train.time_budget_s)
        if (it + 1) % config.train.checkpoint_every == 0 or preempt.requested or out_of_time:
            ckpt.save(it + 1, state, pipe.checkpoint_meta(it + 1, meta, ckpt.all_steps), force=True)
        if preempt.requested:
            print(f"preempted: saved iteration {it + 1}, exiting cleanly", flush=True)
            last = {"preempted": True, **last}
            break
        if out_of_time:
            print(f"time budget of {config.train.time_budget_s:.0f}s reached after {it + 1} iterations", flush=True)
            break
    bar.close()
    ckpt.save(meta["iteration"], state, meta, force=True)
    ckpt.close()
    return state, meta, last


def _periodic_eval(config, eval_fn, state, iteration: int, writer) -> None:
    """Held-out evaluation every `train.eval_every` iterations (not at the last one: `run` evaluates after RL).

    Its key depends only on the seed and the iteration, so a resumed run logs the same numbers.
    """
    every = config.train.eval_every
    if every <= 0 or iteration % every or iteration >= config.train.num_steps:
        return
    m = eval_fn(state.params["policy"], key=jax.random.fold_in(jax.random.PRNGKey(config.seed + 3), iteration))
    writer.write(iteration, {f"eval/{k}": v for k, v in m.items()})
    print(f"held-out at iteration {iteration}: " + _fmt(m), flush=True)
