"""experiments/compile_check.py: targets, the shape table, HLO reading, and the script end to end at a tiny shape."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import _compile_targets as ct
from jaxrl_reason.models.hf import config_from_hf
from jaxrl_reason.models.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAST_LINE = re.compile(r"^fits=(yes|no) peak_gib=(\d+\.\d+) capacity_gib=(\d+\.\d+)$")
# A 1-layer model with the 0.5B shape's architecture (Qwen2: qkv bias, tied embeddings) and tiny sizes.
TINY = ["--model=Qwen2.5-0.5B", "--layers=1", "--config.model.hidden_size=64", "--config.model.intermediate_size=128",
        "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.vocab_size=512",
        "--config.rollout.prompts_per_step=2", "--config.rollout.group_size=4", "--config.rollout.max_prompt_len=16",
        "--config.rollout.max_new_tokens=32", "--config.optim.micro_batches=2", "--top=2"]


@pytest.mark.parametrize("target,devices,topology", [
    ("tpu:v5p-8", 4, "v5p:2x2x1"),  # v5p counts TensorCores: 8 cores = 4 chips
    ("tpu:v5p-64", 32, "v5p:2x4x4"),
    ("tpu:v5p-128", 64, "v5p:4x4x4"),
    ("tpu:v4-32", 16, "v4:2x2x4"),
    ("tpu:v5e-8", 8, "v5e:2x4"),  # v5e / v6e count chips
    ("tpu:v5litepod-16", 16, "v5e:4x4"),
    ("tpu:v6e-8", 8, "v6e:2x4"),
    ("tpu:v5e-256", 256, "v5e:16x16"),
    ("tpu:v5e:4x4", 16, "v5e:4x4"),
    ("tpu:v5p:2x2x1", 4, "v5p:2x2x1"),
    ("cpu:8", 8, None),
])
def test_targets(target, devices, topology):
    t = ct.parse_target(target)
    assert (t.num_devices, t.topology) == (devices, topology)


@pytest.mark.parametrize("target", ["gpu:1", "tpu:v5p-7", "tpu:v9-8", "tpu:v5e:2x2x2", "cpu:x", "tpu:v5e-12"])
def test_bad_targets_are_one_sentence(target):
    with pytest.raises(ValueError):
        ct.parse_target(target)


def test_chip_memory():
    assert [ct.parse_target(t).hbm_gib for t in ("tpu:v5e-8", "tpu:v5p-8", "tpu:v6e-8", "tpu:v4-8")] == [16, 95, 32, 32]


@pytest.mark.parametrize("name,params", [  # the models' published parameter counts
    ("Qwen2.5-0.5B", 494_032_768), ("Qwen2.5-1.5B", 1_543_714_304), ("Qwen2.5-7B", 7_615_616_512),
    ("Qwen2.5-14B", 14_770_033_664), ("Llama-3.1-8B", 8_030_261_248)])
def test_shape_table_gives_the_published_parameter_counts(name, params):
    assert ct.count_params(config_from_hf(ct.SHAPES[name])) == params


def test_count_params_matches_the_model():
    cfg = config_from_hf({**ct.SHAPES["Qwen2.5-7B"], "hidden_size": 64, "intermediate_size": 96, "vocab_size": 100,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert ct.count_params(cfg) == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_model_config_applies_overrides_but_keeps_the_architecture(tmp_path):
    from configs.grpo import get_config

    config = get_config("full")
    config.model.num_layers = 3
    cfg = ct.model_config(config, ct.SHAPES["Qwen2.5-7B"])
    assert (cfg.num_layers, cfg.hidden_size, cfg.rope_theta, cfg.tie_embeddings, cfg.qkv_bias) == (3, 3584, 1e6,
                                                                                                  False, True)
    assert cfg.param_dtype == config.model.param_dtype
    assert ct.model_config(config, ct.SHAPES["Qwen2.5-7B"], layers=2).num_layers == 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**ct.SHAPES["Llama-3.1-8B"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    name, hf = ct.model_hf_config(str(path))
    assert name == tmp_path.name and config_from_hf(hf).num_kv_heads == 8
    with pytest.raises(ValueError):
        ct.model_hf_config(str(tmp_path / "missing.json"))


def test_dot_flops_count_loop_bodies_by_trip_count():
    def f(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    compiled = jax.jit(jax.grad(f)).lower(jax.ShapeDtypeStruct((4, 64, 64), jnp.float32),
                                          jax.ShapeDtypeStruct((32, 64), jnp.float32)).compile()
    # forward, and two matmuls per layer in the backward pass: 3 x layers x 2 x rows x d x d
    assert ct.dot_flops(compiled.as_text()) == 3 * 4 * 2 * 32 * 64 * 64
    assert ct.largest_buffers(compiled.as_text(), 1)[0] == (4 * 64 * 64 * 4, "f32[4,64,64]", "argument")


def test_parse_oom():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (36.29G) "
           "exceeds available HBM (15.75G).")
    assert ct.parse_oom(msg) == {"temp_bytes": int(36.29 * 2**30), "hbm_bytes": int(15.75 * 2**30)}
    assert ct.parse_oom("something else") == {}


def _run(target):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "compile_check.py"),
                           "--config=configs/grpo.py:full", f"--target={target}", *TINY], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_script_on_simulated_cpu_devices():
    out = _run("cpu:2")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert LAST_LINE.match(lines[-1]) and lines[-1].startswith("fits=yes")
    assert "2 x cpu" in out.stdout and "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in out.stdout  # full: FSDP over all devices
    assert "### update step" in out.stdout and "### log-prob pass" in out.stdout


def test_script_on_a_tpu_topology():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (setup.py's test extra installs it)")
    out = _run("tpu:v5e:2x2")
    if out.returncode and "libtpu could not describe" in out.stderr:
        pytest.skip("libtpu cannot load here: " + out.stderr.strip().splitlines()[-1][:300])
    assert out.returncode == 0, out.stderr[-3000:]
    last = LAST_LINE.match(out.stdout.strip().splitlines()[-1])
    assert last and last.group(1) == "yes" and last.group(3) == "16.00"
    assert "4 x TPU v5 lite" in out.stdout
