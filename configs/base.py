"""The shared config schema of every RL experiment; method files override parts of it.

Each method file (`configs/grpo.py`, `configs/dapo.py`, ...) calls `get_base_config(arg)` and then applies its
recipe from `jaxrl_reason.algorithms.RECIPES` (the paper defaults), so every shared field a method can change is
visible here, with its meaning; a method with settings of its own (DLER, HAPO, LSPO, REPRO) adds its section
(`config.hapo`, ...) from its module in `jaxrl_reason/methods/`. `arg` picks the scale:

  tiny   ~0.8M-parameter character-level model on the arithmetic task; runs on a 2-core CPU in minutes.
  small  ~30M-parameter model, same task; a GPU or a many-core CPU.
  own    YOUR small Hugging Face model (e.g. Qwen2.5-0.5B/1.5B-Instruct) on your data, one GPU or a few CPU
         cores: `full` with moderate sizes and no arithmetic defaults (`own_model_preset`); set
         `model.init=hf:<dir>`, `task.train_path`, `task.eval_path`, and nothing else is required.
  full   the papers' scale (a local Hugging Face checkpoint, e.g. a Qwen2.5/Qwen3 model, and a JSONL/parquet data set
         in verl format): set `model.init=hf:/path/to/model` and `task.name=jsonl` with `task.train_path`,
         `task.eval_path`, and a mesh that covers your devices.
"""
from __future__ import annotations

from ml_collections import config_dict

SCALES = ("tiny", "small", "full")


def _model(scale: str) -> config_dict.ConfigDict:
    m = config_dict.ConfigDict()
    # `init`: "sft" = the SFT checkpoint at `sft_dir` (HF format, shipped for tiny), "random", or "hf:<dir>".
    # At `full` there is no default: a real run names its checkpoint (a forgotten flag must not train the toy).
    m.init = "sft" if scale != "full" else ""
    m.sft_dir = "checkpoints/arith_tiny_sft"
    m.vocab_size = 0  # 0: taken from the tokenizer / checkpoint
    m.hidden_size = {"tiny": 128, "small": 512, "full": 0}[scale]
    m.intermediate_size = {"tiny": 512, "small": 2048, "full": 0}[scale]
    m.num_layers = {"tiny": 4, "small": 8, "full": 0}[scale]
    m.num_heads = {"tiny": 4, "small": 8, "full": 0}[scale]
    m.num_kv_heads = {"tiny": 4, "small": 8, "full": 0}[scale]
    m.rope_theta = 10000.0
    m.tie_embeddings = False
    m.attention = "causal"  # causal | bidirectional | block (diffusion models)
    m.block_size = 1
    # Storage dtype of the trained (master) params and so of the optimizer state; `compute_dtype` is what the
    # forward passes, the sampler and the reference policy run in (float32 masters + bf16 compute at `full`).
    m.param_dtype = "float32"
    m.compute_dtype = "float32" if scale != "full" else "bfloat16"
    # Response log-probs come from the hidden states in chunks of `logits_chunk` tokens (0: one chunk), each
    # against the vocabulary in slices of `vocab_chunk` columns with a streaming logsumexp (0: whole vocabulary),
    # so no [rows, tokens, vocab] logits tensor exists.
    m.logits_chunk = 1024
    m.vocab_chunk = 0 if scale != "full" else 32768
    # auto: cuDNN flash attention on a CUDA GPU (bf16), Pallas splash on TPU, the einsum path otherwise and for
    # masks no kernel takes; or force one of einsum | xla | cudnn | splash (models/attention_ops.py).
    m.attention_impl = "auto"
    # Layer layout and memory: `scan_layers` runs the layers as one stacked block under lax.scan (compile time
    # flat in depth); `remat` = none | full | dots_saveable | names (what each layer's backward recomputes;
    # "names" keeps the outputs listed in `remat_names`, among q_proj k_proj v_proj o_proj gate_proj up_proj
    # down_proj).
    m.scan_layers = scale == "full"
    m.remat = "full" if scale == "full" else "none"
    m.remat_names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return m


def _task(scale: str) -> config_dict.ConfigDict:
    t = config_dict.ConfigDict()
    t.name = "arithmetic" if scale != "full" else "jsonl"  # arithmetic | reasoning_gym | jsonl (files by path)
    t.train_levels = (0, 1, 2, 3, 4, 5, 6, 7, 8)
    t.eval_levels = (0, 1, 2, 3, 4, 5, 6, 7, 8)
    t.recheck_prob = 0.9  # SFT traces with redundant re-checks
    t.error_prob = 0.0
    t.reasoning_gym_task = "chain_sum"
    t.train_path = ""
    t.eval_path = ""
    t.tokenizer_dir = ""  # "": the tokenizer stored next to the SFT checkpoint / built for the arithmetic task
    t.eval_seed = 1234
    # Own data (task.name jsonl | file | reasoning_gym; data/sources.py). Prompts: the tokenizer's chat template
    # when it has one ("auto"), always ("on") or never ("off": raw text for base models), with a system prompt
    # and an instruction appended to the last user message (e.g. "Put the final answer in \\boxed{}.").
    t.chat_template = "auto"
    t.system_prompt = ""
    t.instruction = ""
    t.prompt_key = ""  # column mapping; "": prompt | question | problem
    t.answer_key = ""  # e.g. "reward_model.ground_truth"; "": the usual answer fields
    t.on_overlong = "filter"  # prompts over rollout.max_prompt_len tokens: filter (counted) | truncate | raise
    t.on_malformed = "skip"  # malformed rows: skip (reported with their lines) | raise
    return t


def get_base_config(arg: str = "tiny") -> config_dict.ConfigDict:
    """The base config at scale `arg` (tiny | small | full) with GRPO-like defaults; method files override."""
    scale = arg or "tiny"
    if scale == "own":
        return own_model_preset(get_base_config("full"))
    if scale not in SCALES:
        raise ValueError(f"unknown config arg {arg!r}; use one of {', '.join(SCALES)} or own.")
    c = config_dict.ConfigDict()
    c.algorithm = "grpo"
    c.scale = scale
    c.seed = 0
    c.model = _model(scale)
    c.task = _task(scale)

    c.rollout = config_dict.ConfigDict()
    c.rollout.prompts_per_step = {"tiny": 16, "small": 64, "full": 512}[scale]
    c.rollout.group_size = {"tiny": 8, "small": 8, "full": 16}[scale]
    c.rollout.max_prompt_len = {"tiny": 24, "small": 24, "full": 1024}[scale]
    c.rollout.max_new_tokens = {"tiny": 160, "small": 160, "full": 4096}[scale]
    c.rollout.temperature = 1.0
    c.rollout.top_k = 0
    c.rollout.top_p = 1.0
    c.rollout.min_p = 0.0
    c.rollout.lanes = 1  # > 1: decode the batch as independent lanes run concurrently (sampling/autoregressive.py)
    c.rollout.sample_batch_rows = 0  # > 0: sample a round in sub-batches of this many rows (whole groups)
    c.rollout.share_prefill = {"tiny": False, "small": False, "full": True}[scale]  # prefill each prompt once
    # True (with share_prefill): decode with each group's prompt K/V kept and read once per group
    c.rollout.share_prefix = {"tiny": False, "small": False, "full": True}[scale]
    # True: each round also decodes one greedy response per prompt and scores it (rows' greedy_reward_N, the reward
    # baseline ReMax subtracts); one more sampler call per round
    c.rollout.greedy_baseline = False
    c.rollout.compact_rows = False  # True: drop finished rows between decode segments (sampling/compaction.py)
    # The sampler's weight layout: "train" decodes with the trainer's (FSDP: weights gathered at every decode step);
    # "decode" gives the sampler its own mesh over the same devices, (devices / decode_tensor) x decode_tensor,
    # weights split over the tensor axis by heads / MLP columns / vocabulary and whole over data, copied from the
    # trainer's device to device in the compute dtype before each rollout (train/sampler_layout.py).
    c.rollout.layout = "train"
    c.rollout.decode_tensor = 1
    # sampler / trainer log-prob contract (train/mismatch.py); every default leaves the run's numbers unchanged
    c.rollout.log_mismatch = False  # True: log rollout/mismatch_* (old log-probs vs the sampler's raw ones)
    c.rollout.is_correction = "none"  # none | token_tis | seq_tis | token_mis | seq_mis: rollout importance weights
    c.rollout.is_cap = 2.0  # upper threshold of those weights (TIS truncates at it, MIS drops what exceeds it)
    c.rollout.is_mis_lower = -1.0  # MIS lower threshold: < 0 is 1 / is_cap (verl's default), 0 keeps all low weights
    c.rollout.exact_logprobs = False  # True: sample with the trainer's forward pass (train/exact_sampler.py), no cache
    # 1: iteration k+1's rollout samples (with params_k, in a background thread) while iteration k updates, so every
    # batch after the first is one update off-policy; needs is_correction (train/pipeline.py). 0: synchronous.
    c.rollout.staleness = 0

    c.reward = config_dict.ConfigDict()
    c.reward.kind = "binary"  # binary: {0, 1}; signed: {-1, +1} (DAPO verifier)
    # Shapings applied in order after the base `kind` (the keys of core.length.REWARD_SHAPINGS): "overlong" (DAPO
    # soft overlong penalty over the last `overlong_buffer` tokens), "dler_truncation", "da_dler" (methods/dler.py)
    c.reward.shaping = ()
    c.reward.overlong_buffer = 0
    c.reward.overlong_factor = 1.0
    c.reward.verifier_workers = 0  # > 0: score in a process pool with a per-item time limit
    c.reward.verifier_timeout_s = 5.0
    # "": the task's verifier. Else weighted terms of rewards/registry.py, e.g. "0.9*math,0.1*format", or a user
    # function by import path "my_pkg.rewards:score" called as score(completion, example) -> float.
    c.reward.fn = ""

    c.filter = config_dict.ConfigDict()
    c.filter.kind = "none"  # none | zero_variance | lspo | accuracy_band (the keys of core.filters.GROUP_FILTERS)
    c.filter.max_rounds = 4  # generation rounds to fill the batch before training on what there is
    c.filter.band_low = 0.2
    c.filter.band_high = 0.8

    c.advantage = config_dict.ConfigDict()
    # grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline | gae | hapo | grpo_passk | gpg | opo | remax
    # (the keys of jaxrl_reason.core.advantages.ADVANTAGE_ESTIMATORS)
    c.advantage.estimator = "grpo"
    c.advantage.eps = 1e-6
    c.advantage.std_ddof = 1  # group std of grpo: 1 = Bessel (verl, TRL), 0 = population (TraceRL)
    c.advantage.gamma = 1.0
    c.advantage.lam = 1.0

    c.loss = config_dict.ConfigDict()
    # ppo | gspo | cispo | sapo | gmpo | clip_cov | kl_cov | gpg | dppo_tv | dppo_kl
    # (the keys of jaxrl_reason.core.policy_loss.POLICY_LOSSES)
    c.loss.mode = "ppo"
    c.loss.eps_low = 0.2
    c.loss.eps_high = 0.2
    c.loss.dual_clip_c = 0.0  # 0: off; > 1: dual clip constant (verl clip_ratio_c)
    # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm | token-sum
    c.loss.agg = "token-mean"
    c.loss.agg_const = 0.0  # seq-mean-token-sum-norm constant; 0: max_new_tokens
    c.loss.kl_coef = 0.0
    c.loss.kl_kind = "k3"
    c.loss.kl_in_reward_coef = 0.0  # > 0: k1 KL folded into the token rewards (REINFORCE++)
    c.loss.entropy_coef = 0.0
    c.loss.value_coef = 0.5
    c.loss.value_clip = 0.5
    c.loss.sapo_tau_pos = 1.0  # SAPO gate temperature for positive advantages
    c.loss.sapo_tau_neg = 1.05  # and for the others
    c.loss.clip_cov_ratio = 2e-4  # Clip-Cov: fraction of tokens whose gradient is cut
    c.loss.clip_cov_lb = 1.0  # Clip-Cov: covariance band the cut tokens are drawn from
    c.loss.clip_cov_ub = 5.0
    c.loss.kl_cov_ratio = 2e-4  # KL-Cov: fraction of tokens with the |log ratio| penalty
    c.loss.kl_cov_coef = 1.0

    c.optim = config_dict.ConfigDict()
    c.optim.lr = {"tiny": 1e-4, "small": 3e-5, "full": 1e-6}[scale]
    c.optim.value_lr = 1e-4 if scale != "full" else 1e-5
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.mini_batches = 1  # optimizer updates per rollout batch (per epoch)
    c.optim.ppo_epochs = 1
    c.optim.micro_batches = 1  # gradient accumulation inside one update
    # rows per pass of the no-grad old / reference / value log-prob forwards (0: the whole rollout batch at once)
    c.optim.logp_micro_batch_rows = 0 if scale != "full" else 256

    c.mesh = config_dict.ConfigDict()
    # -1 (data or fsdp, not both): all devices not used by the other axes. At `full` every device is an fsdp
    # shard (params, gradients and optimizer state split over all devices, weights gathered per layer).
    c.mesh.data = 1 if scale == "full" else -1
    c.mesh.fsdp = -1 if scale == "full" else 1
    c.mesh.tensor = 1

    c.train = config_dict.ConfigDict()
    c.train.num_steps = {"tiny": 60, "small": 500, "full": 500}[scale]
    c.train.time_budget_s = 0.0  # > 0: stop (checkpointed) after this many seconds of RL; 0: run num_steps
    c.train.eval_every = 0  # > 0: also evaluate every this many iterations (eval/* metrics); 0: before and after
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 2
    c.train.log_every = 1
    c.train.max_consecutive_skips = 5
    c.train.export_hf = True
    c.train.force_resume = False  # resume a workdir whose saved config has another method or model
    c.train.wandb_project = ""  # non-empty: also log the training metrics to Weights & Biases (pip install wandb)

    c.eval = config_dict.ConfigDict()
    c.eval.num_problems = 500
    c.eval.samples = 4  # pass@1 is averaged over these T=eval.temperature samples; pass@k, maj@k reported too
    c.eval.temperature = 1.0
    c.eval.greedy = True  # also report greedy accuracy
    c.eval.batch_size = 256
    return c


def shrink_for_smoke(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """Shrinks any RL or SFT config in place to smoke-test sizes (tests, `reproduce.py --smoke`).

    A random 1-layer d=32 model, 4 prompts x 4 samples, 24 new tokens, at most 2 filter rounds and 2
    mini-batches, lr 1e-3; LLaDA-style diffusion blocks shrunk to fit the 24-token budget.
    """
    c.model.init = "random"
    m = c.model
    m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 1, 2, 2
    c.rollout.max_new_tokens = 24
    c.rollout.prompts_per_step, c.rollout.group_size = 4, 4
    c.reward.overlong_buffer = min(c.reward.overlong_buffer, 4)
    c.filter.max_rounds = 2
    c.optim.lr = 1e-3
    c.optim.mini_batches = min(c.optim.mini_batches, 2)
    c.eval.batch_size = 16
    if "tracerl" in c:
        c.tracerl.llada_block_len, c.tracerl.llada_steps = 8, 12
    return c


def own_model_preset(c: config_dict.ConfigDict) -> config_dict.ConfigDict:
    """The `own` preset: a user's small HF model and data file. It keeps `scale="full"` (the method files' paper
    settings) and has no arithmetic defaults: without `model.init=hf:<dir>` and the data paths it stops at start-up."""
    c.model.init = ""  # required: hf:<dir>
    c.task.name = "jsonl"
    c.task.train_path = c.task.eval_path = ""  # required
    c.rollout.prompts_per_step, c.rollout.group_size = 32, 8
    c.rollout.max_prompt_len, c.rollout.max_new_tokens = 512, 1024
    c.optim.lr = 1e-6
    c.train.num_steps, c.train.checkpoint_every, c.train.eval_every = 200, 20, 50
    c.eval.num_problems, c.eval.samples, c.eval.batch_size = 200, 4, 64
    return c
