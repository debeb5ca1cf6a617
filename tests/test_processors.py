"""Logits processors and the one-step sampler (sampling/processors.py) against numpy and transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxrl_reason.sampling import processors as pr

V = 8


def _np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_process(x, t=1.0, k=0, p=1.0, m=0.0):
    """Straightforward numpy reference, one row at a time, written from the transformers warper definitions."""
    x = np.asarray(x, np.float64) / t
    out = x.copy()
    if 0 < k < x.size:
        kth = np.sort(out)[-k]
        out[out < kth] = -np.inf
    if p < 1.0:
        order = np.argsort(out)  # ascending
        cum = np.cumsum(_np_softmax(out[order]))
        remove = cum <= 1.0 - p
        remove[-1] = False
        out[order[remove]] = -np.inf
    if m > 0.0:
        probs = _np_softmax(out)
        out[probs < m * probs.max()] = -np.inf
    return out


def _one_sentence(msg):
    return msg.endswith(".") and "\n" not in msg and ". " not in msg.rstrip(".").replace("e.g. ", "")


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(size=(6, V)).astype(np.float32) * 2.0


@pytest.mark.parametrize("t,k,p,m", [(1.0, 3, 1.0, 0.0), (0.7, 0, 0.6, 0.0), (1.3, 0, 1.0, 0.2),
                                     (0.8, 5, 0.9, 0.05), (1.0, 1, 1.0, 0.0), (1.0, V, 0.3, 0.0)])
def test_process_logits_matches_numpy(logits, t, k, p, m):
    params = pr.SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m).validate()
    got = np.asarray(pr.process_logits(jnp.asarray(logits), params))
    for row, want in zip(got, (_np_process(r, t, k, p, m) for r in logits)):
        np.testing.assert_array_equal(np.isinf(row), np.isinf(want))
        np.testing.assert_allclose(row[~np.isinf(row)], want[~np.isinf(want)], rtol=1e-6)


def test_per_row_arguments_match_scalar_rows(logits):
    ks, ps, ms, ts = np.array([0, 1, 2, 3, 7, 8]), np.array([1.0, 0.2, 0.5, 0.7, 0.95, 0.05]), \
        np.array([0.0, 0.1, 0.3, 0.5, 0.9, 1.0]), np.array([0.5, 1.0, 1.5, 2.0, 0.3, 1.1])
    x = jnp.asarray(logits)
    got_k, got_p = np.asarray(pr.top_k(x, jnp.asarray(ks))), np.asarray(pr.top_p(x, jnp.asarray(ps)))
    got_m, got_t = np.asarray(pr.min_p(x, jnp.asarray(ms))), np.asarray(pr.temperature(x, jnp.asarray(ts)))
    for i in range(len(logits)):
        np.testing.assert_array_equal(got_k[i], _np_process(logits[i], k=int(ks[i])).astype(np.float32))
        np.testing.assert_array_equal(np.isinf(got_p[i]), np.isinf(_np_process(logits[i], p=ps[i])))
        np.testing.assert_array_equal(np.isinf(got_m[i]), np.isinf(_np_process(logits[i], m=ms[i])))
        np.testing.assert_allclose(got_t[i], logits[i] / ts[i], rtol=1e-6)
    # Per-row arguments broadcast over the leading dims of [B, T, V] logits.
    got3 = np.asarray(pr.top_k(jnp.stack([x, 2.0 * x], axis=1), jnp.asarray(ks)))
    np.testing.assert_array_equal(got3[:, 0], got_k)
    np.testing.assert_array_equal(got3[:, 1], 2.0 * got_k)


def test_matches_transformers_warpers(logits):
    torch = pytest.importorskip("torch")
    from transformers.generation import logits_process as lp
    scores = torch.tensor(logits)
    for warper, ours in [(lp.TemperatureLogitsWarper(0.6), lambda x: pr.temperature(x, 0.6)),
                         (lp.TopKLogitsWarper(3), lambda x: pr.top_k(x, 3)),
                         (lp.TopPLogitsWarper(0.75), lambda x: pr.top_p(x, 0.75)),
                         (lp.MinPLogitsWarper(0.15), lambda x: pr.min_p(x, 0.15))]:
        want = warper(None, scores.clone()).numpy()
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(logits))), want, rtol=1e-6)


_sample = jax.jit(pr.sample_logits, static_argnums=2)


@pytest.mark.parametrize("params", [pr.SamplingParams(temperature=0.6), pr.SamplingParams(temperature=1.4, top_k=4),
                                    pr.SamplingParams(top_p=0.8), pr.SamplingParams(temperature=0.9, min_p=0.12)],
                         ids=["temperature", "top_k", "top_p", "min_p"])
def test_sample_frequencies_match_processed_distribution(params):
    """Chi-square goodness of fit of 100k one-step samples (fixed key) against the numpy processed distribution.

    The fit is accepted at p > 1e-6 and the same counts are rejected at p < 1e-6 against the distribution
    WITHOUT the processor under test (the test has the power to catch a wrong processor).
    """
    n = 100_000
    row = np.array([1.2, -0.3, 0.4, 2.0, -1.5, 0.0, 0.9, -0.7], np.float32)
    want = _np_softmax(_np_process(row, params.temperature, params.top_k, params.top_p, params.min_p))
    sample = _sample(jax.random.key(1), jnp.broadcast_to(row, (n, V)), params)
    counts = np.bincount(np.asarray(sample.token), minlength=V)
    assert np.all(counts[want == 0] == 0)
    support = want > 0
    assert scipy.stats.chisquare(counts[support], n * want[support]).pvalue > 1e-6, (counts, n * want)
    only_temperature = (params.top_k, params.top_p, params.min_p) == (0, 1.0, 0.0)
    wrong = _np_softmax(row / (1.0 if only_temperature else params.temperature))  # the processor left out
    assert scipy.stats.chisquare(counts, n * wrong).pvalue < 1e-6
    tok = np.asarray(sample.token[:50])
    np.testing.assert_allclose(np.asarray(sample.logp[:50]), np.log(want[tok]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sample.prob[:50]), want[tok], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sample.logp_raw[:50]), np.log(_np_softmax(row)[tok]), atol=1e-5)
    raw = _np_softmax(row)
    np.testing.assert_allclose(np.asarray(sample.entropy[0]), -(raw * np.log(raw)).sum(), rtol=1e-5)


def test_greedy_and_determinism(logits):
    x = jnp.asarray(logits)
    g = _sample(jax.random.key(0), x, pr.SamplingParams(greedy=True, temperature=0.3, top_k=2))
    np.testing.assert_array_equal(np.asarray(g.token), logits.argmax(-1))
    np.testing.assert_array_equal(np.asarray(g.logp), 0.0)
    np.testing.assert_allclose(np.asarray(g.logp_raw), np.log(_np_softmax(logits).max(-1)), atol=1e-6)
    ties = jnp.array([[1.0, 3.0, 3.0, 0.0], [-jnp.inf, 2.0, -jnp.inf, 2.0]])  # the first maximum, as np.argmax
    np.testing.assert_array_equal(np.asarray(_sample(jax.random.key(0), ties, pr.SamplingParams(greedy=True)).token),
                                  [1, 1])
    s = pr.SamplingParams(top_p=0.9)
    a, b = _sample(jax.random.key(3), x, s), _sample(jax.random.key(3), x, s)
    np.testing.assert_array_equal(np.asarray(a.token), np.asarray(b.token))


def test_token_entropy_handles_masked_logits():
    x = jnp.array([[0.0, 0.0, -jnp.inf, -jnp.inf], [1.0, 2.0, 3.0, 4.0]])
    want1 = -(_np_softmax([1, 2, 3, 4]) * np.log(_np_softmax([1, 2, 3, 4]))).sum()
    np.testing.assert_allclose(np.asarray(pr.token_entropy(x)), [np.log(2.0), want1], rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(min_p=-0.1), dict(hapo_tau=1.0),
                                    dict(order=("temperature", "typical")), dict(order=("top_k", "top_k"))])
def test_validate_errors_are_one_sentence(kwargs):
    with pytest.raises(ValueError) as e:
        pr.SamplingParams(**kwargs).validate()
    assert _one_sentence(str(e.value)), str(e.value)


def test_from_dict():
    assert pr.SamplingParams.from_dict({"top_p": 0.9, "order": ["top_p", "temperature"]}) == \
        pr.SamplingParams(top_p=0.9, order=("top_p", "temperature"))
    with pytest.raises(ValueError, match="Unknown sampling option 'typical_p'") as e:
        pr.SamplingParams.from_dict({"typical_p": 0.9})
    assert _one_sentence(str(e.value))


def test_order_is_respected():
    """top-k before temperature equals temperature before top-k; top-p before temperature differs."""
    row = jnp.array([[2.0, 1.0, 0.5, -1.0]])
    a = pr.process_logits(row, pr.SamplingParams(temperature=3.0, top_p=0.6))
    b = pr.process_logits(row, pr.SamplingParams(temperature=3.0, top_p=0.6, order=("top_p", "temperature")))
    np.testing.assert_array_equal(np.isinf(np.asarray(a)), np.isinf(_np_process(row[0], 3.0, p=0.6)[None]))
    np.testing.assert_array_equal(np.isinf(np.asarray(b)), [[False, True, True, True]])


@pytest.mark.parametrize("sign_compat", [False, True])
def test_hapo_adaptive_temperature(logits, sign_compat):
    """HAPO: H on base-T logits, h~ from the previous step's stats, T = T_base (1 + tau h~)."""
    stats = {"pivot": jnp.float32(0.3), "sigma": jnp.float32(0.5), "h_max": jnp.float32(2.0),
             "h_min": jnp.float32(-3.0)}
    t_base, tau = 0.8, 0.1
    probs = _np_softmax(logits / t_base)
    ent = -(probs * np.log(probs)).sum(-1)
    h = (np.log(ent) - 0.3) / (0.5 + 1e-6)
    neg = 1.0 / -3.0 if sign_compat else 1.0 / 3.0
    want_t = t_base * (1 + tau * np.clip(np.where(h > 0, h / 2.0, h * neg), -1, 1))
    got_t = pr.entropy_adaptive_temperature(jnp.asarray(logits), stats, t_base, tau, sign_compat)
    np.testing.assert_allclose(np.asarray(got_t), want_t, rtol=1e-5)
    params = pr.SamplingParams(temperature=t_base, hapo_tau=tau, hapo_sign_compat=sign_compat, top_k=5)
    got = np.asarray(pr.process_logits(jnp.asarray(logits), params, stats))
    want = np.stack([_np_process(r, t, k=5) for r, t in zip(logits, want_t)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Step 1 (no statistics): the plain base temperature.
    np.testing.assert_allclose(np.asarray(pr.process_logits(jnp.asarray(logits), params)),
                               np.stack([_np_process(r, t_base, k=5) for r in logits]), rtol=1e-6)
