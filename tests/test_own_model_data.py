"""A user's own model and data, as a user runs them: a tiny HF Qwen2 model and a chat tokenizer built offline,
GSM8K-style jsonl and verl-layout parquet files; SFT, GRPO, evaluation of a saved checkpoint on a data file,
export, and a transformers `generate` that stops at the end-of-turn token."""
import json
import os

import pytest

from chat_testing import build_chat_tokenizer
from rl_testing import ROOT, tiny_config

torch = pytest.importorskip("torch")


def _rows(n):
    return [{"question": f"What is {i} + {i % 3}?", "answer": f"{i} + {i % 3} = {i + i % 3}\n#### {i + i % 3}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """{model dir, jsonl, parquet}: a random Qwen2 (hidden 32, 1 layer) with a ChatML tokenizer, and data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("own")
    tok = build_chat_tokenizer(str(d / "model"))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256, tie_word_embeddings=False,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                                               do_sample=False)
    model.save_pretrained(str(d / "model"))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(12)))
    verl = [{"data_source": ["gsm8k", "math"][i % 2], "prompt": [{"role": "user", "content": r["question"]}],
             "reward_model": {"ground_truth": r["answer"].split("#### ")[1]}} for i, r in enumerate(_rows(6))]
    pq.write_table(pa.Table.from_pylist(verl), str(d / "test.parquet"))
    return {"dir": d, "model": str(d / "model"), "jsonl": str(d / "train.jsonl"), "parquet": str(d / "test.parquet")}


def _config(own, **kw):
    kw = {"model__init": f"hf:{own['model']}", **kw}
    return tiny_config("grpo", task__name="jsonl", task__train_path=own["jsonl"], task__eval_path=own["parquet"],
                       rollout__max_prompt_len=48, rollout__max_new_tokens=16, task__instruction="Answer after ####.",
                       **kw)


def test_sft_grpo_evaluate_export_generate(own, tmp_path):
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jaxrl_reason.data.sft_data import sft_pairs
    from jaxrl_reason.train import build, export, loop, sft

    # SFT on the jsonl (GSM8K solutions as targets), prompts through the chat template
    c = _config(own)
    tok = build.tokenizer_for(c)
    prompts, responses = sft_pairs(c, tok)
    assert prompts[0].startswith("<|im_start|>user\nWhat is 0 + 0? Answer after ####.<|im_end|>")
    assert responses[0] == "0 + 0 = 0\n#### 0"
    model, mcfg = build.load_policy(c, tok)
    arrays = sft.sft_arrays(tok, prompts, responses, 48, 16)
    model, hist = sft.train_sft(model, tok, arrays, steps=60, batch_size=12, lr=1e-2, warmup_steps=0, seed=0,
                                log_fn=lambda s: None, schedule="constant", weight_decay=0.0)
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    sft_dir = str(tmp_path / "sft")
    export.export_policy(c, model, mcfg, tok, sft_dir)

    # GRPO from the SFT checkpoint, held-out on the parquet (two data sources), exported with token ids
    work = str(tmp_path / "run")
    out = loop.run(_config(own, model__init=f"hf:{sft_dir}", train__num_steps=1, train__export_hf=True,
                           train__checkpoint_every=1), work)
    assert out["iterations"] == 1 and {"pass@1/gsm8k", "pass@1/math"} <= set(out["eval_after"])
    assert json.load(open(os.path.join(work, "config.json")))["model"]["init"] == f"hf:{sft_dir}"
    hf = os.path.join(work, "hf_export")
    cfg = json.load(open(os.path.join(hf, "config.json")))
    assert cfg["eos_token_id"] == tok.eos_token_id and cfg["pad_token_id"] == tok.pad_token_id
    gen = json.load(open(os.path.join(hf, "generation_config.json")))
    assert gen["eos_token_id"] == [tok.eos_token_id] and gen["do_sample"] is False  # the source model's

    # evaluate.py on the run's workdir (its saved checkpoint) with only a data file
    spec = importlib.util.spec_from_file_location("own_evaluate", os.path.join(ROOT, "experiments", "evaluate.py"))
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    m = ev.main(["evaluate.py", f"--config={ROOT}/configs/grpo.py:tiny", f"--checkpoint={work}",
                 f"--data={own['parquet']}", "--samples=2", "--config.rollout.max_prompt_len=48",
                 "--config.rollout.max_new_tokens=16", "--config.task.instruction=Answer after ####."])
    assert {"pass@1", "pass@2", "maj@2", "pass@1/gsm8k", "maj@2/math"} <= set(m)
    assert os.path.isfile(os.path.join(work, "hf_step1", "generation_config.json"))

    # transformers generate on the export stops at the end-of-turn token the SFT taught
    tt = AutoTokenizer.from_pretrained(hf)
    lm = AutoModelForCausalLM.from_pretrained(hf)
    ids = tt(prompts[3], add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = lm.generate(ids, max_new_tokens=40)[0, ids.shape[1]:].tolist()
    assert tok.eos_token_id in new and len(new) == new.index(tok.eos_token_id) + 1 < 40
