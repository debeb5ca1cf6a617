"""The rollout part of `experiments/compile_check.py`: the loop's sampler compiled for one sub-batch of rows.

The sampler is the loop's own (`policy.ar_parts(...).train_gen`, built by `sampling.autoregressive.make_generate_fn`
with the run's group size and shared prefill), lowered through its `lower` for abstract compute-dtype weights that
keep the training shardings (the loop's `sampler_copy` in the default train layout), prompts of max_prompt_len tokens
and a key. Its rows are sharded over ('data', 'fsdp') when they divide evenly, as in the loop.

Importing this module does not import jax.
"""
from __future__ import annotations

from experiments import _compile_targets as ct


def kv_cache_bytes(cfg, rows: int, seq: float, devices: int, itemsize: int = 2) -> float:
    """Bytes per device of the decode KV cache: layers x (K and V) x rows x kv_heads x head_dim x seq slots x
    itemsize, rows spread over `devices` (`slots_per_row` gives seq)."""
    return cfg.num_layers * 2 * rows * cfg.num_kv_heads * cfg.head_dim_ * seq * itemsize / devices


def slots_per_row(prompt_len: int, new_tokens: int, group_size: int, share_prefix: bool) -> float:
    """KV-cache slots per row: P + R, or R + P / G when the shared-prefix decode keeps the prompt once per group."""
    return new_tokens + (prompt_len / group_size if share_prefix else prompt_len)


def candidates(total_rows: int, group_size: int, row_shards: int, whole_groups: bool = False) -> list[int]:
    """Sub-batch sizes the loop accepts and the sampler shards: multiples of the group size (and of the
    ('data', 'fsdp') row shards; with `whole_groups`, whole groups on every shard, as the shared-prefix decode
    needs) that divide the round's rows, largest first."""
    step = group_size * row_shards // (1 if whole_groups else _gcd(group_size, row_shards))
    return [n for n in range(total_rows, 0, -1) if n % step == 0 and total_rows % n == 0]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def start_index(cands: list[int], per_row_bytes: float, budget_bytes: float) -> int:
    """Index in `cands` (largest first) of the largest candidate whose estimated cache fits the budget (the last
    candidate when none does)."""
    return next((i for i, n in enumerate(cands) if n * per_row_bytes <= budget_bytes), len(cands) - 1)


def lower_rollout(parts, policy_params, shardings, rows: int, prompt_len: int, compute_dtype):
    """The loop's sampler lowered for `rows` prompts with abstract `compute_dtype` weights (training shardings)."""
    import jax
    import jax.numpy as jnp

    gen = parts.train_gen
    if not hasattr(gen, "lower"):
        raise ValueError("the rollout compile check covers the plain sampler: set rollout.compact_rows=False.")

    def weight(x, sh):
        dtype = compute_dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=sh)

    params = jax.tree.map(weight, policy_params, shardings)
    tokens = jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32)
    mask = jax.ShapeDtypeStruct((rows, prompt_len), jnp.bool_)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return gen.lower(params, tokens, mask, key)


def search(compile_rows, cands: list[int], start: int, tries: int):
    """Walks the candidates from `start`: up (larger) while they fit, down while they do not, at most `tries`
    compiles. `compile_rows(n) -> bool` (fits). Returns {rows: fits} of what was compiled and the largest fit."""
    seen: dict[int, bool] = {}
    i = start
    while 0 <= i < len(cands) and len(seen) < tries and cands[i] not in seen:
        seen[cands[i]] = compile_rows(cands[i])
        if seen[cands[i]]:
            if i == 0 or seen.get(cands[i - 1]) is False:
                break
            i -= 1
        else:
            if i + 1 < len(cands) and seen.get(cands[i + 1]) is True:
                break
            i += 1
    fits = [n for n, ok in seen.items() if ok]
    return seen, (max(fits) if fits else None)


def report(name, compiled, seconds, refusal, *, args, resident, kv_bytes, top) -> float | None:
    """Prints one rollout compile's per-device memory beside the KV-cache estimate; returns the need in bytes."""
    print(f"\n### {name} (compiled in {seconds:.1f} s)")
    print(f"  KV cache estimate {ct.gib(kv_bytes)} GiB per device (layers x 2 x rows x kv_heads x head_dim x (P + R, "
          "or R + P / G with share_prefix) x 2 bytes / row shards)")
    need = ct.print_memory(compiled, refusal, args=args, resident=resident, per_temp=(kv_bytes, "the KV cache estimate"))
    if compiled is not None:
        ct.print_largest_buffers(compiled.as_text(), top)
    return need
