"""Any saved RL checkpoint -> a Hugging Face directory (weights, tokenizer, token ids, generation_config.json).

  python experiments/export.py --workdir=runs/grpo_tiny [--step=40] [--out=runs/grpo_tiny/hf_step40]

The run's own config (`<workdir>/config.json`, saved at start-up) rebuilds the model; `--step` defaults to the
newest intact checkpoint, `--out` to `<workdir>/hf_step<step>`. The result loads with
`transformers.AutoModelForCausalLM.from_pretrained` and serves as `experiments/evaluate.py --checkpoint`.
"""
import os

from absl import flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with checkpoints/ and config.json.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest intact one.")
_OUT = flags.DEFINE_string("out", None, "Output directory; default <workdir>/hf_step<step>.")


def export(workdir: str, step: int | None = None, out: str | None = None) -> str:
    from jaxrl_reason.train import export as export_lib
    from jaxrl_reason.train import restore as restore_lib

    if not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir!r} is not a directory.")
    config, policy, mcfg, tok, step = restore_lib.restore_policy(workdir, step)
    out = out or os.path.join(workdir, f"hf_step{step}")
    export_lib.export_policy(config, policy, mcfg, tok, out)
    print(f"exported step {step} of {workdir} to {out}", flush=True)
    return out


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    export(_WORKDIR.value, _STEP.value, _OUT.value)


if __name__ == "__main__":
    from experiments._cli import run_app

    flags.mark_flag_as_required("workdir")
    run_app(main)
