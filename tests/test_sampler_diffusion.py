"""Tests for sampling/diffusion.py.

References are written here from the spec: numpy masks, python decoding loops that recompute the whole
sequence at every step without a cache, and a replay of the recorded trajectory.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.sampling import diffusion as D
from jaxrl_reason.sampling import diffusion_steps as S
from jaxrl_reason.sampling.processors import SamplingParams
from jaxrl_reason.sampling.types import STEP_MAP_PAD

V, M, PAD = 24, 23, 0
P, R, BS = 8, 8, 4
GREEDY = SamplingParams(greedy=True)


def _cfg(layers=2):
    return TransformerConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_layers=layers, num_heads=2,
                             num_kv_heads=1, head_dim=8, attention="block", block_size=BS, mask_token_id=M)


@functools.lru_cache(maxsize=None)
def _model(layers=2):
    graphdef, params = nnx.split(Transformer(_cfg(layers), rngs=nnx.Rngs(layers)), nnx.Param)
    fwd = jax.jit(lambda prm, x, pos, mask: nnx.merge(graphdef, prm)(x, pos, mask)[0])
    return graphdef, params, lambda x, pos, mask: np.asarray(fwd(params, x, pos, mask), np.float64)


def _prompts(b=8, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, M, (b, P)).astype(np.int32)
    mask = np.ones((b, P), bool)
    for i in range(b):
        mask[i, : (3 * i) % P] = False   # left padding of different widths
    return np.where(mask, toks, PAD), mask


def _layout(prompt, pmask):
    x = np.concatenate([prompt, np.full((prompt.shape[0], R), M, np.int32)], 1)
    valid = np.concatenate([pmask, np.ones((prompt.shape[0], R), bool)], 1)
    pos = np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32)
    return x, valid, pos


def _np_mask(valid, block=None):
    """Full attention (block=None) / response-aligned blocks, built with numpy double loops."""
    b, n = valid.shape
    out = np.zeros((b, n, n), bool)
    for q in range(n):
        for k in range(n):
            ok = True if block is None else (k - P) // block <= (q - P) // block
            out[:, q, k] = (valid[:, k] & ok) | (q == k)
    return out


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _cut_at_eos(tokens, steps, eos):
    tokens, steps = tokens.copy(), steps.copy()
    for row in range(tokens.shape[0]):
        hit = np.flatnonzero(np.isin(tokens[row], eos))
        if hit.size:
            tokens[row, hit[0] + 1:] = PAD
            steps[row, hit[0] + 1:] = STEP_MAP_PAD
    return tokens, steps


def _greedy_ref(fwd, prompt, pmask, eos, *, block, k_sched, bidirectional, tau=None):
    """Naive decoding loop (LLaDA / Fast-dLLM threshold / SDAR static), full recompute, greedy.

    Commits the top-k masked block positions by raw probability, or with `tau` every one with prob >= tau
    plus the most confident one (then up to `block` steps per block).
    """
    x, valid, pos = _layout(prompt, pmask)
    mask = _np_mask(valid, None if bidirectional else block)
    b = x.shape[0]
    steps, step_map, active = np.zeros(b, int), np.full((b, R), STEP_MAP_PAD, np.int64), np.ones(b, bool)
    for j in range(R // block):
        sl = slice(P + j * block, P + (j + 1) * block)
        for k in (k_sched if tau is None else [None] * block):
            logits = fwd(x, pos, mask)[:, sl]
            for row in np.flatnonzero(active):
                masked = x[row, sl] == M
                if not masked.any():
                    continue
                lg = logits[row].copy()
                lg[:, M] = -np.inf
                tok = lg.argmax(-1)
                conf = _softmax(logits[row])[np.arange(block), tok]
                order = sorted(np.flatnonzero(masked), key=lambda t: (-conf[t], t))
                order = order[:k] if tau is None else order[:1] + [t for t in order[1:] if conf[t] >= tau]
                for t in order:
                    x[row, P + j * block + t] = tok[t]
                    step_map[row, j * block + t] = steps[row]
                steps[row] += len(order) > 0
        if not bidirectional:   # SDAR stops a row after the block holding its EOS
            active &= ~np.isin(x[:, sl], eos).any(1)
    return _cut_at_eos(x[:, P:], step_map, eos)


def _pick_eos(tokens):
    """An EOS id that really occurs mid-response in row 0 (so stopping is exercised)."""
    return (int(tokens[0, 5]),)


# ---------------------------------------------------------------------------------------------- primitives

def test_transfer_schedule_hand_cases():
    np.testing.assert_array_equal(S.transfer_schedule(4, 4), [1, 1, 1, 1])
    np.testing.assert_array_equal(S.transfer_schedule(10, 4), [3, 3, 2, 2])
    np.testing.assert_array_equal(S.transfer_schedule(3, 4), [1, 1, 1, 0])
    np.testing.assert_array_equal(S.transfer_schedule(jnp.array([4, 5]), 2), [[2, 2], [3, 2]])
    with pytest.raises(ValueError, match="steps >= 1"):
        S.transfer_schedule(4, 0)


def _select_ref(conf, masked, k, tau, mode):
    out = np.zeros_like(masked)
    for i in range(conf.shape[0]):
        cand = sorted(np.flatnonzero(masked[i]), key=lambda t: (-conf[i, t], t))
        top = cand[:k[i]]
        if mode == "static":
            out[i, top] = True
        elif mode == "sdar_dynamic":
            above = [t for t in cand if conf[i, t] > tau]
            out[i, above if len(above) >= k[i] else top] = True
        else:
            out[i, [t for t in cand if conf[i, t] >= tau] + cand[:1]] = True
    return out


@pytest.mark.parametrize("mode", S.SELECT_MODES)
def test_select_transfer_matches_numpy_reference(mode):
    rng = np.random.default_rng(1)
    conf = rng.integers(0, 5, (64, 7)) / 4.0          # many ties and values equal to tau
    masked = rng.random((64, 7)) < 0.6
    k = rng.integers(0, 4, 64)
    got = S.select_transfer(jnp.asarray(conf), jnp.asarray(masked), jnp.asarray(k), 0.5, mode)
    np.testing.assert_array_equal(got, _select_ref(conf, masked, k, 0.5, mode))


def test_select_transfer_hand_case():
    conf = jnp.array([[0.95, 0.2, 0.91, 0.9, 0.99]])
    masked = jnp.array([[True, True, True, True, False]])
    assert S.select_transfer(conf, masked, jnp.array([1]), mode="static").tolist() == [[1, 0, 0, 0, 0]]
    # strict > 0.9: two above >= k=2 -> both; with k=3 fall back to the top-3
    assert S.select_transfer(conf, masked, jnp.array([2]), 0.9, "sdar_dynamic").tolist() == [[1, 0, 1, 0, 0]]
    assert S.select_transfer(conf, masked, jnp.array([3]), 0.9, "sdar_dynamic").tolist() == [[1, 0, 1, 1, 0]]
    assert S.select_transfer(conf, masked, 0, 0.9, "fastdllm").tolist() == [[1, 0, 1, 1, 0]]
    assert S.select_transfer(conf, masked, 0, 0.999, "fastdllm").tolist() == [[1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="needs a threshold"):
        S.select_transfer(conf, masked, 1, None, "fastdllm")


def test_propose_scores():
    propose = jax.jit(S.propose, static_argnums=(2, 3, 4))
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, V)).astype(np.float32)
    logits[0, 0, M] = 50.0                              # the mask token is never proposed
    g = propose(jax.random.key(0), jnp.asarray(logits), GREEDY, M, "sampled")
    lg = logits.copy()
    lg[..., M] = -np.inf
    np.testing.assert_array_equal(g.token, lg.argmax(-1))
    p = _softmax(logits.astype(np.float64))
    np.testing.assert_allclose(g.conf, np.take_along_axis(p, lg.argmax(-1)[..., None], -1)[..., 0], rtol=1e-5)
    np.testing.assert_allclose(g.logp_raw, np.log(g.conf), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.entropy, -(p * np.log(p)).sum(-1), rtol=1e-5)
    s = propose(jax.random.key(0), jnp.asarray(logits), SamplingParams(temperature=0.5), M, "sampled")
    q = _softmax(lg / 0.5)
    want = np.take_along_axis(q, np.asarray(s.token)[..., None], -1)[..., 0]
    assert (np.asarray(s.token) != M).all()
    np.testing.assert_allclose(s.conf, want, rtol=1e-5)
    np.testing.assert_allclose(s.logp, np.log(want), rtol=1e-5, atol=1e-6)
    r = propose(jax.random.key(0), jnp.asarray(logits), SamplingParams(temperature=0.5), M, "raw")
    np.testing.assert_allclose(r.conf, np.exp(s.logp_raw), rtol=1e-5)


# ---------------------------------------------------------------------------------------- block sampler

def _block_fn(**kw):
    graphdef, _, _ = _model()
    args = dict(prompt_len=P, max_new_tokens=R, block_size=BS, steps_per_block=BS, mask_token_id=M, eos_ids=(),
                pad_id=PAD, sampling=GREEDY)
    return D.make_block_generate_fn(graphdef, **{**args, **kw})


def test_block_greedy_equals_naive_loop_with_and_without_cache():
    _, params, fwd = _model()
    prompt, pmask = _prompts()
    ref_tok, _ = _greedy_ref(fwd, prompt, pmask, (), block=BS, k_sched=[1] * BS, bidirectional=False)
    eos = _pick_eos(ref_tok)
    ref_tok, ref_step = _greedy_ref(fwd, prompt, pmask, eos, block=BS, k_sched=[1] * BS, bidirectional=False)
    outs = [_block_fn(eos_ids=eos, use_cache=c)(params, prompt, pmask, jax.random.key(0)) for c in (True, False)]
    for ro, aux in outs:
        np.testing.assert_array_equal(ro.tokens_BxR, ref_tok)
        np.testing.assert_array_equal(ro.step_map_BxR, ref_step)
        np.testing.assert_array_equal(ro.length_B, (ref_step != STEP_MAP_PAD).sum(1))
        np.testing.assert_array_equal(ro.truncated_B, ~np.isin(ref_tok, eos).any(1))
        valid = np.asarray(ro.response_mask_BxR)
        for row in range(8):   # one token per step: the steps of a row are distinct and increase block by block
            s = np.asarray(ro.step_map_BxR)[row][valid[row]]
            assert len(set(s.tolist())) == len(s)
            assert all(s[j * BS:(j + 1) * BS].max() < s[(j + 1) * BS:].min(initial=STEP_MAP_PAD)
                       for j in range(R // BS) if j * BS < len(s))
    (a, aux_a), (b, aux_b) = outs
    assert not bool(a.truncated_B[0]) and int(a.length_B[0]) <= 6
    for f in ("logp_raw_BxR", "entropy_BxR", "confidence_BxR"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), atol=1e-5)
    assert not np.asarray(a.logp_BxR).any()   # greedy: point mass
    # one call per step (block_size steps per decoded block) until every row stopped; + the prefill with cache
    n_iter = BS * int(np.ceil(int(np.asarray(a.length_B).max()) / BS))
    assert (int(aux_b["num_forwards"]), int(aux_a["num_forwards"])) == (n_iter, n_iter + 1)


def test_block_sampler_with_scanned_layers_equals_unrolled():
    """Stacked layer params (scan over layers, stacked block KV cache) decode the same rollout."""
    _, params, _ = _model()
    prompt, pmask = _prompts()
    want, _ = _block_fn()(params, prompt, pmask, jax.random.key(0))
    scanned = Transformer(dataclasses.replace(_cfg(), scan_layers=True), rngs=nnx.Rngs(2))  # same seed as _model
    graphdef, sparams = nnx.split(scanned, nnx.Param)
    fn = D.make_block_generate_fn(graphdef, prompt_len=P, max_new_tokens=R, block_size=BS, steps_per_block=BS,
                                  mask_token_id=M, eos_ids=(), pad_id=PAD, sampling=GREEDY)
    got, _ = fn(sparams, prompt, pmask, jax.random.key(0))
    np.testing.assert_array_equal(got.tokens_BxR, want.tokens_BxR)
    np.testing.assert_allclose(got.entropy_BxR, want.entropy_BxR, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _dynamic_fn():
    return _block_fn(steps_per_block=2, remasking="dynamic", threshold=0.3,
                     sampling=SamplingParams(temperature=0.7))


def _rows8():
    return _prompts(b=8, seed=3)


def test_block_dynamic_trajectory_replays_exactly():
    """Trajectory: token j was committed from state s_{step_map[j]} = prompt + tokens with smaller step ids."""
    _, params, fwd = _model()
    prompt, pmask = _rows8()
    ro, aux = _dynamic_fn()(params, prompt, pmask, jax.random.key(7))
    tok, steps = np.asarray(ro.tokens_BxR), np.asarray(ro.step_map_BxR)
    assert np.asarray(ro.response_mask_BxR).all() and np.asarray(ro.truncated_B).all()
    x0, valid, pos = _layout(prompt, pmask)
    mask = _np_mask(valid, BS)
    counts = []
    for row in range(8):
        assert sorted(set(steps[row])) == list(range(steps[row].max() + 1))     # dense ids
        for j in range(R // BS):                                                 # monotone across blocks
            blk = steps[row, j * BS:(j + 1) * BS]
            assert blk.max() < steps[row, (j + 1) * BS:].min(initial=STEP_MAP_PAD)
            remaining = BS
            for i, t in enumerate(sorted(set(blk))):       # >= k_i = 2 per step unless fewer remain
                n = int((blk == t).sum())
                assert n >= min(2, remaining)
                counts.append(n)
                remaining -= n
        for t in range(steps[row].max() + 1):
            x = x0[row:row + 1].copy()
            x[0, P:] = np.where(steps[row] < t, tok[row], M)
            logits = fwd(x, pos[row:row + 1], mask[row:row + 1])[0, P:]
            at = steps[row] == t
            logp = np.log(_softmax(logits))[np.arange(R), tok[row]]
            np.testing.assert_allclose(np.asarray(ro.logp_raw_BxR)[row][at], logp[at], atol=2e-5)
            lg = logits / 0.7
            lg[:, M] = -np.inf
            conf = _softmax(lg)[np.arange(R), tok[row]]
            np.testing.assert_allclose(np.asarray(ro.confidence_BxR)[row][at], conf[at], rtol=1e-4)
    np.testing.assert_allclose(ro.logp_BxR, np.log(ro.confidence_BxR), rtol=1e-5, atol=1e-6)
    assert max(counts) > 2 and 2 in counts        # threshold commits in parallel, fallback used too
    # prefill + one call per step; a block takes as many steps as its slowest row
    n_iter = sum(max(len(set(steps[row, j * BS:(j + 1) * BS])) for row in range(8)) for j in range(R // BS))
    assert int(aux["num_forwards"]) == 1 + n_iter


@pytest.mark.devices(8)
def test_block_deterministic_and_sharded_equal():
    _, params, _ = _model()
    prompt, pmask = _rows8()
    fn = _dynamic_fn()
    a, _ = fn(params, prompt, pmask, jax.random.key(7))
    b, _ = fn(params, prompt, pmask, jax.random.key(7))
    c, _ = fn(params, prompt, pmask, jax.random.key(8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens_BxR, c.tokens_BxR)
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None))
    sp = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.P()))
    s, _ = fn(sp, jax.device_put(jnp.asarray(prompt), batch), jax.device_put(jnp.asarray(pmask), batch),
              jax.random.key(7))
    assert len(s.tokens_BxR.sharding.device_set) == 8
    np.testing.assert_array_equal(s.tokens_BxR, a.tokens_BxR)
    np.testing.assert_array_equal(s.step_map_BxR, a.step_map_BxR)


# ---------------------------------------------------------------------------------------- LLaDA sampler

def _llada_fn(layers=2, **kw):
    graphdef, _, _ = _model(layers)
    args = dict(prompt_len=P, gen_len=R, block_len=BS, steps=4, mask_token_id=M, eos_id=None, pad_id=PAD,
                sampling=GREEDY)
    return D.make_llada_generate_fn(graphdef, **{**args, **kw})


def test_llada_greedy_equals_naive_loop():
    _, params, fwd = _model()
    prompt, pmask = _prompts()
    kw = dict(block=BS, k_sched=[2, 2], bidirectional=True)   # 2 blocks x 2 steps, 2 tokens per step
    ref_tok, _ = _greedy_ref(fwd, prompt, pmask, (), **kw)
    eos = _pick_eos(ref_tok)
    ref_tok, ref_step = _greedy_ref(fwd, prompt, pmask, eos, **kw)
    ro, aux = _llada_fn(eos_id=eos[0])(params, prompt, pmask, jax.random.key(0))
    np.testing.assert_array_equal(ro.tokens_BxR, ref_tok)
    np.testing.assert_array_equal(ro.step_map_BxR, ref_step)
    for row in range(8):   # tokens committed in the same step share its id: 2 per step (the EOS cut aside)
        s = np.asarray(ro.step_map_BxR)[row][np.asarray(ro.response_mask_BxR)[row]]
        counts = np.unique(s, return_counts=True)[1]
        assert (counts[:-1] == 2).all() and counts[-1] in (1, 2)
    blocks = 1 if (np.asarray(ro.length_B) <= BS).all() and not np.asarray(ro.truncated_B).any() else 2
    assert int(aux["num_forwards"]) == 2 * blocks


@pytest.mark.parametrize("layers,refresh", [(2, 1), (1, None)])
def test_llada_threshold_dual_cache_equals_uncached_loop(layers, refresh):
    """Fast-dLLM dual cache refreshed every step == uncached naive threshold loop; and a 1-layer model's
    K/V depend only on (token, position), so there the stale-suffix dual cache (refresh once per block) is exact.
    """
    _, params, fwd = _model(layers)
    prompt, pmask = _prompts()
    ref_tok, ref_step = _greedy_ref(fwd, prompt, pmask, (), block=BS, k_sched=None, bidirectional=True, tau=0.12)
    ro, aux = _llada_fn(layers, threshold=0.12, use_cache=True, refresh_interval=refresh)(
        params, prompt, pmask, jax.random.key(3))
    np.testing.assert_array_equal(ro.tokens_BxR, ref_tok)
    np.testing.assert_array_equal(ro.step_map_BxR, ref_step)
    steps = np.asarray(ro.step_map_BxR)
    n_iter = sum(max(len(set(steps[row, j * BS:(j + 1) * BS])) for row in range(8)) for j in range(R // BS))
    assert int(aux["num_forwards"]) == n_iter < R          # parallel commits happened
    for row in range(8):   # threshold mode: >= 1 token per step, every step id used
        assert sorted(set(steps[row])) == list(range(steps[row].max() + 1))
    assert any((np.unique(steps[row], return_counts=True)[1] > 1).any() for row in range(8))


# ----------------------------------------------------------------------------------------------- errors

def test_bad_arguments_raise_one_sentence():
    graphdef, params, _ = _model()
    cases = [
        (_block_fn, dict(max_new_tokens=6), "multiples of block_size"),
        (_block_fn, dict(steps_per_block=3), "must divide block_size"),
        (_block_fn, dict(remasking="dynamic", threshold=1.5), r"threshold must be in \(0, 1\]"),
        (_block_fn, dict(remasking="sometimes"), "remasking must be"),
        (_block_fn, dict(eos_ids=(M,)), "other than the mask token"),
        (_block_fn, dict(sampling=SamplingParams(hapo_tau=0.1)), "HAPO"),
        (_llada_fn, dict(block_len=3), "multiple of block_len"),
        (_llada_fn, dict(steps=3), "multiple of the number of blocks"),
        (_llada_fn, dict(threshold=0.0), r"threshold must be in \(0, 1\]"),
        (_llada_fn, dict(confidence="margin"), "confidence must be one of"),
    ]
    for make, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            make(**kw)
    long_prompt = np.ones((2, P + 1), np.int32)
    with pytest.raises(ValueError, match="prompt_len is 8"):
        _block_fn()(params, long_prompt, long_prompt.astype(bool), jax.random.key(0))
