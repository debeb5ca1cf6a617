"""REPRO in the training loop (methods/repro.py) against direct per-query forwards and an
explicit-loop reference of the whole process-advantage pipeline; padding, chunking and sharding invariance."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_reason.data.tokenizer import build_char_tokenizer, encode_batch_left_padded, encode_responses_right_padded
from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.models.transformer import Transformer, TransformerConfig
from jaxrl_reason.methods import repro
from jaxrl_reason.train.logprobs import LogpSpec
from jaxrl_reason.train.contracts import Rows

PROMPTS = ["12+7+30:", "12+7+30:", "5+6+7:", "5+6+7:", "3+4+5:", "3+4+5:", "3+4+5:"]
ANSWERS = ["49", "49", "18", "18", "12", "12", "12"]
RESPONSES = [
    "12+7=19 19+30=49 #### 49",  # 2 segments
    "12+7=19 check 12+7=19 19+30=49 #### 49",  # 4 segments, top-3 selected
    "5+6=11 11+7=18 #### 18",
    "18",  # no delimiter: 0
    "3+4=7 #### 12",  # 1 segment: 0
    "3+4=7 7+5=12 12",  # no "####": the whole response is thinking, "12<eos>" is the conclusion
    "3+4=7 7+5=12 #### 12",  # becomes a zero-weight padding row (response mask 0)
]
K, W, PREFIX, THINK_END = 3, 0.3, "#### ", "####"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = build_char_tokenizer(str(tmp_path_factory.mktemp("tok")))
    cfg = TransformerConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                            num_kv_heads=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.lm_head[...] = model.lm_head[...] * 4.0  # sharper, more varied next-token distributions
    graphdef, params = nnx.split(model, nnx.Param)
    return tok, model, graphdef, params


@pytest.fixture(scope="module")
def base(setup):
    """The default run (chunk_size 4), shared by the tests; its scorer is reused so it compiles once."""
    tok, _, graphdef, params = setup
    scorer = repro.make_answer_scorer(graphdef)
    rows = make_rows(tok)
    adv, metrics = run(tok, scorer, params, rows)
    return scorer, rows, adv, metrics


def make_rows(tok, prompt_len=10, resp_len=40, seed=0):
    p, pm = encode_batch_left_padded(tok, PROMPTS, prompt_len)
    r, rm = encode_responses_right_padded(tok, RESPONSES, resp_len)
    rm[-1] = False
    ent = np.random.default_rng(seed).uniform(0.1, 3.0, (len(PROMPTS), resp_len)).astype(np.float32)
    n, zeros = len(PROMPTS), np.zeros(ent.shape, np.float32)
    return Rows(prompt_tokens_NxP=p, prompt_mask_NxP=pm, tokens_NxR=r, response_mask_NxR=rm, logp_sampler_NxR=zeros,
                logp_sampler_raw_NxR=zeros, entropy_NxR=ent, length_N=rm.sum(1).astype(np.int32),
                truncated_N=np.zeros(n, bool), score_N=np.zeros(n, np.float32), example_index_N=np.arange(n),
                answer_N=None)


def run(tok, scorer, params, rows, **kw):
    kw = {"chunk_size": 4, **kw}
    return repro.process_advantage_for_rows(rows, ANSWERS, tok, scorer, params, delimiter_ids=repro.token_ids(tok, " "),
                                            answer_prefix=PREFIX, think_end_ids=repro.token_ids(tok, THINK_END), k=K,
                                            w=W, **kw)


@functools.partial(jax.jit, static_argnums=0)
def _direct_logits(graphdef, params, ids_1xS):
    """Full causal forward of one query RIGHT-padded to a fixed S (the padding after it changes nothing)."""
    model = nnx.merge(graphdef, params)
    s = ids_1xS.shape[1]
    logits, _ = model(ids_1xS, jnp.arange(s)[None], jnp.tril(jnp.ones((s, s), bool))[None])
    return logits[0]


def direct_J(model, tok, context: str, answer: str, size: int = 64) -> float:
    """ONE query on its own (no left padding, positions 0..n-1), float64 log-softmax, mean over the answer."""
    ids = np.asarray(tok(context + PREFIX + answer, add_special_tokens=False)["input_ids"])
    n = ids.size
    padded = np.zeros((1, size), np.int32)
    padded[0, :n] = ids
    logits = np.asarray(_direct_logits(*nnx.split(model, nnx.Param), jnp.asarray(padded)), np.float64)[:n]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(np.mean([logp[t - 1, ids[t]] for t in range(n - len(answer), n)]))


def reference_advantage(model, tok, rows, eps=1e-6):
    """Explicit loops over the scores, process rewards and advantages with
    after_last='zero', before_first='following', scope='batch'."""
    n_rows, R = rows.tokens_NxR.shape
    per_row = {}
    for n in range(n_rows - 1):  # the last row has response mask 0
        text = RESPONSES[n]
        think = text.split(THINK_END)[0] if THINK_END in text else text
        bounds = [i + 1 for i, c in enumerate(think) if c == " "]
        starts = [0] + bounds[:-1]
        order = sorted(range(len(bounds)), key=lambda j: (-rows.entropy_NxR[n, starts[j]], j))[:K]
        sel = sorted(order)
        if len(sel) < 2:
            continue
        jb = direct_J(model, tok, PROMPTS[n], ANSWERS[n])
        J = [direct_J(model, tok, PROMPTS[n] + text[:bounds[j]], ANSWERS[n]) for j in sel]
        S = []
        for t in range(len(J)):
            s_m = 1 - math.tanh(J[t] / jb)
            s_s = 1.0 if t == 0 else 0.5 + 0.5 * sum(np.sign(J[j] - J[i]) for i in range(t + 1)
                                                     for j in range(i + 1, t + 1)) / ((t + 1) * t / 2)
            S.append((1 - W) * s_m + W * s_s)
        per_row[n] = (bounds, sel, [S[0]] + [S[j] - S[j - 1] for j in range(1, len(S))], J, jb)
    allr = np.asarray([x for v in per_row.values() for x in v[2]])
    mean, std = allr.mean(), allr.std()
    adv = np.zeros((n_rows, R))
    for n, (bounds, sel, r, _, _) in per_row.items():
        rn = (np.asarray(r) - mean) / (std + eps)
        rtg = np.cumsum(rn[::-1])[::-1]
        for t in range(int(rows.response_mask_NxR[n].sum())):
            seg = sum(b <= t for b in bounds)
            following = [i for i, j in enumerate(sel) if j >= seg]
            adv[n, t] = rtg[following[0]] if following else 0.0
    return adv, per_row


def test_scorer_matches_direct_forward(setup):
    tok, model, graphdef, params = setup
    contexts = ["12+7+30:", "12+7+30:12+7=19 ", "3+4+5:3+4=7 7+5=12 "]
    answers = ["49", "49", "12"]
    enc = lambda s: np.asarray(tok(s, add_special_tokens=False)["input_ids"], np.int32)
    queries = repro.encode_answer_queries([enc(c) for c in contexts], [enc(a) for a in answers],
                                          repro.token_ids(tok, PREFIX), query_len=40, max_answer_tokens=6)
    assert queries[0][0, :40 - len(contexts[0]) - 7].tolist() == [0] * (40 - len(contexts[0]) - 7)  # left pad
    assert queries[2].sum(1).tolist() == [2, 2, 2] and queries[2][:, -2:].all()  # answer right-aligned
    J = np.asarray(repro.make_answer_scorer(graphdef)(params, *queries))
    ref = [direct_J(model, tok, c, a) for c, a in zip(contexts, answers)]
    np.testing.assert_allclose(J, ref, atol=1e-5)
    assert np.ptp(ref) > 1e-2  # the test distinguishes the queries
    # an all-padding row (chunk padding) scores 0 and does not disturb the others
    padded = [np.concatenate([x, np.zeros((1,) + x.shape[1:], x.dtype)]) for x in queries]
    J_pad = np.asarray(repro.make_answer_scorer(graphdef)(params, *padded))
    # float32 sums over a batch of 4 instead of 3 may tile differently (seen: 1.9e-6 on a J of -7.7 on an AMD EPYC)
    np.testing.assert_allclose(J_pad, list(J) + [0.0], atol=1e-5)


def test_process_advantage_matches_reference(setup, base):
    tok, model, _, _ = setup
    _, rows, adv, metrics = base
    ref, per_row = reference_advantage(model, tok, rows)
    assert sorted(per_row) == [0, 1, 2, 5]  # rows 3 (no delimiter), 4 (one segment), 6 (padding) unscored
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(adv, ref, atol=1e-5)
    for n in (3, 4, 6):
        assert not adv[n].any()
    assert not adv[~rows.response_mask_NxR].any()
    # hand-checked structure of row 0: segments "12+7=19 " | "19+30=49 " | conclusion "#### 49<eos>"
    assert len(set(adv[0, :8])) == 1 and len(set(adv[0, 8:17])) == 1 and not adv[0, 17:].any()
    assert metrics["repro/scored_frac"] == pytest.approx(4 / 7)
    jb = np.mean([per_row[n][4] for n in per_row])
    assert metrics["repro/J_b_mean"] == pytest.approx(jb, abs=1e-5)
    assert metrics["repro/J_last_mean"] == pytest.approx(np.mean([per_row[n][3][-1] for n in per_row]), abs=1e-5)
    # distinct queries: J_b of 3 prompts + boundaries (rows 0 and 1 share "12+7=19 ")
    assert metrics["repro/queries"] == 3 + 2 + 3 + 2 + 2 - 1


def test_chunking_and_padding_do_not_change_results(setup, base):
    tok, _, graphdef, params = setup
    shared_scorer, rows, adv, _ = base
    scorer = repro.make_answer_scorer(graphdef)
    chunked, metrics = run(tok, scorer, params, rows, chunk_size=5)  # 11 queries: last chunk padded
    assert metrics["repro/queries"] % 5
    run(tok, scorer, params, make_rows(tok, seed=1), chunk_size=5)  # another batch, other queries
    assert scorer._cache_size() == 1  # one compilation for the whole run
    np.testing.assert_allclose(chunked, adv, atol=1e-6)
    wide = make_rows(tok, prompt_len=14, resp_len=48)
    wide.entropy_NxR[:, :40] = rows.entropy_NxR
    adv_wide, _ = run(tok, shared_scorer, params, wide)
    np.testing.assert_allclose(adv_wide[:, :40], adv, atol=1e-5)
    assert not adv_wide[:, 40:].any()


@pytest.mark.devices(2)
def test_sharded_queries_equal_unsharded(setup, base):
    tok, _, graphdef, params = setup
    _, rows, adv, _ = base
    mesh = sharding_lib.make_mesh(jax.device_count(), 1, 1)
    sharded = repro.make_answer_scorer(graphdef, sharding_lib.batch_sharding(mesh, 2))
    np.testing.assert_allclose(run(tok, sharded, params, rows, chunk_size=jax.device_count())[0], adv, atol=1e-5)
    with pytest.raises(ValueError, match="do not split"):
        run(tok, sharded, params, rows, chunk_size=jax.device_count() + 1)


@pytest.mark.devices(8)
def test_explicitly_sharded_scorer_equals_unsharded(setup, base):
    """Params with their (fsdp) training shardings and queries over ('data', 'fsdp') as the jit's in/out shardings,
    the LM head in token and vocabulary chunks."""
    tok, _, graphdef, params = setup
    _, rows, adv, _ = base
    mesh = sharding_lib.make_mesh(4, 2, 1)
    param_sh = sharding_lib.param_shardings(params, mesh)
    scorer = repro.make_answer_scorer(graphdef, sharding_lib.batch_sharding(mesh, 1), LogpSpec(8, 5), param_sh)
    np.testing.assert_allclose(run(tok, scorer, jax.device_put(params, param_sh), rows, chunk_size=8)[0], adv,
                               atol=1e-5)


def test_switches_and_bad_arguments(setup, base):
    tok, _, _, params = setup
    scorer, rows, zero, _ = base
    last, _ = run(tok, scorer, params, rows, after_last="last")
    np.testing.assert_allclose(last[0, :17], zero[0, :17], atol=1e-6)
    assert np.all(last[0, 17:25] == last[0, 16]) and not last[0, 25:].any()  # conclusion gets the last value
    with pytest.raises(ValueError, match="max_answer_tokens"):
        run(tok, scorer, params, rows, max_answer_tokens=1)
    with pytest.raises(ValueError, match="answers"):
        repro.process_advantage_for_rows(rows, ANSWERS[:-1], tok, scorer, params, delimiter_ids=5,
                                         answer_prefix=PREFIX, k=K, w=W)
    with pytest.raises(ValueError, match="chunk_size"):
        repro.score_queries(scorer, params, np.zeros((1, 4), np.int32), np.ones((1, 4), bool),
                            np.ones((1, 2), bool), chunk_size=0)


def test_loop_hook_scales_by_alpha(setup, base):
    tok, _, graphdef, params = setup
    _, rows, adv, metrics = base
    fn = repro.make_repro_advantage_fn(graphdef, tok, alpha=0.1, k=K, w=W, delimiter=" ", answer_prefix=PREFIX,
                                       think_end=THINK_END, chunk_size=4)
    with pytest.raises(ValueError, match="answer_N"):
        fn(rows, params)
    extra, hook_metrics = fn(rows.replace(answer_N=np.asarray(ANSWERS)), params)
    np.testing.assert_allclose(extra, 0.1 * adv, atol=1e-7)
    assert hook_metrics == metrics
    with pytest.raises(ValueError, match="alpha"):
        repro.make_repro_advantage_fn(graphdef, tok, alpha=0.0, k=K, w=W, delimiter=" ", answer_prefix=PREFIX)


def test_config():
    from configs import repro as repro_config

    for arg, estimator in (("ppo", "gae"), ("grpo,tiny", "grpo")):
        c = repro_config.get_config(arg)
        assert c.repro.alpha == pytest.approx(0.1) and c.advantage.estimator == estimator
        assert c.algorithm == "repro" and c.scale == "tiny" and c.repro.delimiter == " "
        assert (c.repro.answer_prefix, c.repro.think_end) == ("#### ", "####")
    full = repro_config.get_config("grpo,full").repro
    assert (full.delimiter, full.think_end) == ("\n\n", "</think>")
    with pytest.raises(ValueError, match="REPRO runs on"):
        repro_config.get_config("dapo")
