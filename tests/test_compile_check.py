"""experiments/compile_check.py: targets, the shape table, HLO reading, and the script end to end at a tiny shape."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import jax.numpy as jnp
import pytest
from flax import nnx

from experiments import _compile_rollout as cr
from experiments import _compile_targets as ct
from experiments import _hlo_flops as hf
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
    assert hf.dot_flops(compiled.as_text()) == 3 * 4 * 2 * 32 * 64 * 64
    assert ct.largest_buffers(compiled.as_text(), 1)[0] == (4 * 64 * 64 * 4, "f32[4,64,64]", "argument")


def _hlo(f, *shapes):
    return jax.jit(f).lower(*[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]).compile().as_text()


def _layers(c, w_LxDxD):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), c, w_LxDxD)[0]


MM = 2 * 8 * 16 * 16  # one [8, 16] x [16, 16] matmul


@pytest.mark.parametrize("name,fn,shapes,flops", [
    ("matmul", lambda a, b: a @ b, [(8, 16), (16, 32)], 2 * 8 * 16 * 32),
    ("batched", lambda a, b: jnp.einsum("bij,bjk->bik", a, b), [(3, 8, 16), (3, 16, 32)], 3 * 2 * 8 * 16 * 32),
    ("scan of 7", lambda w, x: _layers(x, w), [(7, 16, 16), (8, 16)], 7 * MM),
    ("scan 3 of scan 5", lambda w, x: jax.lax.scan(lambda c, wo: (_layers(c, wo), None), x, w)[0],
     [(3, 5, 16, 16), (8, 16)], 15 * MM),
    ("fori_loop of 6", lambda w, x: jax.lax.fori_loop(0, 6, lambda i, c: jnp.tanh(c @ w), x), [(16, 16), (8, 16)],
     6 * MM),
    ("conditional", lambda p, a, b: jax.lax.cond(p.sum() > 0, lambda: (a @ b) @ b.T, lambda: a @ b[:, :16]),
     [(2,), (8, 16), (16, 32)], 2 * (2 * 8 * 16 * 32)),  # the costlier branch
])
def test_dot_flops_of_small_programs(name, fn, shapes, flops):
    assert hf.dot_flops(_hlo(fn, *shapes)) == flops, name


def test_dot_flops_of_a_remat_gradient_by_pass():
    def loss(w1, w2, x):
        return jnp.tanh(jnp.tanh(x @ w1) @ w2).sum()

    fwd = 2 * 8 * 16 * 32 + 2 * 8 * 32 * 24
    bwd = 2 * 8 * 32 * 24 * 2 + 2 * 8 * 16 * 32  # d(w2), d(h); d(w1) (no d(x): x is not differentiated)
    grad = jax.grad(jax.checkpoint(loss), argnums=(0, 1))  # XLA drops the unused primal forward
    assert hf.dot_flops_by_phase(_hlo(grad, (16, 32), (32, 24), (8, 16))) == {"recompute": fwd, "backward": bwd}

    def scanned(w, x):  # remat'd layers in a scan: the backward loop recomputes each layer's forward
        return jax.lax.scan(jax.checkpoint(lambda c, wi: (jnp.tanh(c @ wi), None)), x, w)[0].sum()

    phases = hf.dot_flops_by_phase(_hlo(jax.value_and_grad(scanned), (4, 16, 16), (8, 16)))
    assert phases == {"forward": 4 * MM, "recompute": 4 * MM, "backward": 2 * 4 * MM}


# XLA:TPU's form (hand-written after its compiled text): no known_trip_count, a collective-matmul loop whose
# counter steps by 2 up to 16 (8 trips) around a matmul written as a convolution with a window of 2 over the
# contracted axis, and a transposed matmul written as a padded 4x7 window over 1x1 spatial dimensions.
TPU_HLO = """HloModule tpu_style

%fused_conv (param_0: bf16[64,2,8], param_1: bf16[2,8,32]) -> bf16[64,32,1] {
  %param_0 = bf16[64,2,8]{2,1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[2,8,32]{2,1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.1 = bf16[64,32,1]{1,0,2:T(8,128)(2,1)} convolution(%param_0, %param_1), window={size=2}, dim_labels=b0f_0io->bf0, metadata={op_name="jit(step)/while/body/dot_general"}
}

%body (p: (u32[], bf16[64,2,8], bf16[2,8,32])) -> (u32[], bf16[64,2,8], bf16[2,8,32]) {
  %p = (u32[]{:T(128)}, bf16[64,2,8]{2,1,0}, bf16[2,8,32]{2,1,0}) parameter(0)
  %constant.2 = u32[]{:T(128)} constant(2)
  %gte.0 = u32[]{:T(128)} get-tuple-element(%p), index=0
  %gte.1 = bf16[64,2,8]{2,1,0} get-tuple-element(%p), index=1
  %gte.2 = bf16[2,8,32]{2,1,0} get-tuple-element(%p), index=2
  %fusion.1 = bf16[64,32,1]{1,0,2} fusion(%gte.1, %gte.2), kind=kOutput, calls=%fused_conv
  %add.1 = u32[]{:T(128)} add(%gte.0, %constant.2)
  ROOT %tuple.1 = (u32[]{:T(128)}, bf16[64,2,8]{2,1,0}, bf16[2,8,32]{2,1,0}) tuple(%add.1, %gte.1, /*index=2*/%gte.2)
}

%cond (p.1: (u32[], bf16[64,2,8], bf16[2,8,32])) -> pred[] {
  %constant.16 = u32[]{:T(128)} constant(16)
  %p.1 = (u32[]{:T(128)}, bf16[64,2,8]{2,1,0}, bf16[2,8,32]{2,1,0}) parameter(0)
  %gte.3 = u32[]{:T(128)} get-tuple-element(%p.1), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte.3, %constant.16), direction=LT
}

ENTRY %main (a: bf16[64,2,8], b: bf16[2,8,32], x: bf16[64,16,1,1], w: bf16[4,7,8,16]) -> bf16[64,4,7,8] {
  %a = bf16[64,2,8]{2,1,0} parameter(0)
  %b = bf16[2,8,32]{2,1,0} parameter(1)
  %x = bf16[64,16,1,1]{3,2,1,0} parameter(2)
  %w = bf16[4,7,8,16]{3,2,1,0} parameter(3)
  %constant.0 = u32[]{:T(128)} constant(0)
  %copy.0 = u32[]{:T(128)} copy(%constant.0)
  %tuple.0 = (u32[]{:T(128)}, bf16[64,2,8]{2,1,0}, bf16[2,8,32]{2,1,0}) tuple(%copy.0, %a, %b)
  %while.1 = (u32[]{:T(128)}, bf16[64,2,8]{2,1,0}, bf16[2,8,32]{2,1,0}) while(%tuple.0), condition=%cond, body=%body
  ROOT %convolution.2 = bf16[64,4,7,8]{3,0,2,1} convolution(%x, %w), window={size=4x7 pad=3_3x6_6 rhs_reversal=1x1}, dim_labels=bf01_01oi->b01f, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}
}
"""


def test_dot_flops_of_tpu_style_hlo():
    loop = 8 * 2 * (64 * 32) * (2 * 8)  # 8 trips x 2 x outputs x (window 2 x 8 features)
    transposed = 2 * (64 * 4 * 7 * 8) * 16  # one window tap lands on the 1x1 input: 16 features summed
    assert hf.dot_flops_by_phase(TPU_HLO) == {"forward": loop, "backward": transposed}


def test_custom_kernels_are_named():
    line = ('  %splash_mqa_fwd.2.clone = (f32[4,512,128]{2,1,0}, bf16[4,7,4096,128]{3,2,1,0}) custom-call(%a, %b), '
            'custom_call_target="tpu_custom_call", backend_config={}')
    other = '  %custom-call.3 = bf16[8]{0} custom-call(%a), custom_call_target="AllocateBuffer"'
    assert hf.custom_kernel_names("\n".join([line, other, line])) == ["splash_mqa_fwd", "splash_mqa_fwd"]


def test_model_flops_by_hand():
    cfg = config_from_hf({**ct.SHAPES["Qwen2.5-7B"], "hidden_size": 64, "intermediate_size": 96, "vocab_size": 100,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    hd = 16  # 64 / 4 heads
    layer = 2 * 64 * (4 * hd) + 2 * 64 * (2 * hd) + 3 * 64 * 96  # q, o; k, v; gate, up, down
    rows, p, r = 3, 5, 7
    weights, attention = ct.model_flops(cfg, rows, p, r, backward=False)
    assert weights == 2 * rows * (2 * layer * (p + r) + 100 * 64 * r)  # the embedding gather counts nothing
    assert attention == 2 * rows * 2 * 4 * hd * (p + r) ** 2  # 4 x heads x hd x seq^2 / 2 per layer
    assert ct.model_flops(cfg, rows, p, r, backward=True) == (3 * weights, 3 * attention)
    w_value, a_value = ct.model_flops(cfg, rows, p, r, backward=False, value=True)
    assert (w_value - weights, a_value) == (2 * rows * (2 * layer * (p + r) + 64 * (p + r)), 2 * attention)


def test_parse_oom():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (36.29G) "
           "exceeds available HBM (15.75G).")
    assert ct.parse_oom(msg) == {"temp_bytes": int(36.29 * 2**30), "hbm_bytes": int(15.75 * 2**30)}
    assert ct.parse_oom("something else") == {}


def _run(target, args=TINY):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "compile_check.py"),
                           "--config=configs/grpo.py:full", f"--target={target}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_script_on_simulated_cpu_devices():
    out = _run("cpu:2")
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert LAST_LINE.match(lines[-1]) and lines[-1].startswith("fits=yes")
    assert "2 x cpu" in out.stdout and "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in out.stdout  # full: FSDP over all devices
    assert "### update step" in out.stdout and "### log-prob pass" in out.stdout
    model = [tuple(map(float, m)) for m in re.findall(
        r"model FLOPs ([\d.]+) MFLOP = weight matmuls ([\d.]+) MFLOP \+ causal attention ([\d.]+) MFLOP", out.stdout)]
    hlo = [tuple(map(float, m)) for m in re.findall(r"compiled matmul FLOPs ([\d.]+) MFLOP \(all devices; forward "
                                                    r"([\d.]+) MFLOP", out.stdout)]
    assert len(model) == len(hlo) == 2, out.stdout
    (_, w_upd, a_upd), (_, w_fwd, a_fwd) = model
    # The log-prob pass is one forward; XLA:CPU's einsum attention computes the whole square (twice the causal count).
    assert hlo[1][0] == pytest.approx(w_fwd + 2 * a_fwd, rel=1e-3)
    assert hlo[0][1] == pytest.approx((w_upd + 2 * a_upd) / 3, rel=1e-3)  # the update's forward, same count


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


def test_rollout_candidates_and_search():
    assert cr.candidates(24, 4, 2) == [24, 12, 8, 4]  # multiples of the group (and of the row shards) dividing 24
    assert cr.candidates(8192, 16, 32)[:3] == [8192, 4096, 2048] and cr.candidates(8192, 16, 32)[-1] == 32
    assert cr.candidates(48, 6, 4) == [48, 24, 12]  # multiples of lcm(6, 4) = 12
    assert cr.candidates(48, 6, 4, whole_groups=True) == [48, 24]  # a whole group of 6 on each of 4 shards
    assert cr.slots_per_row(16, 64, 4, True) == 68 and cr.slots_per_row(16, 64, 4, False) == 80
    cands = [256, 128, 64, 32]
    assert cr.start_index(cands, 1.0, 100.0) == 2 and cr.start_index(cands, 1.0, 10.0) == 3
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 100

    assert cr.search(fits, cands, 0, 3) == ({256: False, 128: False, 64: True}, 64)
    tried.clear()
    assert cr.search(fits, cands, 3, 3) == ({32: True, 64: True, 128: False}, 64) and tried == [32, 64, 128]
    assert cr.search(fits, cands, 0, 1) == ({256: False}, None)


# Two layers, 4 kv heads of 16, 8 prompts x 4 samples of 16 + 64 tokens (one decode segment) on 8 devices; every
# row's cache holds its prompt (no shared-prefix decode), whose buffers the test finds by the estimate's size.
ROLLOUT = ["--model=Qwen2.5-0.5B", "--layers=2", "--config.model.hidden_size=64",
           "--config.model.intermediate_size=128",
           "--config.model.num_heads=4", "--config.model.num_kv_heads=4", "--config.model.vocab_size=512",
           "--config.rollout.prompts_per_step=8", "--config.rollout.group_size=4", "--config.rollout.max_prompt_len=16",
           "--config.rollout.max_new_tokens=64", "--config.rollout.share_prefix=False", "--top=4", "--what=rollout",
           "--rollout_tries=1"]


def test_rollout_compile_on_cpu_devices():
    out = _run("cpu:8", ROLLOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert LAST_LINE.match(lines[-1]) and lines[-1].startswith("fits=yes")
    assert "rollout.sample_batch_rows=32" in lines and "sub-batch candidates [32, 16, 8]" in out.stdout
    cfg = config_from_hf({**ct.SHAPES["Qwen2.5-0.5B"], "num_hidden_layers": 2, "hidden_size": 64,
                          "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
                          "vocab_size": 512})
    kv = cr.kv_cache_bytes(cfg, 32, 80, 8)  # bf16 K and V of 4 rows per device
    assert kv == 2 * 2 * 4 * 4 * 16 * 80 * 2
    # XLA:CPU stores the bf16 cache as float32: the K and the V buffers are each as large as the bf16 estimate.
    cache = [ln for ln in lines if re.search(r"GiB  f32\[", ln) and np.prod(
        [int(d) for d in re.search(r"f32\[([0-9,]+)\]", ln).group(1).split(",")]) * 4 == kv]
    assert len(cache) >= 2, out.stdout
    ratio = float(re.search(r"\((\d+\.\d+) x the KV cache estimate\)", out.stdout).group(1))
    assert 2.0 <= ratio <= 8.0  # float32 storage (2x), the cache carried through the loop, logits, activations
