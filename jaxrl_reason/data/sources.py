"""Training and held-out examples of a user task (data files or reasoning-gym), rendered and length-checked.

`build_examples(config, tok)` for `task.name`:
  jsonl | file     `task.train_path` / `task.eval_path`: a .jsonl or .parquet file or a saved `datasets` directory
                   (`data.loaders`), column mapping `task.prompt_key` / `task.answer_key`, malformed rows skipped
                   and reported with their lines, or fatal with `task.on_malformed='raise'`;
  reasoning_gym    `task.reasoning_gym_task` entries drawn with `seed` (train) and `task.eval_seed` (held-out).
Prompts are rendered (`data.chat.render_examples`: chat template, `task.system_prompt`, `task.instruction`), then
prompts longer than `rollout.max_prompt_len` tokens are dropped and counted (`task.on_overlong='filter'`), cut to
their last tokens ('truncate') or fatal ('raise'); an empty train or held-out set is an error. Everything happens
at start-up, before any compilation.
"""
from __future__ import annotations

import dataclasses
import logging
import os

from jaxrl_reason.data.chat import render_examples, uses_template

FILE_TASKS = ("jsonl", "file")
USER_TASKS = FILE_TASKS + ("reasoning_gym",)
OVERLONG = ("filter", "truncate", "raise")
NUM_REASONING_GYM_TRAIN = 20000


def _get(config, key, default):
    return config.task[key] if key in config.task else default


def validate_task(config) -> None:
    """One sentence for an impossible task setting (no file is read beyond existence checks)."""
    t = config.task
    if not config.model.init:
        raise ValueError("model.init is empty: point it to your model with --config.model.init=hf:/path/to/model.")
    if t.name not in USER_TASKS + ("arithmetic",):
        raise ValueError(f"unknown task {t.name!r}; use 'arithmetic', 'jsonl' (a .jsonl/.parquet file or a saved "
                         f"`datasets` directory) or 'reasoning_gym'.")
    if t.name in FILE_TASKS:
        for key in ("train_path", "eval_path"):
            path = t[key]
            if not path:
                raise ValueError(f"task.name={t.name!r} needs task.{key} (a .jsonl or .parquet file).")
            if not os.path.exists(path):
                raise ValueError(f"task.{key} {path!r} does not exist.")
    if t.name == "reasoning_gym":
        try:
            import reasoning_gym
        except ImportError:
            raise ValueError("task.name='reasoning_gym' needs the reasoning_gym package: pip install reasoning-gym.") \
                from None
        if t.reasoning_gym_task not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"unknown reasoning_gym task {t.reasoning_gym_task!r}.")
    if _get(config, "on_overlong", "filter") not in OVERLONG:
        raise ValueError(f"task.on_overlong must be one of {OVERLONG}, got {t.on_overlong!r}.")
    if _get(config, "on_malformed", "skip") not in ("skip", "raise"):
        raise ValueError(f"task.on_malformed must be 'skip' or 'raise', got {t.on_malformed!r}.")
    if config.reward.get("fn", ""):
        from jaxrl_reason.rewards.registry import parse_reward_spec

        parse_reward_spec(config.reward.fn)


def _load(config, which: str):
    """(examples, where each sits in its file: "line N" / "row N", or "prompt N" for generated tasks)."""
    t = config.task
    if t.name == "reasoning_gym":
        from jaxrl_reason.data.reasoning_gym_tasks import make_examples

        n = NUM_REASONING_GYM_TRAIN if which == "train_path" else config.eval.num_problems
        seed = config.seed if which == "train_path" else t.eval_seed
        examples = make_examples(t.reasoning_gym_task, n, seed)
        return examples, [f"prompt {i + 1}" for i in range(len(examples))]
    from jaxrl_reason.data.loaders import load_examples

    positions = []
    examples, _ = load_examples(t[which], on_error=_get(config, "on_malformed", "skip"),
                                prompt_key=_get(config, "prompt_key", ""), answer_key=_get(config, "answer_key", ""),
                                positions=positions)
    return examples, positions


def fit_prompts(tok, examples, max_len: int, mode: str, where: str, positions: list | None = None):
    """Examples whose prompt has at most `max_len` tokens: the others dropped ('filter', with one warning),
    cut to their last `max_len` tokens ('truncate') or an error naming the first one ('raise') by its place in
    the file (`positions[i]`, e.g. "line 7"; "prompt i" without them)."""
    if not examples:
        return examples
    lengths = [len(ids) for ids in tok([ex.prompt for ex in examples], add_special_tokens=False)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > max_len]
    if not long:
        return examples
    if mode == "raise":
        i = long[0]
        at = positions[i] if positions else f"prompt {i + 1}"
        raise ValueError(f"{where}:{at}: the prompt has {lengths[i]} tokens, more than rollout.max_prompt_len="
                         f"{max_len} ({len(long)} such prompts; raise rollout.max_prompt_len or set "
                         f"task.on_overlong='filter' or 'truncate').")
    if mode == "filter":
        logging.warning("%s: dropped %d of %d prompts longer than rollout.max_prompt_len=%d tokens (longest %d).",
                        where, len(long), len(examples), max_len, max(lengths))
        drop = set(long)
        return [ex for i, ex in enumerate(examples) if i not in drop]
    out = list(examples)
    for i in long:
        ids = tok(examples[i].prompt, add_special_tokens=False)["input_ids"][-max_len:]
        text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        while len(tok(text, add_special_tokens=False)["input_ids"]) > max_len:  # decode-encode may merge tokens
            ids = ids[1:]
            text = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out[i] = dataclasses.replace(examples[i], prompt=text)
    logging.warning("%s: cut %d of %d prompts to their last %d tokens (rollout.max_prompt_len).", where, len(long),
                    len(examples), max_len)
    return out


def build_split(config, tok, which: str):
    """The rendered, length-checked examples of `which` ("train_path" or "eval_path"); see the module docstring."""
    t = config.task
    mode = _get(config, "chat_template", "auto")
    uses_template(tok, mode)
    role = "training" if which == "train_path" else "held-out"
    where = t[which] if t.name in FILE_TASKS else f"reasoning_gym/{t.reasoning_gym_task}"
    examples, positions = _load(config, which)
    examples = render_examples(tok, examples, mode=mode, system_prompt=_get(config, "system_prompt", ""),
                               instruction=_get(config, "instruction", ""))
    if role == "held-out":
        examples, positions = examples[: config.eval.num_problems], positions[: config.eval.num_problems]
    examples = fit_prompts(tok, examples, config.rollout.max_prompt_len, _get(config, "on_overlong", "filter"), where,
                           positions)
    if not examples:
        raise ValueError(f"the {role} set {where!r} is empty (after skipping malformed rows and too-long prompts).")
    return examples


def build_examples(config, tok):
    """(train examples, held-out examples) of a user task; see the module docstring."""
    return build_split(config, tok, "train_path"), build_split(config, tok, "eval_path")


def scorer_for(config):
    """The reward of a user task: `reward.fn`, else the task's own verifier (math; reasoning-gym's score)."""
    from jaxrl_reason.rewards.registry import make_scorer

    default = "reasoning_gym" if config.task.name == "reasoning_gym" else "math"
    return make_scorer(config.reward.get("fn", "") or default)
