"""Supervised warm start (rebuilds the shipped checkpoint bit for bit):

  python experiments/sft.py --config=configs/sft.py:tiny --out=checkpoints/arith_tiny_sft
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "SFT config file[:arg].", lock_config=True)
_OUT = flags.DEFINE_string("out", "checkpoints/arith_tiny_sft", "Output directory (HF checkpoint + tokenizer).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    from jaxrl_reason.train import build, sft
    from jaxrl_reason.train.evaluation import evaluate
    from jaxrl_reason.sampling.autoregressive import make_generate_fn
    from jaxrl_reason.sampling.processors import SamplingParams
    from flax import nnx

    c = _CONFIG.value
    tok = build.tokenizer_for(c)
    model, mcfg = build.load_policy(c, tok)
    prompts, traces = sft.arithmetic_sft_set(c.seed, c.sft.num_problems, c.task.train_levels, c.task.recheck_prob,
                                             c.task.error_prob, c.task.eval_seed, c.sft.eval_problems)
    if c.model.attention != "causal":
        return _diffusion_sft(c, tok, model, mcfg, prompts, traces)
    arrays = sft.sft_arrays(tok, prompts, traces, c.rollout.max_prompt_len, c.rollout.max_new_tokens)
    model, _ = sft.train_sft(model, tok, arrays, steps=c.sft.steps, batch_size=c.sft.batch_size, lr=c.sft.lr,
                             warmup_steps=c.sft.warmup_steps, seed=c.seed, micro_batches=c.sft.micro_batches,
                             time_budget_s=c.sft.time_budget_s, prompt_len=c.rollout.max_prompt_len)
    sft.save_sft_checkpoint(model, mcfg, tok, _OUT.value)
    c.eval.num_problems = c.sft.eval_problems
    c.model.init, c.model.sft_dir = "sft", _OUT.value
    task = build.build_task(c)
    graphdef, params = nnx.split(model, nnx.Param)
    common = dict(max_prompt_len=c.rollout.max_prompt_len, max_new_tokens=c.rollout.max_new_tokens,
                  eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    metrics = evaluate(params, task.heldout, tokenizer=tok, scorer=task.scorer,
                       sample_fn=make_generate_fn(graphdef, params=SamplingParams(), **common),
                       greedy_fn=make_generate_fn(graphdef, params=SamplingParams(greedy=True), **common),
                       samples=c.eval.samples, batch_rows=c.eval.batch_size, max_prompt_len=c.rollout.max_prompt_len,
                       key=jax.random.PRNGKey(c.seed + 1), count_fn=task.count_fn)
    print("held-out after SFT: " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)


def _diffusion_sft(c, tok, model, mcfg, prompts, traces):
    """Masked-diffusion SFT (configs/sft_diffusion.py), then held-out accuracy with the diffusion sampler."""
    import jax
    from flax import nnx

    from jaxrl_reason.train import build, diffusion_sft, sft, tracerl
    from jaxrl_reason.train.evaluation import evaluate

    arrays = diffusion_sft.diffusion_sft_arrays(tok, prompts, traces, c.rollout.max_prompt_len,
                                                c.rollout.max_new_tokens, pad_to_eos=c.diffusion.pad_to_eos)
    model, _ = diffusion_sft.train_diffusion_sft(
        model, arrays, spec=diffusion_sft.sft_spec(c, tok.mask_token_id), steps=c.sft.steps,
        batch_size=c.sft.batch_size, lr=c.sft.lr, warmup_steps=c.sft.warmup_steps, seed=c.seed,
        micro_batches=c.sft.micro_batches, time_budget_s=c.sft.time_budget_s)
    sft.save_sft_checkpoint(model, mcfg, tok, _OUT.value)
    c.eval.num_problems = c.sft.eval_problems
    c.model.init, c.model.sft_dir = "sft", _OUT.value
    task = build.build_task(c)
    graphdef, params = nnx.split(model, nnx.Param)
    _, sample_fn, greedy_fn = tracerl.make_samplers(c, graphdef, tok)
    metrics = evaluate(params, task.heldout, tokenizer=tok, scorer=task.scorer, sample_fn=sample_fn,
                       greedy_fn=greedy_fn, samples=c.eval.samples, batch_rows=c.eval.batch_size,
                       max_prompt_len=c.rollout.max_prompt_len, key=jax.random.PRNGKey(c.seed + 1),
                       count_fn=task.count_fn)
    print("held-out after SFT: " + "  ".join(f"{k}={v:.3f}" for k, v in metrics.items()), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
