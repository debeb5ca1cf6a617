"""Supervised warm start (rebuilds the shipped checkpoint bit for bit):

  python experiments/sft.py --config=configs/sft.py:tiny --out=checkpoints/arith_tiny_sft

On your own chat or GSM8K-style data (prompts rendered as in RL: chat template, system prompt, instruction;
responses from `data/sft_data.py`):

  python experiments/sft.py --config=configs/sft.py:tiny --config.model.init=hf:/models/my_model \
      --config.task.name=jsonl --config.task.train_path=sft.jsonl [--config.task.eval_path=test.jsonl] --out=runs/sft
"""
import os

from absl import flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "SFT config file[:arg].", lock_config=True)
_OUT = flags.DEFINE_string("out", "checkpoints/arith_tiny_sft", "Output directory (HF checkpoint + tokenizer).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from jaxrl_reason.train import build, sft

    c = _CONFIG.value
    own = c.task.name != "arithmetic"
    if own:
        _check_own_data(c)
    tok = build.tokenizer_for(c)
    model, mcfg = build.load_policy(c, tok)
    if own:
        from jaxrl_reason.data.sft_data import sft_pairs

        prompts, traces = sft_pairs(c, tok)
    else:
        prompts, traces = sft.arithmetic_sft_set_from_config(c)
    train = _ar_sft if c.model.attention == "causal" else _diffusion_sft
    model, sample_fn, greedy_fn = train(c, tok, model, prompts, traces)
    sft.save_sft_checkpoint(model, mcfg, tok, _OUT.value)
    if own:  # token ids and generation_config.json of the source model, so the result serves as it is
        from jaxrl_reason.train import export

        export.write_generation_files(_OUT.value, tok, export.source_dir(c))
    if not own or c.task.eval_path:
        _report_heldout(c, tok, model, sample_fn, greedy_fn)


def _check_own_data(c) -> None:
    """One sentence before any work for SFT on a user's file (`task.name=jsonl`)."""
    if c.task.name not in ("jsonl", "file"):
        raise ValueError(f"SFT reads the arithmetic task or a data file (task.name=jsonl), got {c.task.name!r}.")
    if not c.task.train_path or not os.path.exists(c.task.train_path):
        raise ValueError(f"task.train_path {c.task.train_path!r} does not exist.")
    if c.task.eval_path and not os.path.exists(c.task.eval_path):
        raise ValueError(f"task.eval_path {c.task.eval_path!r} does not exist.")
    if c.sft.plateau_every:
        raise ValueError("sft.plateau_every checks arithmetic validation problems; set it to 0 for your own data.")


def _ar_sft(c, tok, model, prompts, traces):
    """Next-token SFT (configs/sft.py); returns the model and its T=1 and greedy samplers."""
    from flax import nnx

    from jaxrl_reason.sampling.autoregressive import make_generate_fn
    from jaxrl_reason.sampling.processors import SamplingParams
    from jaxrl_reason.train import sft

    arrays = sft.sft_arrays(tok, prompts, traces, c.rollout.max_prompt_len, c.rollout.max_new_tokens)
    graphdef = nnx.graphdef(model)
    common = dict(max_prompt_len=c.rollout.max_prompt_len, max_new_tokens=c.rollout.max_new_tokens,
                  eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    greedy_fn = make_generate_fn(graphdef, params=SamplingParams(greedy=True), **common)
    check = _plateau_check(c, tok, greedy_fn) if c.sft.plateau_every else None
    model, _ = sft.train_sft(model, tok, arrays, steps=c.sft.steps, batch_size=c.sft.batch_size, lr=c.sft.lr,
                             warmup_steps=c.sft.warmup_steps, seed=c.seed, micro_batches=c.sft.micro_batches,
                             time_budget_s=c.sft.time_budget_s, prompt_len=c.rollout.max_prompt_len,
                             schedule=c.sft.schedule, weight_decay=c.sft.weight_decay,
                             check_every=c.sft.plateau_every, check_fn=check)
    return model, make_generate_fn(graphdef, params=SamplingParams(), **common), greedy_fn


def _plateau_check(c, tok, greedy_fn):
    """`sft.PlateauCheck` on greedy accuracy over `sft.val_problems` validation problems.

    Validation problems come from the training distribution with their own seed (`seed + 10000`) and are
    disjoint from the held-out evaluation set (`arithmetic.split_disjoint`); small levels may repeat training
    problems by chance, as training problems repeat among themselves.
    """
    import jax

    from jaxrl_reason.data import arithmetic
    from jaxrl_reason.train import build, sft
    from jaxrl_reason.train.evaluation import evaluate

    val, _ = arithmetic.split_disjoint(c.sft.val_problems, c.sft.eval_problems, c.task.train_levels,
                                       train_seed=c.seed + 10000, heldout_seed=c.task.eval_seed)
    examples = [arithmetic.to_example(p) for p in val]

    def score(params):
        return evaluate(params, examples, tokenizer=tok, scorer=build.arithmetic_scorer, sample_fn=greedy_fn, samples=1,
                        batch_rows=c.eval.batch_size, max_prompt_len=c.rollout.max_prompt_len,
                        key=jax.random.PRNGKey(0))["pass@1"]

    return sft.PlateauCheck(score, patience=c.sft.plateau_patience, min_delta=c.sft.plateau_min_delta)


def _diffusion_sft(c, tok, model, prompts, traces):
    """Masked-diffusion SFT (configs/sft_diffusion.py); returns the model and its diffusion samplers."""
    from flax import nnx

    from jaxrl_reason.methods import tracerl
    from jaxrl_reason.train import diffusion_sft

    model, _ = diffusion_sft.diffusion_sft_from_config(c, tok, model, prompts, traces)
    _, sample_fn, greedy_fn = tracerl.make_samplers(c, nnx.graphdef(model), tok)
    return model, sample_fn, greedy_fn


def _report_heldout(c, tok, model, sample_fn, greedy_fn) -> None:
    """Prints held-out accuracy of the saved policy on `sft.eval_problems` problems."""
    import jax
    from flax import nnx

    from jaxrl_reason.train import build
    from jaxrl_reason.train.evaluation import evaluate

    c.eval.num_problems = c.sft.eval_problems
    c.model.init, c.model.sft_dir = "sft", _OUT.value
    task = build.build_task(c)
    params = nnx.state(model, nnx.Param)
    metrics = evaluate(params, task.heldout, tokenizer=tok, scorer=task.scorer, sample_fn=sample_fn,
                       greedy_fn=greedy_fn, samples=c.eval.samples, batch_rows=c.eval.batch_size,
                       max_prompt_len=c.rollout.max_prompt_len, key=jax.random.PRNGKey(c.seed + 1),
                       count_fn=task.count_fn)
    print("held-out after SFT: " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)


if __name__ == "__main__":
    from experiments._cli import run_app

    flags.mark_flag_as_required("config")
    run_app(main)
