"""Hugging Face export that serves: weights, tokenizer, special-token ids and `generation_config.json`.

`export_policy(config, policy, mcfg, tokenizer, out_dir)` writes what `AutoModelForCausalLM.from_pretrained` and
`generate` need to stop where the policy stops: `config.json` gets `bos_token_id` / `eos_token_id` /
`pad_token_id` (from the source checkpoint's config.json when it has them, else from the tokenizer), and
`generation_config.json` is the source checkpoint's (e.g. Qwen's list of end-of-turn ids and its sampling
defaults) with missing ids filled from the tokenizer. The source is `model.init=hf:<dir>` or `model.sft_dir`.

Rebuilding the policy of a saved checkpoint is `train/restore.py` (it needs the loop, which imports this module).
"""
from __future__ import annotations

import json
import os

from jaxrl_reason.models.hf import save_hf

ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def source_dir(config) -> str:
    init = config.model.init
    return init[3:] if init.startswith("hf:") else (config.model.sft_dir if init == "sft" else "")


def _read(path: str) -> dict:
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def token_ids(tokenizer, source: str = "") -> dict:
    """{bos,eos,pad}_token_id for config.json: the source config's, else the tokenizer's (None dropped)."""
    src = _read(os.path.join(source, "config.json")) if source else {}
    ids = {k: src.get(k) if src.get(k) is not None else getattr(tokenizer, k, None) for k in ID_KEYS}
    return {k: v for k, v in ids.items() if v is not None}


def stop_ids(tokenizer, hf_dir: str = "") -> tuple[int, ...]:
    """The tokenizer's EOS followed by the other `eos_token_id`s of `hf_dir/generation_config.json` (e.g. a chat
    model's end-of-turn and end-of-text ids), without repeats."""
    gen = _read(os.path.join(hf_dir, "generation_config.json")) if hf_dir else {}
    extra = gen.get("eos_token_id")
    extra = extra if isinstance(extra, list) else ([] if extra is None else [extra])
    out = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    return tuple(dict.fromkeys(out + [int(i) for i in extra]))


def write_generation_files(out_dir: str, tokenizer, source: str = "") -> dict:
    """Adds the token ids to `out_dir/config.json` and writes `generation_config.json`; returns the latter."""
    ids = token_ids(tokenizer, source)
    cfg_path = os.path.join(out_dir, "config.json")
    cfg = _read(cfg_path)
    cfg.update(ids)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
    gen = _read(os.path.join(source, "generation_config.json")) if source else {}
    for k, v in ids.items():
        gen.setdefault(k, v)
    gen.setdefault("_from_model_config", False)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    return gen


def export_policy(config, policy, mcfg, tokenizer, out_dir: str) -> None:
    save_hf(policy, mcfg, out_dir)
    tokenizer.save_pretrained(out_dir)
    write_generation_files(out_dir, tokenizer, source_dir(config))
