"""HF export carries every config scalar: non-default rms_norm_eps, rope_theta and max_position_embeddings, tied and
untied embeddings, through save_hf -> config.json -> load_hf and transformers' AutoConfig."""
import json

import pytest
import transformers
from flax import nnx

from jaxrl_reason.models import hf
from jaxrl_reason.models.transformer import Transformer, TransformerConfig

# values no default of ours or of transformers has
SCALARS = dict(rms_norm_eps=3.7e-5, rope_theta=12345.0, max_position_embeddings=777)


def _rope_theta(auto_config) -> float:
    rope = getattr(auto_config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(auto_config, "rope_theta", None)))


@pytest.mark.parametrize("qk_norm,qkv_bias,tie", [(False, False, False), (False, True, True), (True, False, True)])
def test_config_scalars_survive_export_and_reimport(qk_norm, qkv_bias, tie, tmp_path):
    cfg = TransformerConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                            head_dim=4, num_kv_heads=1, qk_norm=qk_norm, qkv_bias=qkv_bias, tie_embeddings=tie,
                            **SCALARS)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    hf.save_hf(model, cfg, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["rms_norm_eps"] == SCALARS["rms_norm_eps"]
    assert written["max_position_embeddings"] == SCALARS["max_position_embeddings"]
    assert written["tie_word_embeddings"] is tie
    _, again = hf.load_hf(str(tmp_path))
    assert again == cfg
    auto = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(auto).__name__ == hf.default_architecture(cfg).replace("ForCausalLM", "Config")
    assert auto.rms_norm_eps == SCALARS["rms_norm_eps"]
    assert _rope_theta(auto) == SCALARS["rope_theta"]
    assert auto.max_position_embeddings == SCALARS["max_position_embeddings"]
    assert auto.tie_word_embeddings is tie
    assert (auto.num_hidden_layers, auto.num_attention_heads, auto.num_key_value_heads) == (1, 2, 1)
