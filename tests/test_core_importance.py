"""core/importance.py: TIS / MIS weights and mismatch metrics vs hand cases and a numpy transcription of verl's
rollout-correction formulas (`compute_rollout_importance_weights` truncate / clip modes, no veto, and
`compute_mismatch_metrics`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_reason.core import importance as imp

LN2 = float(np.log(2.0))


def _verl_weights(old, rollout, mask, level, mode, upper, lower=None):
    """verl: log_ratio = old - rollout; token: exp(clamp(lr, -20, 20)); sequence: exp(clamp(masked_sum(lr), ...))
    expanded; truncate: clamp(max=upper); clip: zero outside [lower, upper] (lower defaults to 1 / upper);
    then times the response mask."""
    lr = old - rollout
    if level == "token":
        w = np.exp(np.clip(lr, -20, 20))
    else:
        w = np.broadcast_to(np.exp(np.clip((lr * mask).sum(-1, keepdims=True), -20, 20)), lr.shape)
    lower = 1.0 / upper if lower is None else lower
    if mode == "truncate":
        w = np.minimum(w, upper)
    else:
        w = w * ((w >= lower) & (w <= upper))
    return w * mask


def _verl_mismatch(old, rollout, mask):
    mm = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731  (verl_F.masked_mean)
    lr = old - rollout
    return {"kl_k1": mm(rollout - old), "kl_k3": mm(np.exp(lr) - lr - 1)}


def _random_case(seed=0, n=6, r=9):
    rng = np.random.default_rng(seed)
    rollout = -rng.uniform(0.1, 4.0, (n, r)).astype(np.float32)
    old = (rollout + rng.normal(0, 0.4, (n, r))).astype(np.float32)
    lens = rng.integers(1, r + 1, n)
    lens[-1] = 0  # an empty row (a padded group)
    mask = (np.arange(r)[None] < lens[:, None]).astype(np.float32)
    return old, rollout, mask


def test_hand_case_token_and_sequence_weights():
    # log ratios: row 0 [ln2, -ln2, ln 4], row 1 [0, 0, pad]
    rollout = np.array([[-1.0, -1.0, -2.0], [-0.5, -0.5, -3.0]], np.float32)
    old = rollout + np.array([[LN2, -LN2, 2 * LN2], [0.0, 0.0, 7.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    cap = 3.0
    np.testing.assert_allclose(imp.truncated_weights(old, rollout, mask, cap, "token"),
                               [[2.0, 0.5, 3.0], [1.0, 1.0, 0.0]], rtol=1e-6)
    # sequence: row 0 sums to ln 4 -> 4, truncated at 3; row 1 -> 1 (the padded 7 does not count)
    np.testing.assert_allclose(imp.truncated_weights(old, rollout, mask, cap, "seq"),
                               [[3.0, 3.0, 3.0], [1.0, 1.0, 0.0]], rtol=1e-6)
    # MIS token: 4 > cap is masked out; 0.5 >= 1/3 kept
    np.testing.assert_allclose(imp.masked_weights(old, rollout, mask, cap, "token"),
                               [[2.0, 0.5, 0.0], [1.0, 1.0, 0.0]], rtol=1e-6)
    # with a lower threshold of 0.6 the 0.5 goes too
    np.testing.assert_allclose(imp.masked_weights(old, rollout, mask, cap, "token", lower=0.6),
                               [[2.0, 0.0, 0.0], [1.0, 1.0, 0.0]], rtol=1e-6)
    # MIS sequence: row 0 (weight 4) leaves the loss entirely
    np.testing.assert_allclose(imp.importance_weights("seq_mis", old, rollout, mask, cap),
                               [[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("kind", ["token_tis", "seq_tis", "token_mis", "seq_mis"])
@pytest.mark.parametrize("cap,lower", [(2.0, None), (1.5, 0.0), (4.0, 0.8)])
def test_weights_match_verl_transcription(kind, cap, lower):
    old, rollout, mask = _random_case()
    level, mode = kind.split("_")
    want = _verl_weights(old, rollout, mask, "token" if level == "token" else "sequence",
                         "truncate" if mode == "tis" else "clip", cap, lower)
    got = imp.importance_weights(kind, old, rollout, mask, cap, lower=lower)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


def test_weights_are_constants():
    old, rollout, mask = _random_case(1)
    g = jax.grad(lambda o: jnp.sum(imp.truncated_weights(o, rollout, mask, 2.0) * o))(jnp.asarray(old))
    np.testing.assert_allclose(np.asarray(g), np.asarray(imp.truncated_weights(old, rollout, mask, 2.0)), rtol=1e-6)


def test_huge_log_ratio_is_clamped_not_inf():
    w = imp.truncated_weights(np.array([[0.0, 0.0]]), np.array([[-200.0, -300.0]]), np.ones((1, 2)), 1e30, "seq")
    np.testing.assert_allclose(np.asarray(w), np.exp(20.0), rtol=1e-5)


def test_mismatch_metrics_hand_case_and_verl():
    rollout = np.array([[-1.0, -1.0, -2.0], [-0.5, -0.5, -3.0]], np.float32)
    lr = np.array([[LN2, -LN2, 2 * LN2], [0.0, 0.0, 7.0]], np.float32)
    old = rollout + lr
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    m = {k: float(v) for k, v in imp.mismatch_metrics(old, rollout, mask, cap=3.0).items()}
    assert m["kl_k1"] == pytest.approx(-2 * LN2 / 5, rel=1e-5)
    k3 = [(2 - LN2 - 1), (0.5 + LN2 - 1), (4 - 2 * LN2 - 1)]
    assert m["kl_k3"] == pytest.approx(sum(k3) / 5, rel=1e-5)
    assert m["max_abs"] == pytest.approx(2 * LN2, rel=1e-6)
    assert m["max_ratio"] == pytest.approx(4.0, rel=1e-5)
    assert m["min_ratio"] == pytest.approx(0.5, rel=1e-5)
    assert m["seq_max_ratio"] == pytest.approx(4.0, rel=1e-5)
    assert m["frac_over_cap"] == pytest.approx(1 / 5)
    assert m["seq_frac_over_cap"] == pytest.approx(1 / 2)
    old2, rollout2, mask2 = _random_case(2)
    got = imp.mismatch_metrics(old2, rollout2, mask2)
    for k, v in _verl_mismatch(old2, rollout2, mask2).items():
        assert float(got[k]) == pytest.approx(float(v), rel=1e-5, abs=1e-7), k
    assert "frac_over_cap" not in got


def test_mismatch_metrics_zero_when_equal_and_jittable():
    _, rollout, mask = _random_case(3)
    m = jax.jit(imp.mismatch_metrics)(rollout, rollout, mask)
    assert float(m["max_abs"]) == 0.0 and float(m["kl_k1"]) == 0.0 and float(m["kl_k3"]) == 0.0
    assert float(m["max_ratio"]) == 1.0 and float(m["min_ratio"]) == 1.0
    empty = imp.mismatch_metrics(rollout, rollout, np.zeros_like(mask))
    assert all(float(v) == 0.0 for v in empty.values())


@pytest.mark.parametrize("kind,cap,msg", [("tis", 2.0, "unknown importance correction"),
                                          ("token_tis", 0.0, "positive number"),
                                          ("seq_mis", -1.0, "positive number")])
def test_bad_kind_or_cap_is_one_sentence(kind, cap, msg):
    with pytest.raises(ValueError, match=msg):
        imp.check_kind(kind, cap)
    imp.check_kind("none", None)  # no cap needed when off
