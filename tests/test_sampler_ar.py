"""AR sampler (sampling/autoregressive.py) vs transformers' generate, a naive uncached loop, and full forwards."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxrl_reason.core import hapo
from jaxrl_reason.models import attention as A
from jaxrl_reason.models import hf, shared_prefix, sharding
from jaxrl_reason.sampling import autoregressive as ar
from jaxrl_reason.sampling import compaction
from jaxrl_reason.sampling import processors as pr
from jaxrl_reason.sampling.types import STEP_MAP_PAD

V, PAD, P, R = 128, 0, 7, 10
SAMPLED = pr.SamplingParams(temperature=0.8, top_k=40, top_p=0.95, hapo_tau=0.1)
EOS_SAMPLED = tuple(range(100, 128))  # many stop ids, so that some rows stop early under sampling
SEG = 3  # decode segments of 3 steps in the sampled fixture: 4 segments for R = 10, the last one partial


def _hf_model(arch, seed):
    torch.manual_seed(seed)
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    with torch.no_grad():  # larger weights than the default init: peaked, well separated logits
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3)
            if "norm" in name:
                p.add_(1.0)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for arch, seed in (("Qwen2", 0), ("Llama", 1)):
        path = str(tmp_path_factory.mktemp(arch))
        torch_model = _hf_model(arch, seed)
        torch_model.save_pretrained(path)
        out[arch] = (torch_model, hf.load_hf(path)[0])
        if arch == "Qwen2":  # stacked layer params, decoded by a scan over layers with a stacked KV cache
            out[arch + "-scan"] = (torch_model, hf.load_hf(path, scan_layers=True)[0])
    return out


def _prompts(b=8, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, P + 1, b)
    lens[0] = P
    valid = np.arange(P)[None, :] >= (P - lens)[:, None]  # LEFT padded
    return np.where(valid, rng.integers(3, 100, (b, P)), PAD).astype(np.int32), valid


def _hf_generate(torch_model, tokens, valid, eos):
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                   attention_mask=torch.tensor(valid, dtype=torch.long), do_sample=False,
                                   max_new_tokens=R, min_new_tokens=0, pad_token_id=PAD, eos_token_id=eos)
    gen = out[:, tokens.shape[1]:].numpy()
    return np.pad(gen, ((0, 0), (0, R - gen.shape[1])), constant_values=PAD)


def _full_forward_logits(model, prompt_tokens, prompt_mask, tokens_BxR, response_mask_BxR):
    """Logits predicting each response slot from ONE uncached causal forward over [prompt; response]."""
    graphdef, state = nnx.split(model, nnx.Param)
    return _forward(graphdef, state, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask), jnp.asarray(tokens_BxR),
                    jnp.asarray(response_mask_BxR))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, prompt_tokens, prompt_mask, tokens_BxR, response_mask_BxR):
    seq = jnp.concatenate([prompt_tokens, tokens_BxR], axis=1)
    valid = jnp.concatenate([prompt_mask, response_mask_BxR], axis=1)
    logits, _ = nnx.merge(graphdef, state)(seq, A.positions_from_mask(valid), A.causal_mask(valid))
    return logits[:, P - 1:-1]


_sample = jax.jit(pr.sample_logits, static_argnums=2)


def _naive_loop(model, tokens, valid, key, params, eos_ids, stats):
    """Reference: recompute the whole forward (no cache) at every step; same per-step keys and stop rule."""
    b = tokens.shape[0]
    resp, rmask = np.full((b, R), PAD, np.int32), np.zeros((b, R), bool)
    done = np.zeros(b, bool)
    for t in range(R):
        logits = _full_forward_logits(model, tokens, valid, resp, rmask)[:, t]
        tok = np.asarray(_sample(jax.random.fold_in(key, t), logits, params, stats).token)
        resp[:, t] = np.where(done, PAD, tok)
        rmask[:, t] = ~done
        done |= np.isin(tok, eos_ids)
        if done.all():
            break
    return resp, rmask


@pytest.mark.parametrize("arch,segment_len", [("Qwen2", None), ("Llama", 4), ("Qwen2-scan", 4)])
def test_greedy_matches_transformers_generate(models, arch, segment_len):
    """Token for token equal to transformers' generate(do_sample=False) on a LEFT-padded batch, with an EOS
    that stops some rows early (transformers pads finished rows with pad_token_id, as we do); one decode
    segment (the default for R = 10) and three (4 + 4 + 2 steps)."""
    torch_model, model = models[arch]
    tokens, valid = _prompts(8, seed=1)
    eos = int(_hf_generate(torch_model, tokens, valid, 2)[0, 3])  # row 0 stops at its 4th token at the latest
    want = _hf_generate(torch_model, tokens, valid, eos)
    ro = ar.generate(model, tokens, valid, jax.random.key(0), max_new_tokens=R, eos_ids=(eos,), pad_id=PAD,
                     params=pr.SamplingParams(greedy=True), segment_len=segment_len)
    np.testing.assert_array_equal(np.asarray(ro.tokens_BxR), want)
    length = np.asarray(ro.length_B)
    assert length[0] <= 4 and not ro.truncated_B[0] and (length == R).any(), length
    np.testing.assert_array_equal(np.asarray(ro.logp_BxR), 0.0)


@pytest.fixture(scope="module")
def sampled(models):
    """One sampled rollout (temperature, top-k, top-p, HAPO temperature, stop ids) of the Qwen2 model, decoded
    in segments of SEG steps (the references below know nothing of segments)."""
    model = models["Qwen2"][1]
    tokens, valid = _prompts(8)
    ent = jax.random.uniform(jax.random.key(5), (4, 16), minval=0.01, maxval=3.0)
    stats = hapo.entropy_stats(ent, jnp.ones((4, 16)))
    graphdef, state = nnx.split(model, nnx.Param)
    fn = ar.make_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED, pad_id=PAD,
                             params=SAMPLED, segment_len=SEG)
    key = jax.random.key(42)
    return dict(model=model, tokens=tokens, valid=valid, stats=stats, fn=fn, state=state, key=key,
                rollout=fn(state, tokens, valid, key, stats))


def test_cached_sampling_equals_naive_recompute(sampled):
    ro = sampled["rollout"]
    length = np.asarray(ro.length_B)
    assert (length < R).any() and (length == R).any(), length  # the case exercises stops and truncation
    resp, rmask = _naive_loop(sampled["model"], sampled["tokens"], sampled["valid"], sampled["key"], SAMPLED,
                              EOS_SAMPLED, sampled["stats"])
    np.testing.assert_array_equal(np.asarray(ro.tokens_BxR), resp)
    np.testing.assert_array_equal(np.asarray(ro.response_mask_BxR), rmask)


def _np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def test_logps_and_entropy_match_full_forward(sampled):
    ro, stats = sampled["rollout"], sampled["stats"]
    logits = _full_forward_logits(sampled["model"], ro.prompt_tokens_BxP, ro.prompt_mask_BxP, ro.tokens_BxR,
                                  ro.response_mask_BxR)
    m = np.asarray(ro.response_mask_BxR)
    tok = np.asarray(ro.tokens_BxR)[..., None]
    proc = np.asarray(jax.jit(pr.process_logits, static_argnums=1)(logits, SAMPLED, stats), np.float64)
    raw, proc = _np_log_softmax(np.asarray(logits, np.float64)), _np_log_softmax(proc)
    want = {"logp_raw_BxR": np.take_along_axis(raw, tok, -1)[..., 0],
            "logp_BxR": np.take_along_axis(proc, tok, -1)[..., 0],
            "entropy_BxR": -np.sum(np.exp(raw) * raw, axis=-1)}
    for name, value in want.items():
        got = np.asarray(getattr(ro, name))
        np.testing.assert_allclose(got[m], np.asarray(value)[m], atol=2e-5, err_msg=name)
        assert np.all(got[~m] == 0.0), name
    assert not np.allclose(np.asarray(ro.logp_BxR)[m], np.asarray(ro.logp_raw_BxR)[m], atol=1e-3)
    np.testing.assert_allclose(np.asarray(ro.confidence_BxR)[m], np.exp(np.asarray(ro.logp_BxR))[m], rtol=1e-6)


def test_rollout_fields(sampled):
    ro = sampled["rollout"]
    m, tok, length = np.asarray(ro.response_mask_BxR), np.asarray(ro.tokens_BxR), np.asarray(ro.length_B)
    np.testing.assert_array_equal(length, m.sum(-1))
    np.testing.assert_array_equal(m, np.arange(R)[None] < length[:, None])  # a prefix of the response
    assert np.all(tok[~m] == PAD)
    ends = tok[np.arange(len(tok)), np.maximum(length - 1, 0)]
    np.testing.assert_array_equal(np.asarray(ro.truncated_B), ~np.isin(ends, EOS_SAMPLED))
    np.testing.assert_array_equal(np.asarray(ro.step_map_BxR), np.where(m, np.arange(R)[None], STEP_MAP_PAD))
    np.testing.assert_array_equal(np.asarray(ro.prompt_tokens_BxP), sampled["tokens"])
    assert ro.tokens_BxR.dtype == jnp.int32 and ro.entropy_BxR.dtype == jnp.float32 and ro.truncated_B.dtype == bool


def test_deterministic_and_key_dependent(sampled):
    fn, state, tokens, valid, stats = (sampled[k] for k in ("fn", "state", "tokens", "valid", "stats"))
    again = fn(state, tokens, valid, sampled["key"], stats)
    jax.tree.map(np.testing.assert_array_equal, again, sampled["rollout"])
    other = fn(state, tokens, valid, jax.random.key(7), stats)
    assert not np.array_equal(np.asarray(other.tokens_BxR), np.asarray(sampled["rollout"].tokens_BxR))


@pytest.mark.devices(8)
def test_sharded_equals_unsharded(sampled):
    mesh = sharding.make_mesh(2, 2, 2)
    state = sharding.shard_state(sampled["state"], mesh)
    put = lambda x: jax.device_put(jnp.asarray(x), sharding.batch_sharding(mesh, 2))  # noqa: E731
    ro = sampled["fn"](state, put(sampled["tokens"]), put(sampled["valid"]), sampled["key"], sampled["stats"])
    assert len(ro.tokens_BxR.sharding.device_set) == 8
    assert ro.tokens_BxR.sharding.spec == jax.P(("data", "fsdp"), None)  # rows over 4 devices, each on 2
    ref = sampled["rollout"]
    np.testing.assert_array_equal(np.asarray(ro.tokens_BxR), np.asarray(ref.tokens_BxR))
    np.testing.assert_allclose(np.asarray(ro.logp_BxR), np.asarray(ref.logp_BxR), atol=1e-5)


def test_groups_are_contiguous_and_short_prompts_are_padded(sampled):
    """generate(n_samples=4): rows 4b..4b+3 answer prompt b; a narrower prompt batch is left-padded to P."""
    tokens, valid = sampled["tokens"][:2, 2:], sampled["valid"][:2, 2:]  # width P - 2, still LEFT padded
    ro = ar.generate(sampled["model"], tokens, valid, jax.random.key(3), n_samples=4, max_new_tokens=R,
                     eos_ids=EOS_SAMPLED, pad_id=PAD, params=SAMPLED, max_prompt_len=P,
                     hapo_stats=sampled["stats"], segment_len=SEG)  # same shapes and arguments as `sampled`: no recompilation
    np.testing.assert_array_equal(np.asarray(ro.prompt_tokens_BxP)[:, 2:], np.repeat(tokens, 4, axis=0))
    np.testing.assert_array_equal(np.asarray(ro.prompt_mask_BxP)[:, :2], False)
    resp = np.asarray(ro.tokens_BxR)
    assert resp.shape == (8, R) and not np.array_equal(resp[0], resp[1])


def _one_sentence(msg):
    return msg.endswith(".") and "\n" not in msg


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_prompt_len=3), "max_prompt_len is 3"),
    (dict(params=pr.SamplingParams(order=("temperature", "nucleus"))), "Unknown logits processor 'nucleus'"),
    (dict(params=pr.SamplingParams(top_p=0.0)), "top_p"),
    (dict(eos_ids=(-1,)), "eos_ids"),
    (dict(n_samples=0), "n_samples"),
    (dict(segment_len=0), "segment_len"),
])
def test_bad_arguments_raise_one_sentence(models, kwargs, match):
    tokens, valid = _prompts(2)
    args = dict(max_new_tokens=R, eos_ids=(2,), pad_id=PAD, params=pr.SamplingParams(greedy=True)) | kwargs
    with pytest.raises(ValueError, match=match) as e:
        ar.generate(models["Llama"][1], tokens, valid, jax.random.key(0), **args)
    assert _one_sentence(str(e.value)), str(e.value)


def test_jitted_function_is_cached(models):
    graphdef, _ = nnx.split(models["Llama"][1], nnx.Param)
    kw = dict(max_prompt_len=P, max_new_tokens=R, eos_ids=[2], pad_id=PAD, params=pr.SamplingParams())
    assert ar.make_generate_fn(graphdef, **kw) is ar.make_generate_fn(graphdef, **kw)


def test_segments_do_not_change_the_rollout(sampled):
    """One segment of R steps (a cache of P + R slots throughout) gives the fields of SEG-step segments."""
    graphdef, _ = nnx.split(sampled["model"], nnx.Param)
    fn = ar.make_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED, pad_id=PAD,
                             params=SAMPLED, segment_len=R)
    one = fn(sampled["state"], sampled["tokens"], sampled["valid"], sampled["key"], sampled["stats"])
    ref = sampled["rollout"]
    for name in ("tokens_BxR", "response_mask_BxR", "length_B", "truncated_B", "step_map_BxR"):
        np.testing.assert_array_equal(np.asarray(getattr(one, name)), np.asarray(getattr(ref, name)), err_msg=name)
    for name in ("logp_BxR", "logp_raw_BxR", "entropy_BxR", "confidence_BxR"):
        np.testing.assert_allclose(np.asarray(getattr(one, name)), np.asarray(getattr(ref, name)), atol=1e-5,
                                   err_msg=name)


@pytest.mark.parametrize("lanes", [2, 4])
def test_lanes_equal_one_lane_per_slice(sampled, lanes):
    """lanes=k: rows of lane l are the one-lane sampler on the l-th k-th of the batch with key fold_in(key, l)."""
    graphdef, _ = nnx.split(sampled["model"], nnx.Param)
    fn = ar.make_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED, pad_id=PAD,
                             params=SAMPLED, segment_len=SEG, lanes=lanes)
    got = fn(sampled["state"], sampled["tokens"], sampled["valid"], sampled["key"], sampled["stats"])
    rows = len(sampled["tokens"]) // lanes
    halves = [sampled["fn"](sampled["state"], sampled["tokens"][sl], sampled["valid"][sl],
                            jax.random.fold_in(sampled["key"], lane), sampled["stats"])
              for lane, sl in enumerate(slice(i * rows, (i + 1) * rows) for i in range(lanes))]
    for name in ("tokens_BxR", "response_mask_BxR", "length_B", "truncated_B"):
        want = np.concatenate([np.asarray(getattr(h, name)) for h in halves])
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), want, err_msg=name)
    np.testing.assert_allclose(np.asarray(got.logp_BxR), np.concatenate([np.asarray(h.logp_BxR) for h in halves]),
                               atol=1e-5)
    with pytest.raises(ValueError, match="does not split into 3 equal lanes"):
        ar.make_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED, pad_id=PAD,
                            params=SAMPLED, lanes=3)(sampled["state"], sampled["tokens"], sampled["valid"],
                                                     sampled["key"])
    with pytest.raises(ValueError, match="lanes must be a positive int"):
        ar.make_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED, pad_id=PAD,
                            params=SAMPLED, lanes=0)


def test_default_segment_len():
    # one segment up to 64 new tokens; then ceil(R / 4) steps per segment, never fewer than 64
    assert [ar.default_segment_len(r) for r in (1, 10, 64, 200, 256, 257, 1024)] == [64, 64, 64, 64, 64, 65, 256]


@pytest.mark.parametrize("arch", ["Qwen2", "Qwen2-scan"])
def test_shared_prefill_greedy_matches_transformers(models, arch):
    """Each prompt prefilled once, its cache copied to its 4 samples: still transformers' greedy tokens."""
    torch_model, model = models[arch]
    tokens, valid = _prompts(2, seed=1)
    want = _hf_generate(torch_model, np.repeat(tokens, 4, axis=0), np.repeat(valid, 4, axis=0), 2)
    ro = ar.generate(model, tokens, valid, jax.random.key(0), n_samples=4, max_new_tokens=R, eos_ids=(2,),
                     pad_id=PAD, params=pr.SamplingParams(greedy=True), share_prefill=True)
    np.testing.assert_array_equal(np.asarray(ro.tokens_BxR), want)


def test_shared_prefill_equals_repeated_prompts_when_sampling(sampled):
    """Same per-row noise (same key, same row order): the tokens of prefilling all 8 rows, log-probs to float
    rounding; groups of 4 rows must not straddle a lane."""
    graphdef, _ = nnx.split(sampled["model"], nnx.Param)
    tokens, valid = np.repeat(sampled["tokens"][:2], 4, axis=0), np.repeat(sampled["valid"][:2], 4, axis=0)
    kw = dict(max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED, pad_id=PAD, params=SAMPLED, segment_len=SEG)
    shared = ar.make_generate_fn(graphdef, group_size=4, share_prefill=True, **kw)
    got = shared(sampled["state"], tokens, valid, sampled["key"], sampled["stats"])
    ref = sampled["fn"](sampled["state"], tokens, valid, sampled["key"], sampled["stats"])
    for name in ("tokens_BxR", "response_mask_BxR", "length_B", "truncated_B"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)), err_msg=name)
    assert len(set(map(tuple, np.asarray(got.tokens_BxR)[:4]))) > 1  # the group's samples differ
    for name in ("logp_BxR", "logp_raw_BxR", "entropy_BxR"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)), atol=1e-5,
                                   err_msg=name)
    with pytest.raises(ValueError, match="whole groups of 4 rows in each of the 4 lanes"):
        ar.make_generate_fn(graphdef, group_size=4, share_prefill=True, lanes=4, **kw)(
            sampled["state"], tokens, valid, sampled["key"])
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        ar.make_generate_fn(graphdef, group_size=0, **kw)


@pytest.mark.devices(8)
def test_rows_are_sharded_over_the_batch_axes(sampled):
    """Under a (8, 1, 1) data mesh each device decodes B / 8 rows: the outputs are rows-over-(data, fsdp) and
    the compiled program's arrays are per-device [1, R] (the unsharded one's [B, R])."""
    mesh = sharding.make_mesh(8, 1, 1)
    state = sharding.shard_state(sampled["state"], mesh)
    args = (jnp.asarray(sampled["tokens"]), jnp.asarray(sampled["valid"]), sampled["key"], sampled["stats"])
    ro = sampled["fn"](state, *args)
    assert ro.tokens_BxR.sharding.spec == jax.P(("data", "fsdp"), None)
    assert ro.length_B.sharding.spec == jax.P(("data", "fsdp"))
    ref = sampled["rollout"]
    np.testing.assert_array_equal(np.asarray(ro.tokens_BxR), np.asarray(ref.tokens_BxR))
    np.testing.assert_allclose(np.asarray(ro.logp_BxR), np.asarray(ref.logp_BxR), atol=1e-5)
    sharded = sampled["fn"].lower(state, *args).compile().as_text()
    whole = sampled["fn"].lower(sampled["state"], *args).compile().as_text()
    assert f"s32[1,{R}]" in sharded and f"s32[8,{R}]" not in sharded
    assert f"s32[8,{R}]" in whole


@pytest.mark.parametrize("arch", ["Llama", "Qwen2-scan"])
def test_compacted_greedy_matches_transformers(models, arch):
    """Finished rows dropped between segments of 3 steps (many stop ids, so most rows stop early): still
    transformers' tokens, and fewer row-steps decoded than the batch times the steps."""
    torch_model, model = models[arch]
    tokens, valid = _prompts(8, seed=1)
    want = _hf_generate(torch_model, tokens, valid, list(EOS_SAMPLED))
    graphdef, state = nnx.split(model, nnx.Param)
    fn = compaction.make_compacting_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED,
                                                pad_id=PAD, params=pr.SamplingParams(greedy=True), segment_len=SEG)
    ro = fn(state, tokens, valid, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(ro.tokens_BxR), want)
    assert fn.last_stats["row_steps"] < fn.last_stats["full_row_steps"], fn.last_stats
    assert min(fn.last_stats["rows_per_segment"]) < 8, fn.last_stats


def _naive_per_row_loop(model, tokens, valid, key, params, eos_ids, stats):
    """Reference: full forward at every step; row i samples step t alone with fold_in(fold_in(key, t), i)."""
    b = tokens.shape[0]
    resp, rmask, logp = np.full((b, R), PAD, np.int32), np.zeros((b, R), bool), np.zeros((b, R), np.float32)
    done = np.zeros(b, bool)
    for t in range(R):
        logits = _full_forward_logits(model, tokens, valid, resp, rmask)[:, t]
        s = [_sample(jax.random.fold_in(jax.random.fold_in(key, t), i), logits[i:i + 1], params, stats)
             for i in range(b)]
        tok = np.asarray([int(x.token[0]) for x in s])
        resp[:, t], rmask[:, t] = np.where(done, PAD, tok), ~done
        logp[:, t] = np.where(done, 0.0, [float(x.logp[0]) for x in s])
        done |= np.isin(tok, eos_ids)
    return resp, rmask, logp


def test_compacted_sampling_equals_naive_per_row_noise(sampled):
    """Sampled rows follow their own noise wherever compaction puts them; with shared prefill over groups of 4."""
    graphdef, _ = nnx.split(sampled["model"], nnx.Param)
    tokens, valid = np.repeat(sampled["tokens"][:2], 4, axis=0), np.repeat(sampled["valid"][:2], 4, axis=0)
    fn = compaction.make_compacting_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED,
                                                pad_id=PAD, params=SAMPLED, segment_len=SEG, group_size=4,
                                                share_prefill=True)
    ro = fn(sampled["state"], tokens, valid, sampled["key"], sampled["stats"])
    assert min(fn.last_stats["rows_per_segment"]) < 8, fn.last_stats
    resp, rmask, logp = _naive_per_row_loop(sampled["model"], tokens, valid, sampled["key"], SAMPLED, EOS_SAMPLED,
                                            sampled["stats"])
    np.testing.assert_array_equal(np.asarray(ro.tokens_BxR), resp)
    np.testing.assert_array_equal(np.asarray(ro.response_mask_BxR), rmask)
    np.testing.assert_allclose(np.asarray(ro.logp_BxR), logp, atol=2e-5)
    with pytest.raises(ValueError, match="one lane"):
        compaction.make_compacting_generate_fn(graphdef, max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED,
                                               pad_id=PAD, params=SAMPLED, lanes=2)


def test_shared_prefix_attention_equals_softmax_attention():
    """Two score blocks (a group's prompt keys, a row's own keys) under one softmax == plain softmax attention over
    [prompt; own] keys per row (numpy, float64), GQA with 2 query heads per kv head; a row seeing nothing -> 0."""
    rng = np.random.default_rng(0)
    groups, g_rows, t, n, kv, h, p, s = 2, 3, 2, 4, 2, 8, 5, 4
    b = groups * g_rows
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    pk, pv = rng.normal(size=(groups, kv, h, p)), rng.normal(size=(groups, kv, p, h))
    ok, ov = rng.normal(size=(b, kv, h, s)), rng.normal(size=(b, kv, s, h))
    prompt_valid, own = rng.random((groups, p)) < 0.7, rng.random((b, t, s)) < 0.6
    prompt_valid[1], own[4, 1] = False, False  # row 4 (group 1), query 1: no visible key
    mask = shared_prefix.PrefixMask(jnp.asarray(prompt_valid), jnp.asarray(own))
    got = shared_prefix.attend(jnp.asarray(q), *(jnp.asarray(x, jnp.float32) for x in (pk, pv, ok, ov)), mask)
    k_all = np.concatenate([np.repeat(pk, g_rows, 0), ok], -1)  # [B, K, H, P + S]
    v_all = np.concatenate([np.repeat(pv, g_rows, 0), ov], -2)
    valid = np.concatenate([np.broadcast_to(np.repeat(prompt_valid, g_rows, 0)[:, None], (b, t, p)), own], -1)
    want = np.zeros((b, t, n, h))
    for i, j, head in np.ndindex(b, t, n):
        k, v = k_all[i, head // (n // kv)], v_all[i, head // (n // kv)]
        scores = q[i, j, head].astype(np.float64) @ k / np.sqrt(h)
        if valid[i, j].any():
            e = np.where(valid[i, j], np.exp(scores - scores[valid[i, j]].max()), 0.0)
            want[i, j, head] = e / e.sum() @ v
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert np.all(np.asarray(got)[4, 1] == 0.0) and np.abs(want[4, 0]).sum() > 0
    with pytest.raises(ValueError, match="do not split into the 4 groups"):
        shared_prefix.attend(jnp.asarray(q), *(jnp.asarray(np.concatenate([x, x]), jnp.float32) for x in (pk, pv)),
                             jnp.asarray(ok), jnp.asarray(ov), mask)


@pytest.mark.parametrize("arch", ["Llama", "Qwen2-scan"])
def test_shared_prefix_greedy_matches_transformers(models, arch):
    """Prompt K/V kept once per group of 4, three decode segments (4 + 4 + 2 steps), GQA, unrolled and scanned
    layers: transformers' greedy tokens."""
    torch_model, model = models[arch]
    tokens, valid = _prompts(2, seed=1)
    want = _hf_generate(torch_model, np.repeat(tokens, 4, axis=0), np.repeat(valid, 4, axis=0), 2)
    ro = ar.generate(model, tokens, valid, jax.random.key(0), n_samples=4, max_new_tokens=R, eos_ids=(2,),
                     pad_id=PAD, params=pr.SamplingParams(greedy=True), segment_len=4, share_prefill=True,
                     share_prefix=True)
    np.testing.assert_array_equal(np.asarray(ro.tokens_BxR), want)


def test_shared_prefix_equals_every_row_prefilled_when_sampling(sampled):
    """Same key, same rows: the tokens of the sampler that prefills and decodes every row, log-probs to float
    rounding (segments of SEG steps); refused where groups would be split or compacted."""
    graphdef, _ = nnx.split(sampled["model"], nnx.Param)
    tokens, valid = np.repeat(sampled["tokens"][:2], 4, axis=0), np.repeat(sampled["valid"][:2], 4, axis=0)
    kw = dict(max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED, pad_id=PAD, params=SAMPLED, segment_len=SEG)
    fn = ar.make_generate_fn(graphdef, group_size=4, share_prefill=True, share_prefix=True, **kw)
    got = fn(sampled["state"], tokens, valid, sampled["key"], sampled["stats"])
    ref = sampled["fn"](sampled["state"], tokens, valid, sampled["key"], sampled["stats"])
    for name in ("tokens_BxR", "response_mask_BxR", "length_B", "truncated_B"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)), err_msg=name)
    length = np.asarray(got.length_B)
    assert len(set(map(tuple, np.asarray(got.tokens_BxR)[:4]))) > 1 and (length > SEG).any()  # crosses a segment
    for name in ("logp_BxR", "logp_raw_BxR", "entropy_BxR"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)), atol=1e-5,
                                   err_msg=name)
    with pytest.raises(ValueError, match="set share_prefill too"):
        ar.make_generate_fn(graphdef, group_size=4, share_prefix=True, **kw)
    with pytest.raises(ValueError, match="whole groups of 4 rows in each of the 4 lanes"):
        ar.make_generate_fn(graphdef, group_size=4, share_prefill=True, share_prefix=True, lanes=4, **kw)(
            sampled["state"], tokens, valid, sampled["key"])
    with pytest.raises(ValueError, match="Compacting rows breaks the groups"):
        compaction.make_compacting_generate_fn(graphdef, group_size=4, share_prefill=True, share_prefix=True, **kw)


@pytest.mark.devices(8)
def test_shared_prefix_rows_sharded_by_whole_groups(sampled):
    """On a (2, 2, 2) mesh, groups of 2 rows: each of the 4 row shards holds whole groups (the prompt part is
    split over the same axes by groups) and the rollout equals the unsharded one; groups of 4 would straddle
    shards and are refused."""
    graphdef, _ = nnx.split(sampled["model"], nnx.Param)
    tokens, valid = np.repeat(sampled["tokens"][:4], 2, axis=0), np.repeat(sampled["valid"][:4], 2, axis=0)
    kw = dict(max_prompt_len=P, max_new_tokens=R, eos_ids=EOS_SAMPLED, pad_id=PAD, params=SAMPLED, segment_len=SEG,
              share_prefill=True, share_prefix=True)
    fn = ar.make_generate_fn(graphdef, group_size=2, **kw)
    mesh = sharding.make_mesh(2, 2, 2)
    state = sharding.shard_state(sampled["state"], mesh)
    ro = fn(state, tokens, valid, sampled["key"], sampled["stats"])
    assert ro.tokens_BxR.sharding.spec == jax.P(("data", "fsdp"), None)
    ref = fn(sampled["state"], tokens, valid, sampled["key"], sampled["stats"])
    np.testing.assert_array_equal(np.asarray(ro.tokens_BxR), np.asarray(ref.tokens_BxR))
    np.testing.assert_allclose(np.asarray(ro.logp_BxR), np.asarray(ref.logp_BxR), atol=1e-5)
    with pytest.raises(ValueError, match="whole groups of 4 rows on each of the 4 row shards"):
        ar.make_generate_fn(graphdef, group_size=4, **kw)(state, tokens, valid, sampled["key"])
