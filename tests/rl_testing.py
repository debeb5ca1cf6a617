"""Shared helpers for the RL-system tests: a very small config of any method that runs in seconds."""
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def tiny_config(module: str = "grpo", arg: str = "tiny", **overrides):
    """`configs/<module>.py:<arg>` shrunk to a random 1-layer model, 4 prompts x 4 samples, 24 new tokens."""
    c = importlib.import_module(f"configs.{module}").get_config(arg)
    c.model.init = "random"
    m = c.model
    m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads = 32, 64, 1, 2, 2
    c.rollout.max_new_tokens = 24
    c.rollout.prompts_per_step, c.rollout.group_size = 4, 4
    c.reward.overlong_buffer = min(c.reward.overlong_buffer, 4)
    c.filter.max_rounds = 2
    c.optim.lr = 1e-3
    c.optim.mini_batches = min(c.optim.mini_batches, 2)
    c.train.num_steps, c.train.checkpoint_every, c.train.time_budget_s = 2, 100, 0.0
    c.train.export_hf = False
    c.eval.num_problems, c.eval.samples, c.eval.batch_size, c.eval.greedy = 4, 4, 16, False
    if "tracerl" in c and c.model.attention == "bidirectional":  # LLaDA blocks must fit the 24-token budget
        c.tracerl.llada_block_len, c.tracerl.llada_steps = 8, 12
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        getattr(c, section)[key] = value
    return c


def digit_scorer(texts, answers):
    """A reward a random policy can earn (the response contains a '1'), so RL mechanics can be tested."""
    del answers
    import numpy as np

    return np.asarray([float("1" in t) for t in texts], np.float32)
