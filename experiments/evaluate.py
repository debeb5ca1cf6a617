"""Held-out evaluation of a checkpoint (an HF directory, or a run's workdir) on a data file or a config's held-out set.

  python experiments/evaluate.py --config=configs/grpo.py:tiny --checkpoint=runs/grpo_tiny/hf_export \
      [--samples=4] [--seed=0] [--out=metrics.json] [--config.eval.num_problems=500]
  python experiments/evaluate.py --config=configs/grpo.py:tiny --checkpoint=/models/Qwen2.5-0.5B-Instruct \
      --data=test.parquet --samples=8 --config.rollout.max_prompt_len=512 --config.rollout.max_new_tokens=1024
  python experiments/evaluate.py --config=configs/grpo.py:tiny --checkpoint=runs/my_run [--step=40] --data=test.jsonl

`--data` (a .jsonl / .parquet file or a saved `datasets` directory) replaces the config's task: no training file
is needed. Prompts are rendered as in training (`data/chat.py`: the checkpoint tokenizer's chat template when it
has one, `task.system_prompt`, `task.instruction`, `task.chat_template=off` for raw prompts) and scored with
`reward.fn` (default: math-verify). A run's workdir is exported first (`experiments/export.py`, newest intact
checkpoint or `--step`).

Metrics come from `train/evaluation.evaluate`: pass@1 averaged over k samples at `config.eval.temperature`,
pass@k, maj@k (majority vote over the final answers), greedy accuracy (when `config.eval.greedy`), mean length,
truncation rate, and per data source when the data mixes several (`pass@1/<data_source>`, ...). The parameters
are cast to `config.model.param_dtype`. Prints a markdown table; `--out` also writes the metrics as JSON.
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """A fresh FlagValues parsed from `argv` (argv[0] is the program name); no global flag state."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].", flag_values=fv,
                                    lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("checkpoint", None, "HF checkpoint directory (config.json, safetensors, tokenizer).",
                        flag_values=fv)
    flags.DEFINE_integer("samples", None, "Samples per problem (k); default config.eval.samples.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "PRNG seed of the evaluation samples.", flag_values=fv)
    flags.DEFINE_string("out", "", "Optional JSON file for the metrics.", flag_values=fv)
    flags.DEFINE_string("data", "", "Held-out data file (.jsonl/.parquet/saved datasets dir); replaces the task.",
                        flag_values=fv)
    flags.DEFINE_integer("step", None, "With a workdir --checkpoint: which saved step (default: newest).",
                         flag_values=fv)
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(fv.get_help())
        raise SystemExit(0)
    fv(list(argv))
    for name in ("config", "checkpoint"):
        if fv[name].value is None:
            raise ValueError(f"--{name} is required.")
    return fv


def hf_dir_of(checkpoint: str, step: int | None = None) -> str:
    """`checkpoint` itself when it is an HF directory; a run's workdir is exported (once per step) first."""
    if os.path.isfile(os.path.join(checkpoint, "config.json")) and not os.path.isdir(
            os.path.join(checkpoint, "checkpoints")):
        return checkpoint
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):
        from jaxrl_reason.train import export as export_lib
        from jaxrl_reason.train import restore as restore_lib

        config, policy, mcfg, tok, step = restore_lib.restore_policy(checkpoint, step)
        out = os.path.join(checkpoint, f"hf_step{step}")
        export_lib.export_policy(config, policy, mcfg, tok, out)
        return out
    raise ValueError(f"checkpoint {checkpoint!r} holds no config.json (an HF directory) and no checkpoints/ "
                     f"(a run's workdir).")


def evaluate_checkpoint(config, checkpoint: str, *, samples: int | None = None, seed: int = 0, data: str = "",
                        step: int | None = None) -> dict:
    """Loads `checkpoint` (policy + tokenizer) and returns `train/evaluation.evaluate`'s metrics on the held-out
    set of `config` (its task, eval.* and rollout lengths; `config` is not modified), or on `data`. The sampler
    batch has min(eval.batch_size, problems x samples) rows, so a small evaluation does not sample padding rows."""
    import jax
    from flax import nnx

    from jaxrl_reason.train import build
    from jaxrl_reason.train import policy as policy_lib
    from jaxrl_reason.train.evaluation import evaluate

    samples = config.eval.samples if samples is None else samples
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}.")
    checkpoint = hf_dir_of(checkpoint, step)
    config = config.copy_and_resolve_references()
    config.model.init = f"hf:{checkpoint}"
    if not config.task.tokenizer_dir:
        config.task.tokenizer_dir = checkpoint
    if data:
        config.task.name, config.task.train_path, config.task.eval_path = "jsonl", data, data
    build.validate_config(config)
    task = _heldout_task(config)
    policy, _ = build.load_policy(config, task.tokenizer)
    graphdef, params = nnx.split(policy, nnx.Param)
    tok, ro = task.tokenizer, config.rollout
    # stop at every end id of the checkpoint's generation_config.json, as `generate` does
    sample_fn, greedy_fn = policy_lib.eval_samplers(config, graphdef, tok, source=checkpoint)
    greedy_fn = greedy_fn if config.eval.greedy else None
    rows = max(1, min(config.eval.batch_size, len(task.heldout) * samples))
    return evaluate(params, task.heldout, tokenizer=tok, scorer=task.scorer, sample_fn=sample_fn, greedy_fn=greedy_fn,
                    samples=samples, batch_rows=rows, max_prompt_len=ro.max_prompt_len, key=jax.random.PRNGKey(seed),
                    count_fn=task.count_fn)


def _heldout_task(config):
    """The task with only its held-out set built (a data file's training split is not read)."""
    from jaxrl_reason.data import sources
    from jaxrl_reason.train import build

    if config.task.name == "arithmetic":
        return build.build_task(config)
    tok = build.tokenizer_for(config)
    return build.Task(tok, [], sources.build_split(config, tok, "eval_path"), sources.scorer_for(config))


def markdown_table(metrics: dict, title: str = "") -> str:
    """| metric | value | rows, in the order of `metrics` (floats with 4 decimals)."""
    lines = ([f"### {title}", ""] if title else []) + ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    fv = parse_flags(argv)
    config = fv.config
    metrics = evaluate_checkpoint(config, fv.checkpoint, samples=fv.samples, seed=fv.seed, data=fv.data,
                                  step=fv.step)
    n = config.eval.num_problems
    what = fv.data or f"{config.task.name} held-out"
    print(markdown_table(metrics, f"{fv.checkpoint} on {what} (up to {n} problems, "
                                  f"k={fv.samples or config.eval.samples}, T={config.eval.temperature})"), flush=True)
    if fv.out:
        os.makedirs(os.path.dirname(os.path.abspath(fv.out)), exist_ok=True)
        with open(fv.out, "w") as f:
            json.dump({"checkpoint": fv.checkpoint, "task": fv.data or config.task.name, "num_problems": n,
                       "samples": fv.samples or config.eval.samples, "seed": fv.seed, "metrics": metrics}, f, indent=2)
    return metrics


if __name__ == "__main__":
    from experiments._cli import run_plain

    run_plain(main, sys.argv)
