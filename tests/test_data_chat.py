"""Prompt rendering: chat template by default when the tokenizer has one, system prompt, instruction, raw switch."""
import pytest

from chat_testing import build_chat_tokenizer

from jaxrl_reason.data.chat import messages_of, render_examples, render_prompt
from jaxrl_reason.data.example import Example

CHAT = Example(prompt="What is 6*7?", answer="42", data_source="s",
               extra={"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "What is 6*7?"}]})
PLAIN = Example(prompt="Add 1 and 2.", answer="3", data_source="s")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_chat_tokenizer(str(tmp_path_factory.mktemp("chat_tok")))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return build_chat_tokenizer(str(tmp_path_factory.mktemp("plain_tok")), template=None)


def test_template_applied_by_default_with_the_kept_system_message(tok):
    text = render_prompt(tok, CHAT, instruction="Put the final answer in \\boxed{}.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 6*7? "
                    "Put the final answer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    # the special markers are single tokens of the template, so the prompt encodes as the model was trained
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3 and ids.count(tok.eos_token_id) == 2


def test_system_prompt_is_added_only_when_the_row_has_none(tok):
    text = render_prompt(tok, PLAIN, system_prompt="You are a math tutor.")
    assert text == ("<|im_start|>system\nYou are a math tutor.<|im_end|>\n<|im_start|>user\nAdd 1 and 2.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert messages_of(CHAT, system_prompt="other")[0] == {"role": "system", "content": "Be brief."}
    assert CHAT.extra["messages"][1]["content"] == "What is 6*7?"  # the input is not modified


def test_raw_switch_and_tokenizer_without_template(tok, plain_tok):
    assert render_prompt(tok, CHAT, mode="off") == "Be brief.\n\nWhat is 6*7?"
    assert render_prompt(tok, PLAIN, mode="off", instruction="Think.") == "Add 1 and 2. Think."
    assert render_prompt(plain_tok, PLAIN) == "Add 1 and 2."  # auto without a template: the raw text, unchanged
    with pytest.raises(ValueError, match="the tokenizer has no chat template; use 'off'"):
        render_prompt(plain_tok, PLAIN, mode="on")
    with pytest.raises(ValueError, match="task.chat_template must be one of"):
        render_prompt(tok, PLAIN, mode="yes")


def test_render_examples_keeps_the_raw_prompt_and_leaves_unchanged_rows_alone(tok, plain_tok):
    out = render_examples(tok, [PLAIN])[0]
    assert out.prompt.startswith("<|im_start|>user\nAdd 1 and 2.") and out.extra["raw_prompt"] == "Add 1 and 2."
    assert out.answer == "3" and out.data_source == "s"
    assert render_examples(plain_tok, [PLAIN])[0] is PLAIN


def test_trailing_assistant_message_is_not_part_of_the_prompt(tok):
    ex = Example(prompt="Hi?", answer="1", data_source="s", extra={"messages": [
        {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "#### 1"}]})
    assert render_prompt(tok, ex) == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
