"""Tests for train/diffusion_policy.py and methods/tracerl.py on tiny random models over the char tokenizer.

References written here: the per-step naive block-causal forward of the sampler's trajectory (numpy mask), the
TraceRL two-stream attention table by brute force, the population z-score by hand and by numpy, and the d1 input
fed straight to the model.
"""
import functools
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx


from jaxrl_reason.core import diffusion as diff_lib
from jaxrl_reason.data.tokenizer import build_char_tokenizer
from jaxrl_reason.methods import tracerl as M
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.models.value import ValueModel
from jaxrl_reason.sampling.diffusion import make_block_generate_fn, make_llada_generate_fn
from jaxrl_reason.sampling.processors import SamplingParams
from jaxrl_reason.sampling.types import STEP_MAP_PAD
from jaxrl_reason.train import build
from jaxrl_reason.train import diffusion_policy as T
from jaxrl_reason.train.contracts import Rows
from jaxrl_reason.train.state import init_train_state
from jaxrl_reason.train.step import SUMMED, make_train_step, split_micro_batches

P, R, BS, N, G = 8, 12, 4, 8, 4
REWARD = np.array([1, 0, 0, 1, 1, 1, 1, 1], np.float32)


@functools.lru_cache(maxsize=None)
def _tok():
    return build_char_tokenizer(tempfile.mkdtemp(prefix="tracerl_tok_"))


@functools.lru_cache(maxsize=None)
def _model(attn: str):
    tok = _tok()
    cfg = TransformerConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                            num_kv_heads=1, head_dim=16, attention=attn, block_size=BS if attn == "block" else 1,
                            mask_token_id=tok.mask_token_id)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.lm_head[...] = model.lm_head[...] * 8.0  # peaked predictions: the threshold commits several tokens
    return model


def _prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, len(_tok()), (N, P)).astype(np.int32)
    mask = np.ones((N, P), bool)
    for i in range(N):
        mask[i, : i % 5] = False  # left padding of different widths
    return np.where(mask, ids, _tok().pad_token_id), mask


def _rows(ro):
    ro = jax.device_get(ro)
    n = np.shape(ro.tokens_BxR)[0]
    return Rows(prompt_tokens_NxP=np.asarray(ro.prompt_tokens_BxP), prompt_mask_NxP=np.asarray(ro.prompt_mask_BxP),
                tokens_NxR=np.asarray(ro.tokens_BxR), response_mask_NxR=np.asarray(ro.response_mask_BxR),
                logp_sampler_NxR=np.asarray(ro.logp_BxR), logp_sampler_raw_NxR=np.asarray(ro.logp_raw_BxR),
                entropy_NxR=np.asarray(ro.entropy_BxR), length_N=np.asarray(ro.length_B),
                truncated_N=np.asarray(ro.truncated_B), score_N=REWARD.copy(), example_index_N=np.arange(n),
                answer_N=np.full(n, ""), step_map_NxR=np.asarray(ro.step_map_BxR), reward_N=REWARD.copy())


# An EOS id outside the vocabulary: every response runs the full budget, and `diffusion_parts` with this id builds
# the very same compiled sampler (one compilation for the whole file).
NO_EOS = 99


@functools.lru_cache(maxsize=None)
def _block_rollout():
    """Block KV-cache sampler, dynamic threshold 0.6, T = 1, no EOS."""
    g, params = nnx.split(_model("block"), nnx.Param)
    tok = _tok()
    fn = make_block_generate_fn(g, prompt_len=P, max_new_tokens=R, block_size=BS, steps_per_block=4,
                                mask_token_id=tok.mask_token_id, eos_ids=(NO_EOS,), pad_id=tok.pad_token_id,
                                sampling=SamplingParams(temperature=1.0), remasking="dynamic", threshold=0.6)
    return _rows(fn(params, *_prompts(), jax.random.PRNGKey(3))[0])


def _with_eos(rows, eos_at):
    """The rollout as if token `eos_at[n]` had been an EOS: later slots pad / not valid / STEP_MAP_PAD, exactly
    as the samplers finalize a response (sampling/diffusion.py `_finalize`)."""
    keep = np.arange(R)[None, :] <= np.asarray(eos_at)[:, None]
    return rows.replace(tokens_NxR=np.where(keep, rows.tokens_NxR, _tok().pad_token_id), response_mask_NxR=keep,
                        step_map_NxR=np.where(keep, rows.step_map_NxR, STEP_MAP_PAD))


def _spec(kind="block", shrink=1, num_rows=4, estimator="trace"):
    return T.TraceSpec(kind=kind, block_size=BS if kind == "block" else None, shrink=shrink, num_rows=num_rows,
                       mask_token_id=_tok().mask_token_id, group_size=G, estimator=estimator,
                       norm="response_len" if kind == "block" else "targets", forward_rows=16)


def _logp_fn(spec):
    return _logp_fn_of_kind(spec.kind)


@functools.lru_cache(maxsize=None)
def _logp_fn_of_kind(kind):
    """One compiled row_logp per model kind (it only reads spec.kind / block_size)."""
    graphdef = nnx.graphdef(_model("block" if kind == "block" else "bidirectional"))
    return jax.jit(functools.partial(T.row_logp, graphdef, _spec(kind, num_rows=1)))


def _block_causal(valid, p):
    """Numpy reference of the sampler's naive block-causal mask (response-aligned blocks, diagonal forced)."""
    idx = np.arange(valid.shape[0])
    blk = np.floor_divide(idx - p, BS)
    return (valid[None, :] & (blk[None, :] <= blk[:, None])) | np.eye(len(idx), dtype=bool)


def _dense_rank_in_block(step_row, j_block):
    steps = sorted(set(step_row[j_block * BS:(j_block + 1) * BS].tolist()))
    return {s: k for k, s in enumerate(steps)}


def test_noisy_stream_logits_equal_block_sampler_logits_at_each_step():
    """Row k's noisy-stream logits = the logits the block sampler saw at that denoising step (s = 1)."""
    rows, spec, model = _block_rollout(), _spec(), _model("block")
    assert rows.response_mask_NxR.all()
    g, params = nnx.split(model, nnx.Param)
    batch = T.pack_batch(rows, spec)
    logits_W = np.asarray(jax.jit(functools.partial(T.row_logits, g, spec))(params, batch))
    fwd = jax.jit(lambda x, pos, m: model(x, pos, m)[0])
    multi_token_steps, checked = 0, 0
    for n in range(N):
        sm = rows.step_map_NxR[n]
        for t in np.unique(sm):
            at_t = np.flatnonzero(sm == t)
            j = at_t[0] // BS
            assert np.all(at_t // BS == j)  # one decoding step touches one block
            multi_token_steps += len(at_t) > 1
            x = np.where(sm < t, rows.tokens_NxR[n], _tok().mask_token_id)
            valid = np.concatenate([rows.prompt_mask_NxP[n], np.ones(R, bool)])
            pos = np.maximum(np.cumsum(valid) - 1, 0)
            ref = fwd(np.concatenate([rows.prompt_tokens_NxP[n], x])[None], pos[None], _block_causal(valid, P)[None])
            ref = np.asarray(ref)[0, P + j * BS: P + (j + 1) * BS]
            k = _dense_rank_in_block(sm, j)[t]
            w = np.flatnonzero((batch["seq_index_W"] == n) & (batch["row_index_W"] == k) & batch["row_valid_W"])
            assert len(w) == 1
            np.testing.assert_allclose(logits_W[w[0], j * BS:(j + 1) * BS], ref, atol=2e-4, rtol=1e-4)
            checked += 1
    assert multi_token_steps > 0 and checked > N * (R // BS)  # the threshold did commit several tokens at once
    # and the KV-cached sampler's own log-probs of the committed tokens are the old log-probs of the rows
    b, _, _ = T.build_update_batch(rows, {"policy": params}, spec=spec, logp_fn=_logp_fn(spec))
    tgt, s = b["target_WxR"], b["seq_index_W"]
    np.testing.assert_allclose(b["logp_old_WxR"][tgt], rows.logp_sampler_raw_NxR[s][tgt], atol=1e-4)


def test_rows_targets_and_padding_from_a_rollout_with_eos():
    rows, spec = _with_eos(_block_rollout(), [5, 11, 0, 6, 9, 2, 11, 7]), _spec()
    assert (~rows.response_mask_NxR).any() and rows.response_mask_NxR.any(-1).all()
    g, params = nnx.split(_model("block"), nnx.Param)
    batch, metrics, entropy = T.build_update_batch(rows, {"policy": params}, spec=spec, logp_fn=_logp_fn(spec))
    w = batch["row_valid_W"].shape[0]
    assert w == spec.num_rows * N and entropy.shape == (N, R)
    real, tgt = batch["row_valid_W"], batch["target_WxR"]
    assert not tgt[~real].any() and tgt[real].any(-1).all()
    count = np.zeros((N, R), int)
    for i in np.flatnonzero(real):
        n, k = batch["seq_index_W"][i], batch["row_index_W"][i]
        count[n] += tgt[i]
        sm, valid = rows.step_map_NxR[n], rows.response_mask_NxR[n]
        for j in range(R // BS):
            blk = slice(j * BS, (j + 1) * BS)
            steps = sorted(set(sm[blk][valid[blk]].tolist()))
            rank = np.array([steps.index(v) if ok else 99 for v, ok in zip(sm[blk], valid[blk])])
            np.testing.assert_array_equal(tgt[i, blk], rank == k)
            want = np.where(rank < k, rows.tokens_NxR[n, blk], _tok().mask_token_id)
            np.testing.assert_array_equal(batch["noisy_WxR"][i, blk], want)
        np.testing.assert_array_equal(batch["clean_WxR"][i], rows.tokens_NxR[n])
    np.testing.assert_array_equal(count, rows.response_mask_NxR.astype(int))  # every valid token exactly once
    assert metrics["tracerl/rows"] == real.sum()
    z = np.array([1, -1, -1, 1, 0, 0, 0, 0]) / (1 + 2e-6)  # population std 0.5 -> +-1; all-equal group -> 0
    np.testing.assert_allclose(batch["adv_WxR"][real][:, 0], z[batch["seq_index_W"][real]], atol=1e-5)
    mbs = T.split_rows(batch, 2, np.random.default_rng(0))
    assert [len(mb["noisy_WxR"]) for mb in mbs] == [w // 2] * 2
    assert sum(int(mb["target_WxR"].any(-1).sum()) for mb in mbs) == real.sum()
    assert [mb["num_rows_W"][0] for mb in mbs] == [mb["target_WxR"].any(-1).sum() for mb in mbs]


def test_group_advantage_population_std_and_errors():
    np.testing.assert_allclose(T.group_advantage([3.0, 1.0, 2.0, 2.0], 4, eps=0.0),
                               np.array([1.0, -1.0, 0.0, 0.0]) / np.sqrt(0.5), rtol=1e-6)
    assert np.all(T.group_advantage([0.3] * 3, 3) == 0.0)
    # float64 on the host: within one float32 ulp of numpy's float64 z-score, for either std
    r = np.random.default_rng(0).random(48).astype(np.float32)
    for ddof in (0, 1):
        g = r.astype(np.float64).reshape(-1, 8)
        want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=ddof, keepdims=True) + 1e-6)).reshape(-1)
        got = T.group_advantage(r, 8, std_ddof=ddof)
        assert got.dtype == np.float32
        np.testing.assert_array_max_ulp(got, want.astype(np.float32), maxulp=1)
    with pytest.raises(ValueError, match="multiple of 4"):
        T.group_advantage([1.0, 0.0, 1.0], 4)


@functools.lru_cache(maxsize=None)
def _value_setup():
    """Policy + value model (random, non-zero head) and the packed batch of the EOS rollout."""
    model = _model("block")
    g, params = nnx.split(model, nnx.Param)
    value = ValueModel.from_policy(model, rngs=nnx.Rngs(1))
    value.head[...] = jax.random.normal(jax.random.PRNGKey(5), value.head[...].shape) * 0.5
    vg, vparams = nnx.split(value, nnx.Param)
    spec = _spec()
    rows = _with_eos(_block_rollout(), [5, 11, 0, 6, 9, 2, 11, 7])
    value_fn = jax.jit(functools.partial(T.row_values, vg, spec))
    batch, metrics, _ = T.build_update_batch(rows, {"policy": params, "value": vparams}, spec=spec,
                                             logp_fn=_logp_fn(spec), value_fn=value_fn)
    return g, vg, {"policy": params, "value": vparams}, spec, rows, batch, metrics


def _tracerl_mask_np(p, r, key_valid):
    """Brute force of the two-stream table: prompt, clean copy and noisy copy, each block by block."""
    length = p + 2 * r
    allow = np.zeros((length, length), bool)
    for q in range(length):
        for k in range(length):
            cq, ck = (0 if i < p else 1 if i < p + r else 2 for i in (q, k))
            bq, bk = ((i - p) // BS if i < p + r else (i - p - r) // BS for i in (q, k))
            allow[q, k] = ((ck == 0 and (cq != 0 or bk <= bq)) or (cq == 1 and ck == 1 and bk <= bq)
                           or (cq == 2 and ck == 1 and bk < bq) or (cq == 2 and ck == 2 and bk == bq))
    return (allow & key_valid[None, :]) | np.eye(length, dtype=bool)


def test_value_model_advantage_is_reward_minus_value_at_gamma_lambda_one():
    _, vg, params, spec, rows, batch, metrics = _value_setup()
    real, tgt, s = batch["row_valid_W"], batch["target_WxR"], batch["seq_index_W"]
    z = T.group_advantage(REWARD, G)
    v = batch["values_old_WxR"]
    assert np.abs(v[tgt]).max() > 1e-3  # the head is non-zero, so the identity is not trivially 0 = 0
    np.testing.assert_allclose(batch["adv_WxR"][tgt], (z[s][:, None] - v)[tgt], atol=1e-5)
    np.testing.assert_allclose(batch["returns_WxR"][tgt], np.broadcast_to(z[s][:, None], v.shape)[tgt], atol=1e-5)
    # the stored value of a token is the value model at its noisy slot in the row where it is a target
    value = nnx.merge(vg, params["value"])
    i = np.flatnonzero(real & (batch["row_index_W"] == 1))[0]
    n = s[i]
    kv = np.concatenate([rows.prompt_mask_NxP[n], np.ones(2 * R, bool)])
    pos = np.concatenate([np.maximum(np.cumsum(rows.prompt_mask_NxP[n]) - 1, 0)] +
                         [rows.prompt_mask_NxP[n].sum() + np.arange(R)] * 2)
    toks = np.concatenate([rows.prompt_tokens_NxP[n], rows.tokens_NxR[n], batch["noisy_WxR"][i]])
    ref = np.asarray(jax.jit(value.__call__)(toks[None], pos[None], _tracerl_mask_np(P, R, kv)[None]))[0, P + R:]
    np.testing.assert_allclose(v[i][tgt[i]], ref[tgt[i]], atol=1e-5)
    assert np.isfinite(metrics["value/mean"])


def _perturbed(params, scale=0.05, seed=7):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32), params)


def test_micro_batched_losses_sum_to_the_mini_batch_loss():
    """Global row counts: the strided micro-batches of train/step.py sum to the mini-batch loss (policy + value).

    The normalisers are data, not parameters, so equal losses at every parameter value also mean equal gradients;
    checked at the old parameters and at perturbed ones (ratio != 1, clipping and KL active).
    """
    g, vg, params, spec, _, batch, _ = _value_setup()
    mb = T.split_rows(batch, 2, np.random.default_rng(1))[0]
    loss = jax.jit(lambda p, b: T.tracerl_loss(p, b, None, spec=spec, graphdef=g, value_graphdef=vg))
    micro = split_micro_batches(mb, 4)
    for prm in (params, _perturbed(params)):
        parts = [float(loss(prm, jax.tree.map(lambda x, m=m: x[m], micro))[0]) for m in range(4)]
        full, metrics = loss(prm, mb)
        np.testing.assert_allclose(sum(parts), float(full), rtol=1e-5, atol=1e-7)
        assert abs(float(full)) > 1e-6 and sum(abs(x) > 0 for x in parts) >= 2
        # the logged shares (pg_loss, kl, vf_loss, num_rows) of the micro-batches sum to the mini-batch's, as the
        # step reports them; the others (ratios, fractions) are averaged
        shares = [loss(prm, jax.tree.map(lambda x, m=m: x[m], micro))[1] for m in range(4)]
        for key in ("pg_loss", "kl", "vf_loss", "num_rows"):
            np.testing.assert_allclose(sum(float(s[SUMMED + key]) for s in shares), float(metrics[SUMMED + key]),
                                       rtol=1e-5, atol=1e-7, err_msg=key)
    # at the old parameters (as in the first update of an RL step): ratio 1, nothing clipped, KL 0
    _, m = loss(params, mb)
    np.testing.assert_allclose([m["ratio_mean"], m["clip_frac"], m[SUMMED + "kl"]], [1.0, 0.0, 0.0], atol=1e-5)


def test_full_attention_rows_replay_the_llada_sampler():
    """Full attention: with s = 1 the row log-probs are the LLaDA sampler's own; s = 2 halves the rows."""
    model, tok = _model("bidirectional"), _tok()
    g, params = nnx.split(model, nnx.Param)
    fn = make_llada_generate_fn(g, prompt_len=P, gen_len=R, block_len=6, steps=6, mask_token_id=tok.mask_token_id,
                                eos_id=None, pad_id=tok.pad_token_id, sampling=SamplingParams(temperature=1.0))
    rows = _rows(fn(params, *_prompts(), jax.random.PRNGKey(4))[0])
    spec = _spec("full", shrink=1, num_rows=6)
    batch, _, _ = T.build_update_batch(rows, {"policy": params}, spec=spec, logp_fn=_logp_fn(spec))
    tgt, s = batch["target_WxR"], batch["seq_index_W"]
    assert batch["row_valid_W"].all() and np.all(tgt.sum(-1) == 2)  # 6 steps x 2 tokens, every row used
    np.testing.assert_allclose(batch["logp_old_WxR"][tgt], rows.logp_sampler_raw_NxR[s][tgt], atol=1e-4)
    spec2 = _spec("full", shrink=2, num_rows=3)
    b2 = T.pack_batch(rows, spec2)
    assert b2["row_valid_W"].all() and b2["row_valid_W"].shape == (3 * N,) and np.all(b2["target_WxR"].sum(-1) == 4)
    counts = np.zeros((N, R), int)
    np.add.at(counts, b2["seq_index_W"], b2["target_WxR"].astype(int))
    assert np.all(counts == 1)


def test_onestep_estimator_scores_the_d1_input():
    """d1: one row per response, whole response masked, prompt tokens masked with p; fixed per batch."""
    model, tok = _model("bidirectional"), _tok()
    g, params = nnx.split(model, nnx.Param)
    rows = _block_rollout()
    spec = T.TraceSpec(kind="full", block_size=None, shrink=1, num_rows=1, mask_token_id=tok.mask_token_id,
                       group_size=G, estimator="onestep", norm="targets", p_mask_prompt=0.5)
    batch, _, _ = T.build_update_batch(rows, {"policy": params}, spec=spec, logp_fn=_logp_fn(spec))
    m = tok.mask_token_id
    assert batch["row_valid_W"].all() and np.all(batch["noisy_WxR"] == m)
    np.testing.assert_array_equal(batch["target_WxR"], rows.response_mask_NxR)
    changed = batch["prompt_in_WxP"] != rows.prompt_tokens_NxP
    assert changed.any() and np.all(batch["prompt_in_WxP"][changed] == m) and not changed[~rows.prompt_mask_NxP].any()
    inputs = np.concatenate([batch["prompt_in_WxP"], np.full((N, R), m)], 1)
    valid = np.concatenate([rows.prompt_mask_NxP, np.ones((N, R), bool)], 1)
    mask = valid[:, None, :] | np.eye(P + R, dtype=bool)[None]
    logits = jax.jit(model.__call__)(inputs, np.maximum(np.cumsum(valid, 1) - 1, 0), mask)[0][:, P:]
    np.testing.assert_allclose(batch["logp_old_WxR"], diff_lib.token_logp(logits, rows.tokens_NxR), atol=1e-5)
    again = T.pack_batch(rows, spec)
    np.testing.assert_array_equal(again["prompt_in_WxP"], batch["prompt_in_WxP"])  # old == new input (mask seed)
    rows = rows.replace(tokens_NxR=np.roll(rows.tokens_NxR, 1, axis=1))
    assert not np.array_equal(T.pack_batch(rows, spec)["prompt_in_WxP"], batch["prompt_in_WxP"])


def test_configs_give_specs_and_bad_settings_fail_with_one_sentence():
    from configs import tracerl as cfg_lib

    tok = _tok()
    for arg, kind, k, norm in [("block", "block", 4, "response_len"), ("block,value,tiny", "block", 4, "response_len"),
                               ("full", "full", 10, "targets"), ("full,value", "full", 10, "targets"),
                               ("block,onestep", "block", 1, "response_len")]:
        c = cfg_lib.get_config(arg)
        M.validate_config(c)
        spec = M.trace_spec(c, tok.mask_token_id)
        assert (spec.kind, spec.num_rows, spec.norm) == (kind, k, norm)
        assert (c.advantage.estimator == "gae") == ("value" in arg)
    c = cfg_lib.get_config("block")
    c.tracerl.steps_per_block = 3
    with pytest.raises(ValueError, match="must divide 4"):
        M.validate_config(c)
    c = cfg_lib.get_config("block,onestep")
    c.advantage.estimator = "gae"
    with pytest.raises(ValueError, match="no value-model variant"):
        M.validate_config(c)
    with pytest.raises(ValueError, match="must start with one of"):
        cfg_lib.get_config("causal")
    low, default = cfg_lib.get_config("block,value,lr=1e-5"), cfg_lib.get_config("block,value")
    assert (low.optim.lr, low.optim.value_lr) == (1e-5, 5e-5) and (default.optim.lr, default.optim.value_lr) == (
        1e-4, 5e-4)
    low.optim.lr, low.optim.value_lr = default.optim.lr, default.optim.value_lr
    assert low.to_dict() == default.to_dict()  # the word changes the two learning rates and nothing else
    for bad in ("lr=", "lr=x", "lr=0", "lr=-1e-5", "lr=inf", "lr=nan"):
        with pytest.raises(ValueError, match="must be a positive finite number"):
            cfg_lib.get_config(f"block,{bad}")
    from configs import grpo

    c = grpo.get_config("tiny")
    c.model.attention = "block"
    with pytest.raises(ValueError, match="needs the `tracerl` section"):
        M.validate_config(c)
    with pytest.raises(ValueError, match="no step_map_NxR"):
        T.pack_batch(_block_rollout().replace(step_map_NxR=None), _spec())


def test_config_applies_the_recipe_and_the_spec_reads_the_shared_fields():
    from configs import grpo
    from configs import tracerl as cfg_lib

    mask_id = _tok().mask_token_id
    from study import tracerl as study_mod

    configs = {arg: cfg_lib.get_config(arg) for arg in ("block", "full,value", "block,onestep,paper", "full,paper",
                                                        "block,value,small")}
    configs.update({run: study_mod.rl_config(run, seed=0, rl_steps=2, eval_problems=8, eval_samples=2, sft_dir="x",
                                             smoke=smoke) for run in study_mod.TRACERL_RUNS for smoke in (False, True)})
    # the official rl_trado.yaml / rl_llada.yaml values every TraceRL run trains with
    official = dict(eps_low=0.2, eps_high=0.2, beta=0.01, adv_eps=1e-6, std_ddof=0, gamma=1.0, lam=1.0,
                    value_clip=0.2, value_coef=1.0)
    for name, c in configs.items():
        assert c.algorithm == "tracerl"
        value = c.advantage.estimator == "gae"
        for dotted, want in M.RECIPE.items():
            section, key = dotted.split(".")
            assert c[section][key] == ("gae" if dotted == "advantage.estimator" and value else want), (name, dotted)
        spec = M.trace_spec(c, mask_id)
        assert {k: getattr(spec, k) for k in official} == official, name
    c = cfg_lib.get_config("block,value")
    c.loss.eps_low, c.loss.eps_high, c.advantage.eps, c.advantage.std_ddof = 0.1, 0.28, 1e-4, 1
    c.advantage.gamma, c.advantage.lam, c.loss.value_coef, c.tracerl.beta = 0.9, 0.8, 0.5, 0.03
    spec = M.trace_spec(c, mask_id)
    assert (spec.eps_low, spec.eps_high, spec.adv_eps, spec.std_ddof, spec.gamma, spec.lam, spec.value_clip,
            spec.value_coef, spec.beta) == (0.1, 0.28, 1e-4, 1, 0.9, 0.8, 0.2, 0.5, 0.03)
    c.loss.value_clip = 0.0
    assert M.trace_spec(c, mask_id).value_clip is None  # 0: unclipped, as for the autoregressive critic
    for dotted, value, sentence in [("loss.kl_coef", 0.01, "tracerl.beta"), ("loss.mode", "gspo", "PPO clip"),
                                    ("loss.dual_clip_c", 3.0, "no dual clip"), ("loss.value_clip", -1.0, ">= 0")]:
        bad = cfg_lib.get_config("block")
        section, key = dotted.split(".")
        bad[section][key] = value
        with pytest.raises(ValueError, match=sentence):
            M.validate_config(bad)
    # build.validate_config runs the method's own check, and only TraceRL trains a masked-diffusion policy
    bad = cfg_lib.get_config("block")
    bad.tracerl.threshold = 0.0
    with pytest.raises(ValueError, match="tracerl.threshold"):
        build.validate_config(bad)
    c = grpo.get_config("tiny")
    c.model.attention = "block"
    with pytest.raises(ValueError, match="trains with algorithm 'tracerl'"):
        build.validate_config(c)
    # the autoregressive update batch reads the same switch: population std with std_ddof 0
    from jaxrl_reason.train import batch as batch_lib
    from jaxrl_reason.train import hparams

    c = grpo.get_config("tiny")
    c.advantage.std_ddof = 0
    build.validate_config(c)
    reward_N = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0] * c.rollout.prompts_per_step, np.float32)
    adv_NxR, _, _ = batch_lib.compute_advantages(hparams.advantage_hp(c), reward_N, np.ones((len(reward_N), 2)))
    g_BxG = reward_N.reshape(-1, c.rollout.group_size).astype(np.float64)
    want_BxG = (g_BxG - g_BxG.mean(1, keepdims=True)) / (g_BxG.std(1, ddof=0, keepdims=True) + c.advantage.eps)
    np.testing.assert_allclose(np.asarray(adv_NxR)[:, 0], want_BxG.reshape(-1), rtol=1e-5)


def test_diffusion_parts_run_rl_updates_end_to_end():
    """diffusion_parts from the tiny `block,value` config: sample -> rows -> build_batch -> split -> jitted updates
    change both the policy and the value model with finite losses."""
    from configs import tracerl as cfg_lib

    tok = _tok()
    c = cfg_lib.get_config("block,value")
    c.rollout.max_prompt_len, c.rollout.max_new_tokens, c.rollout.group_size = P, R, G
    c.optim.mini_batches, c.tracerl.threshold, c.tracerl.forward_rows = 2, 0.6, 16
    c.rollout.log_mismatch = True
    model = _model("block")
    g, params = nnx.split(model, nnx.Param)
    vg, vparams = nnx.split(ValueModel.from_policy(model, rngs=nnx.Rngs(1)), nnx.Param)
    ids = types.SimpleNamespace(mask_token_id=tok.mask_token_id, pad_token_id=tok.pad_token_id, eos_token_id=NO_EOS)
    parts = M.diffusion_parts(c, g, ids, value_graphdef=vg)
    assert parts.greedy_gen is not None and parts.eval_gen is not None
    rows = _rows(parts.train_gen(params, *_prompts(), jax.random.PRNGKey(9))).replace(reward_N=REWARD[::-1].copy())
    init = {"policy": params, "value": vparams}
    batch, metrics, entropy = parts.build_batch(rows, init)
    assert metrics["tracerl/rows"] >= N and entropy.shape == (N, R)
    # the block KV-cache sampler decodes in exactly the replayed states (s = 1, no EOS): every token compared, equal
    assert metrics["rollout/mismatch_tokens_frac"] == 1.0 and metrics["rollout/mismatch_max_abs"] < 1e-4
    tx = optax.multi_transform({"policy": optax.adam(1e-2), "value": optax.adam(1e-2)},
                               {"policy": "policy", "value": "value"})
    state = init_train_state(jax.tree.map(jnp.copy, init), tx, 0)
    step = make_train_step(parts.loss_fn, tx, num_micro_batches=2, donate=False)
    for mb in parts.split(batch, np.random.default_rng(0)) * 2:
        state, m = step(state, mb)
        assert np.isfinite(float(m["loss"])) and m["skipped"] == 0.0
    for part in ("policy", "value"):
        changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(init[part]),
                                                         jax.tree.leaves(state.params[part]))]
        assert any(changed), part


def test_chunked_row_logp_equals_plain_logits_path():
    """row_logp (LM head in token and vocabulary chunks, no [W, R, V] logits) = log-softmax of row_logits."""
    import dataclasses

    from jaxrl_reason.train.logprobs import LogpSpec

    rows, spec = _block_rollout(), _spec()
    g, params = nnx.split(_model("block"), nnx.Param)
    batch = T.pack_batch(rows, spec)
    chunked = dataclasses.replace(spec, logp=LogpSpec(logits_chunk=40, vocab_chunk=7))
    got = jax.jit(functools.partial(T.row_logp, g, chunked))(params, batch)
    logits = jax.jit(functools.partial(T.row_logits, g, spec))(params, batch)
    np.testing.assert_allclose(got, diff_lib.token_logp(logits, batch["clean_WxR"]), rtol=1e-5, atol=1e-5)


def test_replay_mismatch_reads_each_token_in_its_row_and_compares_first_steps_only():
    """Full attention, s = 2, a hand trajectory: the old log-prob of token j is read in the row that targets it, only
    the tokens of a group's first step are compared, and the metrics are the numpy formulas on those tokens."""
    mask_id, r = _tok().mask_token_id, 6
    spec = T.TraceSpec(kind="full", block_size=None, shrink=2, num_rows=2, mask_token_id=mask_id, group_size=2,
                       norm="targets")
    step_map = np.array([[0, 0, 1, 2, 3, 3], [2, 0, 1, 1, STEP_MAP_PAD, STEP_MAP_PAD]], np.int32)
    valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    rng = np.random.default_rng(0)
    sampler = np.where(valid, -rng.uniform(0.1, 3.0, (2, r)), 0.0).astype(np.float32)
    rows = Rows(prompt_tokens_NxP=np.full((2, 3), 5, np.int32), prompt_mask_NxP=np.ones((2, 3), bool),
                tokens_NxR=np.where(valid, 7, 0).astype(np.int32), response_mask_NxR=valid,
                logp_sampler_NxR=sampler, logp_sampler_raw_NxR=sampler, entropy_NxR=np.zeros((2, r), np.float32),
                length_N=valid.sum(1), truncated_N=np.zeros(2, bool), score_N=np.zeros(2, np.float32),
                example_index_N=np.arange(2), answer_N=np.full(2, ""), step_map_NxR=step_map)
    batch = T.pack_batch(rows, spec)
    # groups of two distinct steps: row 0 = steps {0, 1}, row 1 = steps {2, 3} (response 1: {0, 1} then {2})
    np.testing.assert_array_equal(batch["target_WxR"][batch["row_valid_W"]].astype(int),
                                  [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    batch["logp_old_WxR"] = -rng.uniform(0.1, 3.0, batch["target_WxR"].shape).astype(np.float32)
    logp, replayed = T.replayed_old_logp(spec, batch, rows)
    want = np.zeros((2, r), np.float32)
    for w in np.flatnonzero(batch["row_valid_W"]):
        for j in np.flatnonzero(batch["target_WxR"][w]):
            want[batch["seq_index_W"][w], j] = batch["logp_old_WxR"][w, j]
    np.testing.assert_array_equal(logp, want)
    # first step of each group: response 0 steps 0 and 2, response 1 steps 0 and 2
    np.testing.assert_array_equal(replayed.astype(int), [[1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    hp = types.SimpleNamespace(log_mismatch=True, exact_logprobs=False, is_correction="none")
    m = M.replay_mismatch(spec, batch, rows, hp)
    lr = (want - sampler)[replayed]
    assert m["rollout/mismatch_kl"] == pytest.approx(np.mean(-lr), rel=1e-5)
    assert m["rollout/mismatch_k3_kl"] == pytest.approx(np.mean(np.exp(lr) - lr - 1), rel=1e-5)
    assert m["rollout/mismatch_max_abs"] == pytest.approx(np.max(np.abs(lr)), rel=1e-6)
    assert m["rollout/max_ratio"] == pytest.approx(np.exp(lr).max(), rel=1e-5)
    assert m["rollout/mismatch_tokens_frac"] == pytest.approx(5 / 10)
    with pytest.raises(ValueError, match="trace estimator"):
        T.replayed_old_logp(T.TraceSpec(**{**spec.__dict__, "estimator": "onestep", "num_rows": 1}), batch, rows)


def test_mismatch_settings_of_a_diffusion_policy_fail_with_one_sentence():
    from configs import tracerl as cfg_lib

    c = cfg_lib.get_config("block,onestep")
    c.rollout.log_mismatch = True
    with pytest.raises(ValueError, match="one-step estimator does not replay"):
        build.validate_config(c)
    c = cfg_lib.get_config("block")
    c.rollout.is_correction = "token_tis"
    with pytest.raises(ValueError, match="autoregressive"):
        build.validate_config(c)
