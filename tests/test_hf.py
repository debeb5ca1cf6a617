"""HF import/export vs transformers + torch on tiny random Qwen2 / Qwen3 / Llama built in the test."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from jaxrl_reason.models import attention as A
from jaxrl_reason.models import hf

CASES = {  # (architecture, kwargs): GQA 4/2, 4/1, 4/4; tied and untied; rope theta 1e4 and 1e6
    "qwen2_gqa2_untied": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e4)),
    "qwen2_mqa_tied": ("Qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3_mha_tied_hd24": ("Qwen3", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_theta=1e6,
                                          head_dim=24)),
    "llama_gqa2_untied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6)),
}


def _hf_model(arch, kw, seed=0):
    torch.manual_seed(seed)
    kw = dict(kw)
    theta = kw.pop("rope_theta")
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": theta}, head_dim=kw.pop("head_dim", 16), **kw)
    config._attn_implementation = "eager"
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so that every tensor matters
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if "norm" in name:
                p.add_(1.0)
    return model


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    b, t = 3, 9
    lens = np.array([9, 5, 2])
    valid = np.arange(t)[None, :] >= (t - lens)[:, None]  # left padded
    tokens = np.where(valid, rng.integers(0, 128, (b, t)), 0)
    return tokens, valid


def _hf_logits(model, tokens, valid):
    pos = np.asarray(A.positions_from_mask(valid))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64)),
                    position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


_fwd = jax.jit(lambda graphdef, state, tokens, valid: nnx.merge(graphdef, state)(
    tokens, A.positions_from_mask(valid), A.causal_mask(valid))[0], static_argnums=0)


def _ours(model, tokens, valid):
    graphdef, state = nnx.split(model)
    return np.asarray(_fwd(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid)))


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers(case, tmp_path):
    arch, kw = CASES[case]
    ref = _hf_model(arch, kw)
    ref.save_pretrained(tmp_path)
    model, cfg = hf.load_hf(str(tmp_path))
    assert cfg.tie_embeddings == kw["tie_word_embeddings"] and cfg.num_kv_heads == kw["num_key_value_heads"]
    assert cfg.rope_theta == kw["rope_theta"] and cfg.qkv_bias == (arch == "Qwen2") and cfg.qk_norm == (arch == "Qwen3")
    tokens, valid = _batch()
    err = np.abs(_ours(model, tokens, valid) - _hf_logits(ref, tokens, valid))[valid].max()
    assert err <= 1e-4, err


@pytest.mark.parametrize("case", ["qwen2_gqa2_untied", "qwen3_mha_tied_hd24", "llama_gqa2_untied"])
def test_export_roundtrip_and_transformers_loads_it(case, tmp_path):
    arch, kw = CASES[case]
    ref = _hf_model(arch, kw, seed=1)
    ref.save_pretrained(tmp_path / "src")
    model, cfg = hf.load_hf(str(tmp_path / "src"), attention="block", block_size=4)
    hf.save_hf(model, cfg, str(tmp_path / "out"))
    names = set(safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors")))
    assert names == set(safetensors.numpy.load_file(str(tmp_path / "src" / "model.safetensors")))
    again, cfg2 = hf.load_hf(str(tmp_path / "out"))
    assert cfg2 == cfg  # including the diffusion metadata
    jax.tree.map(np.testing.assert_array_equal, _params(again), _params(model))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert type(reloaded).__name__ == f"{arch}ForCausalLM"
    tokens, valid = _batch(1)
    np.testing.assert_allclose(_hf_logits(reloaded, tokens, valid)[valid], _hf_logits(ref, tokens, valid)[valid],
                               atol=1e-6)


def test_bf16_checkpoint(tmp_path):
    ref = _hf_model("Qwen2", CASES["qwen2_gqa2_untied"][1]).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    model, cfg = hf.load_hf(str(tmp_path))
    assert cfg.param_dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
    tokens, valid = _batch()
    assert _ours(model, tokens, valid).dtype == np.float32
    # loaded in float32, the bf16 weights give transformers' float32 logits on the same weights (ref.float()
    # would keep a bf16-rounded rotary inv_freq buffer, so reload instead).
    model32, _ = hf.load_hf(str(tmp_path), param_dtype="float32")
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                              attn_implementation="eager")
    want = _hf_logits(ref32, tokens, valid)
    assert np.abs(_ours(model32, tokens, valid) - want)[valid].max() <= 1e-4
    assert np.abs(_ours(model, tokens, valid) - want)[valid].max() <= 0.1 * np.abs(want).max()
    hf.save_hf(model, cfg, str(tmp_path / "out"))  # bf16 export round-trips bit-exactly
    exported = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert exported["lm_head.weight"].dtype.name == "bfloat16"
    again, _ = hf.load_hf(str(tmp_path / "out"))
    jax.tree.map(np.testing.assert_array_equal, _params(again), _params(model))


def test_sharded_index_checkpoint(tmp_path):
    arch, kw = CASES["llama_gqa2_untied"]
    ref = _hf_model(arch, kw, seed=2)
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert not os.path.isfile(tmp_path / "model.safetensors")
    model, _ = hf.load_hf(str(tmp_path))
    tokens, valid = _batch(2)
    assert np.abs(_ours(model, tokens, valid) - _hf_logits(ref, tokens, valid))[valid].max() <= 1e-4


def test_scanned_layout_imports_and_exports_the_same_files(tmp_path):
    """Stacked (scan_layers) params read the per-layer HF tensors (also from a multi-file checkpoint), match
    transformers, and export files whose tensors equal the unrolled model's export."""
    arch, kw = CASES["qwen2_gqa2_untied"]
    ref = _hf_model(arch, kw, seed=3)
    ref.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    model, cfg = hf.load_hf(str(tmp_path / "src"), scan_layers=True, remat="full")
    assert cfg.scan_layers and cfg.remat == "full" and model.layers.attn.q_proj[...].shape == (2, 64, 64)
    tokens, valid = _batch(3)
    assert np.abs(_ours(model, tokens, valid) - _hf_logits(ref, tokens, valid))[valid].max() <= 1e-4
    unrolled, _ = hf.load_hf(str(tmp_path / "src"))
    hf.save_hf(model, cfg, str(tmp_path / "scanned"))
    hf.save_hf(unrolled, unrolled.cfg, str(tmp_path / "unrolled"))
    got = safetensors.numpy.load_file(str(tmp_path / "scanned" / "model.safetensors"))
    want = safetensors.numpy.load_file(str(tmp_path / "unrolled" / "model.safetensors"))
    assert set(got) == set(want) == set(ref.state_dict())
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
        np.testing.assert_array_equal(got[name], ref.state_dict()[name].numpy())
    assert "scan_layers" not in json.load(open(tmp_path / "scanned" / "config.json"))  # a runtime choice


@pytest.mark.devices(8)
@pytest.mark.parametrize("scan", [False, True])
def test_streamed_into_sharded_arrays(tmp_path, monkeypatch, scan):
    """On a (1, 4, 2) mesh every parameter arrives with the sharding of the logical-axis rules, each device's
    block read on its own (a weight's [64, 64] kernel as [16, 32] blocks), and the logits match transformers'."""
    from jaxrl_reason.models import sharding as S
    arch, kw = CASES["qwen2_gqa2_untied"]
    ref = _hf_model(arch, kw, seed=4)
    ref.save_pretrained(tmp_path / "src")
    blocks = []
    read = hf._read_shard
    monkeypatch.setattr(hf, "_read_shard", lambda *a: blocks.append(read(*a)) or blocks[-1])
    mesh = S.make_mesh(1, 4, 2)
    model, cfg = hf.load_hf(str(tmp_path / "src"), scan_layers=scan, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    want = S.param_shardings(state, mesh)
    jax.tree.map(lambda x, sh: None if x.sharding.is_equivalent_to(sh, x.ndim) else pytest.fail(f"{x.sharding}"),
                 state, want)
    q = model.layers.attn.q_proj[...] if scan else model.layers[0].attn.q_proj[...]
    assert q.sharding.spec == jax.P(*(None,) * scan, "fsdp", "tensor")
    q_block = (2, 16, 32) if scan else (16, 32)
    assert q_block in {b.shape for b in blocks}
    assert max(b.size for b in blocks) <= 128 * 64  # no block larger than one tensor (embed / lm_head)
    tokens, valid = _batch(4)
    with jax.set_mesh(mesh):
        got = _ours(model, tokens, valid)
    assert np.abs(got - _hf_logits(ref, tokens, valid))[valid].max() <= 1e-4
    hf.save_hf(model, cfg, str(tmp_path / "out"))  # assembled shard by shard
    out = safetensors.numpy.load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, x in ref.state_dict().items():
        np.testing.assert_array_equal(out[name], x.numpy())


def _rewrite(path, fn):
    tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
    safetensors.numpy.save_file(fn(tensors), str(path / "model.safetensors"), metadata={"format": "pt"})


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        hf.load_hf(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No config.json"):
        hf.load_hf(str(tmp_path / "empty"))
    ckpt = tmp_path / "ckpt"
    _hf_model("Qwen2", CASES["qwen2_gqa2_untied"][1]).save_pretrained(ckpt)
    config = json.load(open(ckpt / "config.json"))
    with pytest.raises(ValueError, match="Unsupported architecture 'GPT2LMHeadModel'"):
        hf.config_from_hf({**config, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        hf.config_from_hf({**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="cannot express qkv_bias"):
        hf.config_to_hf(hf.config_from_hf(config), "LlamaForCausalLM")
    _rewrite(ckpt, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.bias"})
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.self_attn.k_proj.bias'"):
        hf.load_hf(str(ckpt))
    _rewrite(ckpt, lambda t: {**t, "model.layers.1.self_attn.k_proj.bias": np.zeros(32, np.float32),
                              "model.layers.0.mlp.up_proj.weight": np.zeros((95, 64), np.float32)})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight'.*\(95, 64\).*\(96, 64\)"):
        hf.load_hf(str(ckpt))
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="No model.safetensors"):
        hf.load_hf(str(ckpt))
