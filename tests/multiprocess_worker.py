"""One process of the multi-process training-equivalence test (`tests/test_multiprocess.py`).

Launched as a script, never imported by pytest. Every process builds the same tiny Transformer (same seed) and the
same deterministic synthetic RL batches (numpy, seeded per step), places them on a global
(data, fsdp, tensor) mesh, runs `steps` jitted updates of the real `rl_loss` through `make_train_step`, gathers the
final parameters to every host and saves them (with the initial parameters under `init/` and the per-step metrics
under `metric/`) to `--out` as `.npz`. Parameters are placed with `models/sharding.shard_state` and the state like
`train/loop.py` does; with every process holding the same host values, that `device_put` works across processes.

    python tests/multiprocess_worker.py --out=/tmp/p0.npz --num_processes=2 --process_id=0 \
        --coordinator=127.0.0.1:PORT --local_devices=2 --mesh=2,2,1

With `--num_processes=1` no `jax.distributed` runtime is started: that is the single-process reference with the
same total number of devices and the same mesh. `--unsharded` runs the same updates on one device without any
sharding (an independent reference for the sharded step).

Exit codes: 0 ok; 77 = this platform cannot run CPU multi-process collectives (the reason is printed on the last
line of stderr, prefixed by `PLATFORM:`); anything else is a failure of the code under test.
"""
from __future__ import annotations

import argparse
import os
import sys

PLATFORM_EXIT = 77


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Output .npz path (final params + per-step metrics).")
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--coordinator", default="", help="127.0.0.1:PORT of process 0 (multi-process only).")
    p.add_argument("--local_devices", type=int, default=4, help="Fake CPU devices in this process.")
    p.add_argument("--mesh", default="2,2,1", help="data,fsdp,tensor over ALL devices of all processes.")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro_batches", type=int, default=2)
    p.add_argument("--unsharded", action="store_true",
                   help="Run on the first device with no shardings at all (--mesh is ignored).")
    p.add_argument("--init_timeout_s", type=int, default=60)
    args = p.parse_args(argv)
    if args.num_processes > 1 and not args.coordinator.startswith("127.0.0.1:"):
        p.error("multi-process runs need --coordinator=127.0.0.1:PORT (loopback only).")
    return args


# The environment must be set before jax is imported, so jax is imported inside the functions below.
def setup_jax(args):
    """Sets the fake device count, starts `jax.distributed` (loopback only) and checks a cross-process psum."""
    # LLVM optimization level 0 only shortens the CPU compile (the same flags in every run compared).
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.local_devices} "
                               "--xla_backend_optimization_level=0")
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    if args.num_processes == 1:
        return jax
    # jax 0.10.2 defaults `jax_cpu_collectives_implementation` to "gloo" (TCP); set it explicitly so an older or
    # newer default (None = no cross-process CPU collectives) cannot change what this test measures.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port = args.coordinator.rsplit(":", 1)[1]
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, coordinator_bind_address=f"127.0.0.1:{port}",
                                   initialization_timeout=args.init_timeout_s, heartbeat_timeout_seconds=20,
                                   shutdown_timeout_seconds=20)
        # The smallest cross-process collective: sum of one number per device over all processes.
        mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
        ones = jax.make_array_from_callback((jax.device_count(),), jax.sharding.NamedSharding(mesh, jax.P("d")),
                                            lambda idx: np.ones(jax.device_count(), np.float32)[idx])
        total = jax.jit(lambda x: x.sum(), out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(ones)
        total = float(np.asarray(total.addressable_data(0)))
    except Exception as e:  # noqa: BLE001 - any failure here is the platform's, reported as such
        print(f"PLATFORM: CPU multi-process collectives failed: {type(e).__name__}: {e}".replace("\n", " "),
              file=sys.stderr, flush=True)
        sys.exit(PLATFORM_EXIT)
    if total != jax.device_count():
        raise RuntimeError(f"cross-process psum gave {total}, expected {jax.device_count()}.")
    return jax


def model_config():
    """1-layer GQA decoder. No qkv bias: the gradient of the key bias is zero in exact arithmetic (softmax is
    shift-invariant), so Adam would turn its rounding noise into full-size updates that differ between runs."""
    from jaxrl_reason.models.transformer import TransformerConfig

    return TransformerConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                             num_kv_heads=2, head_dim=8)


def synthetic_batch(step: int, rows: int = 16, prompt_len: int = 4, resp_len: int = 6, vocab: int = 32) -> dict:
    """Deterministic RL batch of step `step` (host numpy), in the layout of `train/objectives.py`.

    Prompts are left-padded (1..P real tokens), responses right-padded (1..R real tokens); advantages are
    GRPO-like per-row constants; `logp_old` / `logp_ref` are near-uniform with noise so the clip and KL are active.
    """
    import numpy as np

    from jaxrl_reason.train.contracts import UpdateBatch

    rng = np.random.default_rng([1234, step])
    n_prompt = rng.integers(1, prompt_len + 1, rows)
    n_resp = rng.integers(1, resp_len + 1, rows)
    prompt_valid = np.arange(prompt_len)[None, :] >= (prompt_len - n_prompt)[:, None]
    resp_mask = np.arange(resp_len)[None, :] < n_resp[:, None]
    valid = np.concatenate([prompt_valid, resp_mask], axis=1)
    tokens = np.where(valid, rng.integers(1, vocab, (rows, prompt_len + resp_len)), 0).astype(np.int32)
    base = -np.log(vocab)
    adv = np.repeat(rng.normal(size=(rows, 1)), resp_len, axis=1) * resp_mask
    return UpdateBatch(
        tokens_NxL=tokens,
        valid_NxL=valid,
        response_mask_NxR=resp_mask.astype(np.float32),
        logp_old_NxR=(base + 0.3 * rng.normal(size=(rows, resp_len))).astype(np.float32),
        logp_ref_NxR=(base + 0.3 * rng.normal(size=(rows, resp_len))).astype(np.float32),
        adv_NxR=adv.astype(np.float32),
        num_tokens_N=np.full((rows,), max(resp_mask.sum(), 1), np.float32),
        num_seqs_N=np.full((rows,), rows, np.float32),
    )


def global_batch(jax, batch, sharding):
    """Host batch -> global arrays: each process hands over only the rows its devices hold.

    `make_array_from_process_local_data` is what a real multi-host loader does (every host loads its slice of the
    prompts); the local slice is read off the sharding, so this works for any mesh layout whose per-process rows
    are contiguous (rows over ('data', 'fsdp') with the data axis across processes).
    """
    def place(x):
        sh = jax.sharding.NamedSharding(sharding.mesh, jax.P(sharding.spec[0], *([None] * (x.ndim - 1))))
        rows = [idx[0] for idx in sh.addressable_devices_indices_map(x.shape).values()]
        local = x[min(r.start or 0 for r in rows):max(x.shape[0] if r.stop is None else r.stop for r in rows)]
        return jax.make_array_from_process_local_data(sh, local, x.shape)

    return jax.tree.map(place, batch)


def build_state(jax, mesh, tx, unsharded: bool):
    """Initial TrainState (params {"policy": ...}) placed like `train/loop.py` places it, and its shardings."""
    from flax import nnx

    from jaxrl_reason.models import sharding as sharding_lib
    from jaxrl_reason.models.transformer import Transformer
    from jaxrl_reason.train.state import init_train_state

    graphdef, params = nnx.split(Transformer(model_config(), rngs=nnx.Rngs(0)), nnx.Param)
    if unsharded:
        return init_train_state({"policy": params}, tx, seed=0), None, graphdef
    with jax.set_mesh(mesh):
        params = {"policy": sharding_lib.shard_state(params, mesh)}
        state = init_train_state(params, tx, seed=0)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    shardings = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else replicated, state)
    return jax.device_put(state, shardings), shardings, graphdef


def host_tree(jax, tree, num_processes: int) -> dict:
    """{path: numpy array} of a (possibly multi-process sharded) pytree, gathered to this host."""
    from jax.experimental import multihost_utils
    import numpy as np

    if num_processes > 1:  # every host gets the full (global) values
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def run(args) -> None:
    jax = setup_jax(args)
    import functools

    import numpy as np
    from jax.experimental import multihost_utils

    from jaxrl_reason.models import sharding as sharding_lib
    from jaxrl_reason.train.objectives import rl_loss
    from rl_testing import loss_hp
    from jaxrl_reason.train.optimizer import make_optimizer
    from jaxrl_reason.train.step import make_train_step

    data, fsdp, tensor = (int(v) for v in args.mesh.split(","))
    mesh = None if args.unsharded else sharding_lib.make_mesh(data, fsdp, tensor)
    tx = make_optimizer(3e-3, warmup_steps=1, total_steps=args.steps, weight_decay=0.01, grad_clip=1.0)
    state, state_sh, graphdef = build_state(jax, mesh, tx, args.unsharded)
    init = host_tree(jax, state.params["policy"], args.num_processes)  # before the state is donated
    hp = loss_hp(mode="ppo", eps_low=0.2, eps_high=0.28, agg="seq-mean-token-mean", kl_coef=0.05, entropy_coef=0.01)
    loss_fn = functools.partial(rl_loss, hp=hp, policy_graphdef=graphdef)
    batch_sh = None if args.unsharded else sharding_lib.batch_sharding(mesh, 1)
    step_fn = make_train_step(loss_fn, tx, num_micro_batches=args.micro_batches, state_shardings=state_sh,
                              batch_shardings=batch_sh, donate=True)
    metrics = []
    for s in range(args.steps):
        host = synthetic_batch(s)
        batch = jax.tree.map(jax.numpy.asarray, host) if args.unsharded else \
            global_batch(jax, host, batch_sh)
        state, m = step_fn(state, batch)
        metrics.append({k: float(np.asarray(v.addressable_data(0))) for k, v in m.items()})
    flat = host_tree(jax, state.params["policy"], args.num_processes)
    flat.update({f"init/{k}": v for k, v in init.items()})
    for k in metrics[0]:
        flat[f"metric/{k}"] = np.asarray([m[k] for m in metrics], np.float64)
    flat["meta/process_count"] = np.asarray(jax.process_count())
    flat["meta/device_count"] = np.asarray(jax.device_count())
    flat["meta/step"] = np.asarray(state.step.addressable_data(0))
    np.savez(args.out, **flat)
    if args.num_processes > 1:
        multihost_utils.sync_global_devices("multiprocess_worker done")
        jax.distributed.shutdown()
    print(f"process {args.process_id}/{args.num_processes}: wrote {args.out}", flush=True)


if __name__ == "__main__":
    run(parse_args())
