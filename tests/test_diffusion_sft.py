"""Tests for train/diffusion_sft.py on tiny random models, char tokenizer.

References written here: the attention masks (full, block, two-stream) by brute force from their tables, float64 numpy
log-softmax, and the loss formulas of LLaDA (per-sequence answer length) and SDAR (batch token mean).
"""
import functools
import tempfile

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_reason.core import diffusion as diff_lib
from jaxrl_reason.data.tokenizer import build_char_tokenizer
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.train import diffusion_sft as S
from jaxrl_reason.train.step import split_micro_batches

P, R, BS = 8, 8, 4
PROMPTS = ["1+2:", "30+4:", "5+17+2:", "9+9:"]
ANSWERS = ["3", "34", "24", "18"]


@functools.lru_cache(maxsize=None)
def _tok():
    return build_char_tokenizer(tempfile.mkdtemp(prefix="dsft_tok_"))


@functools.lru_cache(maxsize=None)
def _model(attn: str):
    tok = _tok()
    cfg = TransformerConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=1, head_dim=16, attention=attn, block_size=BS if attn == "block" else 1,
                            mask_token_id=tok.mask_token_id)
    return Transformer(cfg, rngs=nnx.Rngs(0))


def _arrays(pad_to_eos=True):
    return S.diffusion_sft_arrays(_tok(), PROMPTS, ANSWERS, P, R, pad_to_eos=pad_to_eos)


def _spec(layout, **kw):
    return S.DiffusionSFTSpec(layout=layout, mask_token_id=_tok().mask_token_id, block_size=BS, **kw).validate()


def _mask_np(layout, pvalid, rvalid):
    """Brute-force masks: full, bd3 over [prompt; x_t; prompt; x_0], tracerl."""
    if layout == "full":
        kv = np.concatenate([pvalid, rvalid])
        allow = np.ones((P + R, P + R), bool)
    elif layout == "bd3":
        kv = np.concatenate([pvalid, rvalid, pvalid, rvalid])
        n = P + R
        allow = np.zeros((2 * n, 2 * n), bool)
        for q in range(2 * n):
            for k in range(2 * n):
                cq, ck, bq, bk = q >= n, k >= n, (q % n) // BS, (k % n) // BS
                allow[q, k] = ((not cq and not ck and bq == bk) or (not cq and ck and bk < bq)
                               or (cq and ck and bk <= bq))
    else:
        kv = np.concatenate([pvalid, rvalid, rvalid])
        length = P + 2 * R
        allow = np.zeros((length, length), bool)
        for q in range(length):
            for k in range(length):
                cq, ck = (0 if i < P else 1 if i < P + R else 2 for i in (q, k))
                bq, bk = ((i - P) // BS if i < P + R else (i - P - R) // BS for i in (q, k))
                allow[q, k] = ((ck == 0 and (cq != 0 or bk <= bq)) or (cq == 1 and ck == 1 and bk <= bq)
                               or (cq == 2 and ck == 1 and bk < bq) or (cq == 2 and ck == 2 and bk == bq))
    return (allow & kv[None, :]) | np.eye(len(kv), dtype=bool)


def _reference_loss(model, layout, batch, xt, masked, p, mode):
    """The LLaDA / SDAR loss computed directly: one forward per sequence with the numpy mask, float64 softmax."""
    fwd = jax.jit(lambda x, pos, m: model(x, pos, m)[0])
    pm, resp, mk = batch["prompt_NxP"], batch["response_NxR"], batch["maskable_NxR"]
    n = resp.shape[0]
    p = np.broadcast_to(np.asarray(p)[:, None] if np.ndim(p) == 1 else np.asarray(p), resp.shape)
    nll = np.zeros(resp.shape)
    for i in range(n):
        ppos = np.maximum(np.cumsum(batch["prompt_mask_NxP"][i]) - 1, 0)
        rpos = batch["prompt_mask_NxP"][i].sum() + np.arange(R)
        if layout == "full":
            toks, pos, lo = np.concatenate([pm[i], xt[i]]), np.concatenate([ppos, rpos]), P
        elif layout == "bd3":
            toks, pos, lo = np.concatenate([pm[i], xt[i], pm[i], resp[i]]), np.concatenate([ppos, rpos] * 2), P
        else:
            toks, pos, lo = np.concatenate([pm[i], resp[i], xt[i]]), np.concatenate([ppos, rpos, rpos]), P + R
        mask = _mask_np(layout, batch["prompt_mask_NxP"][i], mk[i])
        logits = np.asarray(fwd(toks[None], pos[None], mask[None]), np.float64)[0, lo:lo + R]
        logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll[i] = -logp[np.arange(R), resp[i]]
    w = np.where(masked, nll / p, 0.0)
    if mode == "sft":  # LLaDA: per sequence / answer length, mean over the batch
        return np.mean(w.sum(-1) / mk.sum(-1))
    if mode == "token_mean":  # SDAR: batch token mean
        return w.sum() / mk.sum()
    return np.mean(np.where(masked, nll, 0.0).sum(-1) / R)  # semi_ar (dLLM-RL sft_trado): no 1/t, / R


# the tracerl case is also the spec of the training test below (one compiled loss for both)
CASES = {"full": dict(loss_mode="sft"), "bd3": dict(loss_mode="token_mean", per_block_t=True),
         "tracerl": dict(loss_mode="semi_ar", eps=0.0, t_min=0.1, t_max=0.9)}  # configs/sft_diffusion.py:block


@pytest.mark.parametrize("layout", list(CASES))
def test_loss_equals_direct_computation(layout):
    model = _model("bidirectional" if layout == "full" else "block")
    spec = _spec(layout, **CASES[layout])
    arrays = _arrays(pad_to_eos=layout != "bd3")  # bd3: response pads are invisible keys
    batch = S.with_counts(arrays)
    loss = S.heldout_loss(model, arrays, spec, seed=4)
    rng = jax.random.PRNGKey(4)
    if layout == "full":
        xt, masked, p = diff_lib.forward_mask(rng, batch["response_NxR"], batch["maskable_NxR"],
                                              _tok().mask_token_id, 1e-3)
    else:
        xt, masked, p = diff_lib.block_forward_mask(rng, batch["response_NxR"], batch["maskable_NxR"], BS,
                                                    _tok().mask_token_id, spec.eps, spec.per_block_t,
                                                    t_min=spec.t_min, t_max=spec.t_max)
    masked = np.asarray(masked)
    assert masked.any() and not masked[~batch["maskable_NxR"]].any()
    ref = _reference_loss(model, layout, batch, np.asarray(xt), masked, p, spec.loss_mode)
    np.testing.assert_allclose(loss, ref, rtol=2e-5)


def test_strided_micro_batch_losses_sum_to_the_batch_loss():
    """Global denominators (`num_seqs_N`): strided micro-batch losses of train/step.py sum to the batch loss."""
    model = _model("bidirectional")
    g, params = nnx.split(model, nnx.Param)
    spec = _spec("full", **CASES["full"])
    batch = S.with_counts(_arrays())
    xt, masked, p = S.noise(spec, jax.random.PRNGKey(4), batch)
    micro = split_micro_batches({**batch, "xt": xt, "masked": masked, "p": p}, 2)
    loss = jax.jit(lambda b: S.sft_loss_given_noise(params, b, b["xt"], b["masked"], b["p"], graphdef=g, spec=spec))
    parts = [float(loss(jax.tree.map(lambda x, m=m: x[m], micro))) for m in range(2)]
    np.testing.assert_allclose(sum(parts), S.heldout_loss(model, _arrays(), spec, seed=4), rtol=1e-5)
    assert min(parts) > 0


def test_a_few_steps_reduce_the_loss():
    model = Transformer(_model("block").cfg, rngs=nnx.Rngs(3))
    spec = _spec("tracerl", **CASES["tracerl"])
    arrays = _arrays()
    before = np.mean([S.heldout_loss(model, arrays, spec, seed) for seed in range(4)])
    logs = []
    model, history = S.train_diffusion_sft(model, arrays, spec=spec, steps=20, batch_size=4, lr=3e-3, warmup_steps=0,
                                           seed=0, micro_batches=2, log_every=5, log_fn=logs.append)
    after = np.mean([S.heldout_loss(model, arrays, spec, seed) for seed in range(4)])
    assert np.isfinite([h["loss"] for h in history]).all() and len(logs) == len(history) == 5
    assert after < 0.7 * before, (before, after)


def test_arrays_config_and_errors():
    tok = _tok()
    a = _arrays(pad_to_eos=True)
    b = _arrays(pad_to_eos=False)
    assert a["maskable_NxR"].all() and (a["response_NxR"][~b["maskable_NxR"]] == tok.eos_token_id).all()
    np.testing.assert_array_equal(a["response_NxR"][b["maskable_NxR"]], b["response_NxR"][b["maskable_NxR"]])
    assert b["maskable_NxR"].sum(-1).tolist() == [len(x) + 1 for x in ANSWERS]
    from configs import sft_diffusion

    for arg, layout, mode in [("block,tiny", "tracerl", "semi_ar"), ("full", "full", "sft")]:
        c = sft_diffusion.get_config(arg)
        spec = S.sft_spec(c, tok.mask_token_id)
        assert (spec.layout, spec.loss_mode) == (layout, mode)
    with pytest.raises(ValueError, match="must be '<block|full>"):
        sft_diffusion.get_config("causal,tiny")
    with pytest.raises(ValueError, match="Unknown diffusion SFT layout"):
        _spec("two_stream")
    with pytest.raises(ValueError, match="multiple of 4"):
        S.sft_inputs(_spec("bd3"), {k: v[:, 1:] if k.startswith("prompt") else v for k, v in a.items()},
                     a["response_NxR"])


def test_tracerl_layout_scores_each_block_in_the_context_the_sampler_decodes_it():
    """The two-stream training layout gives noisy block b the logits of a single-stream
    block-causal forward of [prompt ; clean blocks < b ; noisy block b]: what the block sampler sees when it
    decodes block b, so the SFT and RL objectives train the conditional the sampler uses."""
    from jaxrl_reason.models import attention

    model = _model("block")
    spec = _spec("tracerl", **CASES["tracerl"])
    arrays = _arrays()
    batch = S.with_counts(arrays)
    xt, _, _ = S.noise(spec, jax.random.PRNGKey(3), batch)
    tokens, pos, mask, (lo, hi) = S.sft_inputs(spec, batch, xt)
    two_stream = np.asarray(model.logits(model.hidden(tokens, pos, mask)[0][:, lo:hi]))
    pmask = np.asarray(arrays["prompt_mask_NxP"], bool)
    ppos = np.asarray(attention.positions_from_mask(pmask))
    rpos = pmask.sum(-1, keepdims=True) + np.arange(R)
    for b in range(R // BS):
        end = (b + 1) * BS
        clean = arrays["response_NxR"][:, :b * BS]
        toks = np.concatenate([arrays["prompt_NxP"], clean, np.asarray(xt)[:, b * BS:end]], 1)
        valid = np.concatenate([pmask, np.ones((len(pmask), end), bool)], 1)
        h, _ = model.hidden(toks, np.concatenate([ppos, rpos[:, :end]], 1), attention.block_causal_mask(valid, BS, P))
        np.testing.assert_allclose(np.asarray(model.logits(h[:, -BS:])), two_stream[:, b * BS:end], atol=1e-5)
