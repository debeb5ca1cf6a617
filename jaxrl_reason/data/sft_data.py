"""Supervised pairs (prompt text, response text) from a user's own data, rendered like the RL prompts.

A row's response is, in order: the final assistant message of a chat prompt (`prompt` = [..., user, assistant];
the prompt is then the messages before it), the field `sft.response_key` when set, else `response`, `completion`,
the unnormalized answer (`extra["raw_answer"]`, e.g. a GSM8K solution ending in `#### 72`) or the answer.
Prompts go through `data.chat` exactly as in RL and evaluation (chat template, system prompt, instruction);
pairs whose prompt exceeds `rollout.max_prompt_len` or whose response + EOS exceeds `rollout.max_new_tokens`
tokens are dropped and counted in one warning (a truncated target would teach the model not to stop).
"""
from __future__ import annotations

import dataclasses
import logging

from jaxrl_reason.data.chat import render_examples, uses_template

_RESPONSE_KEYS = ("response", "completion")


def _split_response(ex, response_key: str):
    """(example whose messages end before the response, response text)."""
    msgs = ex.extra.get("messages")
    if msgs and msgs[-1]["role"] == "assistant":
        extra = {**ex.extra, "messages": msgs[:-1]}
        return dataclasses.replace(ex, extra=extra), msgs[-1]["content"]
    for key in (response_key,) if response_key else _RESPONSE_KEYS:
        if isinstance(ex.extra.get(key), str):
            return ex, ex.extra[key]
    if response_key:
        raise ValueError(f"an SFT row of {ex.data_source!r} has no response field {response_key!r}.")
    return ex, str(ex.extra.get("raw_answer", ex.answer))


def sft_pairs(config, tok, path: str | None = None):
    """(prompts, responses) of `task.train_path` (or `path`) for `train/sft.sft_arrays`."""
    from jaxrl_reason.data.loaders import load_examples

    t = config.task
    path = path or t.train_path
    examples, _ = load_examples(path, on_error=t.get("on_malformed", "skip"), prompt_key=t.get("prompt_key", ""),
                                answer_key=t.get("answer_key", ""))
    response_key = config.sft.get("response_key", "") if "sft" in config else ""
    split = [_split_response(ex, response_key) for ex in examples]
    mode = t.get("chat_template", "auto")
    uses_template(tok, mode)
    rendered = render_examples(tok, [ex for ex, _ in split], mode=mode, system_prompt=t.get("system_prompt", ""),
                               instruction=t.get("instruction", ""))
    prompts, responses = [ex.prompt for ex in rendered], [r for _, r in split]
    p_len = [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    r_len = [len(x) + 1 for x in tok(responses, add_special_tokens=False)["input_ids"]] if responses else []
    keep = [i for i in range(len(prompts))
            if p_len[i] <= config.rollout.max_prompt_len and r_len[i] <= config.rollout.max_new_tokens]
    if len(keep) < len(prompts):
        logging.warning("%s: dropped %d of %d SFT pairs longer than rollout.max_prompt_len=%d (prompt) or "
                        "rollout.max_new_tokens=%d (response + EOS).", path, len(prompts) - len(keep), len(prompts),
                        config.rollout.max_prompt_len, config.rollout.max_new_tokens)
    if not keep:
        raise ValueError(f"the SFT set {path!r} is empty (after skipping malformed rows and too-long pairs).")
    return [prompts[i] for i in keep], [responses[i] for i in keep]
