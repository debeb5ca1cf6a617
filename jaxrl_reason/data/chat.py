"""Prompts the way the model was trained: the tokenizer's chat template, a system prompt and an instruction.

`render_prompt(tok, example, mode=..., system_prompt=..., instruction=...)` turns an `Example` into the text the
policy is prompted with:

  messages     `example.extra["messages"]` (the chat list a loader kept; trailing assistant messages dropped)
               or one user message `example.prompt`;
               `system_prompt` is put first when the messages have no system message; `instruction` (e.g.
               "Put the final answer in \\boxed{}.") is appended to the LAST user message after one space.
  mode "auto"  the tokenizer's chat template when it has one (`tok.chat_template`), else the raw text;
       "on"    the template, and a tokenizer without one is an error;
       "off"   the raw text (base models): `system_prompt + "\\n\\n"` (if any) + the last user message.

The template is applied with `add_generation_prompt=True` and the text is later encoded WITHOUT special tokens
(the template already writes BOS / turn markers), as verl and TRL do. With no template, no system prompt and no
instruction the rendered text is `example.prompt` unchanged.
"""
from __future__ import annotations

import dataclasses

from jaxrl_reason.data.example import Example

CHAT_MODES = ("auto", "on", "off")


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def uses_template(tok, mode: str) -> bool:
    """Whether prompts are rendered with the chat template under `mode`; one sentence for a bad mode."""
    if mode not in CHAT_MODES:
        raise ValueError(f"task.chat_template must be one of {CHAT_MODES}, got {mode!r}.")
    if mode == "on" and not has_chat_template(tok):
        raise ValueError("task.chat_template='on' but the tokenizer has no chat template; use 'off' for raw prompts.")
    return mode == "on" or (mode == "auto" and has_chat_template(tok))


def messages_of(example: Example, system_prompt: str = "", instruction: str = "") -> list[dict]:
    """The example's chat messages with the system prompt and the instruction added (copies, inputs unchanged)."""
    msgs = [dict(m) for m in example.extra.get("messages") or [{"role": "user", "content": example.prompt}]]
    while msgs and msgs[-1]["role"] == "assistant":  # a final answer (an SFT target) is not part of the prompt
        msgs.pop()
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    if instruction:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        content = msgs[last]["content"]
        msgs[last]["content"] = f"{content} {instruction}" if content else instruction
    return msgs


def render_prompt(tok, example: Example, *, mode: str = "auto", system_prompt: str = "",
                  instruction: str = "") -> str:
    """The prompt text of `example` (see the module docstring)."""
    msgs = messages_of(example, system_prompt, instruction)
    if uses_template(tok, mode):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    user = [m["content"] for m in msgs if m["role"] == "user"][-1]
    system = [m["content"] for m in msgs if m["role"] == "system"]
    return f"{system[0]}\n\n{user}" if system and system[0] else user


def render_examples(tok, examples, *, mode: str = "auto", system_prompt: str = "", instruction: str = ""):
    """Examples whose `prompt` is the rendered text; the unrendered prompt is kept in `extra["raw_prompt"]`."""
    out = []
    for ex in examples:
        text = render_prompt(tok, ex, mode=mode, system_prompt=system_prompt, instruction=instruction)
        out.append(ex if text == ex.prompt else
                   dataclasses.replace(ex, prompt=text, extra={**ex.extra, "raw_prompt": ex.prompt}))
    return out

