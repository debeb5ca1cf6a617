"""Mask builders vs brute-force numpy double loops written from the diffusion models' attention tables."""
import jax
import numpy as np
import pytest

from jaxrl_reason.models import attention as A


def _valid(rng, b, t, left_pad=True):
    """Random left-padded (or arbitrary) validity; one row fully padded to exercise the forced diagonal."""
    if left_pad:
        lens = rng.integers(0, t + 1, size=b)
        lens[0] = 0
        return np.arange(t)[None, :] >= (t - lens)[:, None]
    return rng.random((b, t)) < 0.7


def _loop(b, t, s, rule, key_valid, q_slot=None):
    out = np.zeros((b, t, s), bool)
    for r in range(b):
        for q in range(t):
            qs = q if q_slot is None else q_slot + q
            for k in range(s):
                out[r, q, k] = (rule(qs, k) and key_valid[r, k]) or qs == k
    return out


def _floor_blk(i, bs, start):
    return int(np.floor((i - start) / bs))


@pytest.mark.parametrize("seed", range(3))
def test_positions_from_mask(seed):
    rng = np.random.default_rng(seed)
    valid = _valid(rng, 4, 9, left_pad=bool(seed % 2))
    want = np.zeros((4, 9), int)
    for r in range(4):
        c = -1
        for i in range(9):
            c += int(valid[r, i])
            want[r, i] = max(c, 0)
    np.testing.assert_array_equal(np.asarray(A.positions_from_mask(valid)), want)


@pytest.mark.parametrize("seed", range(4))
def test_single_stream_masks(seed):
    rng = np.random.default_rng(seed)
    b, t = 3, int(rng.integers(1, 12))
    valid = _valid(rng, b, t, left_pad=seed % 2 == 0)
    bs, start = int(rng.integers(1, 5)), int(rng.integers(0, t + 1))
    np.testing.assert_array_equal(np.asarray(A.causal_mask(valid)), _loop(b, t, t, lambda q, k: k <= q, valid))
    np.testing.assert_array_equal(np.asarray(A.bidirectional_mask(valid)), _loop(b, t, t, lambda q, k: True, valid))
    want_blk = _loop(b, t, t, lambda q, k: _floor_blk(k, bs, start) <= _floor_blk(q, bs, start), valid)
    np.testing.assert_array_equal(np.asarray(A.block_causal_mask(valid, bs, start)), want_blk)
    np.testing.assert_array_equal(np.asarray(A.attention_mask("block", valid, bs, start)), want_blk)
    np.testing.assert_array_equal(np.asarray(A.attention_mask("causal", valid)), np.asarray(A.causal_mask(valid)))
    np.testing.assert_array_equal(np.asarray(A.block_causal_mask(valid, 1)), np.asarray(A.causal_mask(valid)))
    # no row is empty: every query sees at least itself.
    assert np.asarray(A.causal_mask(valid)).any(-1).all()


@pytest.mark.parametrize("seed", range(4))
def test_cached_masks(seed):
    rng = np.random.default_rng(seed)
    b, s = 2, int(rng.integers(4, 14))
    t = int(rng.integers(1, s + 1))
    idx = int(rng.integers(0, s - t + 1))
    key_valid = rng.random((b, s)) < 0.8
    bs, start = int(rng.integers(1, 5)), int(rng.integers(0, s))
    got = A.cached_causal_mask(key_valid, idx, t)
    np.testing.assert_array_equal(np.asarray(got), _loop(b, t, s, lambda q, k: k <= q, key_valid, idx))
    got = A.cached_block_mask(key_valid, idx, t, bs, start)
    want = _loop(b, t, s, lambda q, k: _floor_blk(k, bs, start) <= _floor_blk(q, bs, start), key_valid, idx)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_cached_mask_equals_slice_of_full_mask():
    rng = np.random.default_rng(7)
    valid = _valid(rng, 3, 10)
    full = np.asarray(A.block_causal_mask(valid, 3, 2))
    got = np.asarray(A.cached_block_mask(valid, 4, 5, 3, 2))
    np.testing.assert_array_equal(got, full[:, 4:9])
    got = np.asarray(A.cached_causal_mask(valid, 4, 5))
    np.testing.assert_array_equal(got, np.asarray(A.causal_mask(valid))[:, 4:9])


@pytest.mark.parametrize("n,bs", [(4, 2), (6, 3), (5, 2), (3, 1)])
def test_bd3_two_stream(n, bs):
    want = np.zeros((2 * n, 2 * n), bool)
    for q in range(2 * n):
        for k in range(2 * n):
            q_clean, k_clean = q >= n, k >= n
            bq, bk = (q - n * q_clean) // bs, (k - n * k_clean) // bs
            if not q_clean and not k_clean:
                want[q, k] = bq == bk
            elif not q_clean and k_clean:
                want[q, k] = bk < bq
            elif q_clean and k_clean:
                want[q, k] = bk <= bq
    np.testing.assert_array_equal(np.asarray(A.bd3_two_stream_mask(n, bs)), want)


@pytest.mark.parametrize("seed", range(4))
def test_tracerl_mask(seed):
    rng = np.random.default_rng(seed)
    p, r, bs = int(rng.integers(1, 7)), int(rng.integers(1, 9)), int(rng.integers(1, 4))
    length, b = p + 2 * r, 2
    key_valid = np.ones((b, length), bool)
    key_valid[:, :p] = _valid(rng, b, p)           # left-padded prompt
    key_valid[1, p + r - 1] = key_valid[1, -1] = False  # a padded last response token, both copies

    def cls(i):
        return "prompt" if i < p else ("clean" if i < p + r else "noisy")

    def blk(i):
        if i < p:
            return _floor_blk(i, bs, p)
        return (i - p) // bs if i < p + r else (i - p - r) // bs

    table = {  # query class -> key class -> rule(bq, bk), the two-stream table
        "prompt": {"prompt": lambda bq, bk: bk <= bq},
        "clean": {"prompt": lambda bq, bk: True, "clean": lambda bq, bk: bk <= bq},
        "noisy": {"prompt": lambda bq, bk: True, "clean": lambda bq, bk: bk < bq, "noisy": lambda bq, bk: bk == bq},
    }

    def rule(q, k):
        f = table[cls(q)].get(cls(k))
        return f is not None and f(blk(q), blk(k))

    want = _loop(b, length, length, rule, key_valid)
    got = jax.jit(A.tracerl_mask, static_argnums=(0, 1, 2))(p, r, bs, key_valid)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_errors():
    v = np.ones((1, 4), bool)
    with pytest.raises(ValueError, match="Unknown attention kind"):
        A.attention_mask("sliding", v)
    with pytest.raises(ValueError, match="block_size"):
        A.block_causal_mask(v, 0)
    with pytest.raises(ValueError, match="P \\+ 2R"):
        A.tracerl_mask(2, 2, 2, np.ones((1, 5), bool))
