"""DLER update-selective merging of two Hugging Face checkpoints with the same architecture.

  python experiments/merge.py --base=checkpoints/arith_tiny_sft --tuned=runs/dler_tiny/hf_export \
      --out=runs/dler_tiny/merged --top_frac=0.25 --scale=0.7 --granularity=tensor [--include_regex=layers/]

θ_merge = θ_base + scale · (top-`top_frac` mask of |θ_tuned − θ_base|) ⊙ (θ_tuned − θ_base), computed by
`train/merge.update_selective_merge` (float32 arithmetic, cast back to the base checkpoint's dtype).
[INFERRED] switches of that function are flags here: `--granularity` (tensor | global), `--include_regex`
(re.search on our parameter paths such as `layers/3/attn/q_proj`, `embed`, `lm_head`, `final_norm`; empty =
every parameter) and `--excluded` (what excluded parameters take: base | tuned).

The output is written with `models/hf.save_hf` in the base checkpoint's architecture, keeping the base
config.json's extra keys (token ids, ...); the tokenizer files (and generation_config.json) are copied from the
tuned directory, or from the base one when the tuned one has none.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

from absl import flags

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")
_STRUCTURAL = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim_", "qkv_bias", "qk_norm", "tie_embeddings", "rope_theta")


def pure_params(model) -> dict:
    """The model's parameters as a nested dict of arrays (`nnx.to_pure_dict` of its `nnx.Param` state)."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def copy_tokenizer_files(src_dirs: list[str], out_dir: str) -> list[str]:
    """Copies `TOKENIZER_FILES` from the first directory of `src_dirs` that has any; returns the copied names."""
    for src in src_dirs:
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
        if names:
            for n in names:
                shutil.copyfile(os.path.join(src, n), os.path.join(out_dir, n))
            return names
    return []


def merge_checkpoints(base_dir: str, tuned_dir: str, out_dir: str, *, top_frac: float = 0.25, scale: float = 0.7,
                      granularity: str = "tensor", include_regex: str = "", excluded: str = "base") -> dict:
    """Merges `tuned_dir` into `base_dir` (DLER's update-selective merge), writes an HF checkpoint to `out_dir`;
    returns stats: number of parameters, how many differ from the base after the merge, and the tokenizer files
    copied."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxrl_reason.models.hf import config_to_hf, load_hf, save_hf
    from jaxrl_reason.train.merge import update_selective_merge

    if os.path.abspath(out_dir) in (os.path.abspath(base_dir), os.path.abspath(tuned_dir)):
        raise ValueError("--out must differ from --base and --tuned.")
    base, base_cfg = load_hf(base_dir)
    tuned, tuned_cfg = load_hf(tuned_dir)
    diff = [k for k in _STRUCTURAL if getattr(base_cfg, k) != getattr(tuned_cfg, k)]
    if diff:
        raise ValueError(f"base and tuned checkpoints differ in {', '.join(diff)}, so they cannot be merged.")
    include = re.compile(include_regex).search if include_regex else None
    base_params = pure_params(base)
    merged = update_selective_merge(base_params, pure_params(tuned), top_frac=top_frac, scale=scale,
                                    granularity=granularity, include=include, excluded=excluded)
    state = nnx.state(base, nnx.Param)
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(base, state)
    with open(os.path.join(base_dir, "config.json")) as f:
        base_json = json.load(f)
    arch = (base_json.get("architectures") or [None])[0]
    written = config_to_hf(base_cfg, arch) if arch else {}
    extra = {k: v for k, v in base_json.items() if k not in written}
    save_hf(base, base_cfg, out_dir, architecture=arch, extra_config=extra)
    changed = sum(int(np.sum(np.asarray(a) != np.asarray(b)))
                  for a, b in zip(jax.tree.leaves(base_params), jax.tree.leaves(merged)))
    numel = sum(int(np.size(a)) for a in jax.tree.leaves(base_params))
    return {"numel": numel, "changed": changed, "changed_frac": changed / max(numel, 1),
            "tokenizer_files": copy_tokenizer_files([tuned_dir, base_dir], out_dir)}


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """A fresh FlagValues parsed from `argv` (argv[0] is the program name)."""
    fv = flags.FlagValues()
    for name, what in (("base", "Base HF checkpoint directory."), ("tuned", "Tuned HF checkpoint directory."),
                       ("out", "Output HF checkpoint directory.")):
        flags.DEFINE_string(name, None, what, flag_values=fv)
    flags.DEFINE_float("top_frac", 0.25, "Fraction of the largest |update| entries kept (DLER: 0.25).", flag_values=fv)
    flags.DEFINE_float("scale", 0.7, "Scale of the kept update (DLER: 0.7).", flag_values=fv)
    flags.DEFINE_enum("granularity", "tensor", ["tensor", "global"], "Top-k per tensor or over all.", flag_values=fv)
    flags.DEFINE_string("include_regex", "", "Only parameters whose path matches take part ('' = all).",
                        flag_values=fv)
    flags.DEFINE_enum("excluded", "base", ["base", "tuned"], "Value of excluded parameters.", flag_values=fv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(fv.get_help())
        raise SystemExit(0)
    fv(list(argv))
    for name in ("base", "tuned", "out"):
        if not fv[name].value:
            raise ValueError(f"--{name} is required.")
    return fv


def main(argv: list[str]) -> dict:
    fv = parse_flags(argv)
    stats = merge_checkpoints(fv.base, fv.tuned, fv.out, top_frac=fv.top_frac, scale=fv.scale,
                              granularity=fv.granularity, include_regex=fv.include_regex, excluded=fv.excluded)
    print(f"merged {fv.tuned} into {fv.base} -> {fv.out}: {stats['changed']}/{stats['numel']} parameters moved "
          f"({stats['changed_frac']:.3f}); tokenizer files: {', '.join(stats['tokenizer_files']) or 'none'}",
          flush=True)
    return stats


if __name__ == "__main__":
    main(sys.argv)
