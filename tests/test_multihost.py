"""train/multihost.py's row bookkeeping in one process (8 fake devices), against numpy slicing; the helpers across
two processes are exercised by tests/test_multiprocess_loop.py (the whole loop)."""
import jax
import numpy as np
import pytest

from jaxrl_reason.models import sharding as sharding_lib
from jaxrl_reason.train import multihost


@pytest.fixture(scope="module")
def mesh():
    return sharding_lib.make_mesh(2, 2, 2)


@pytest.mark.devices(8)
def test_process_rows_one_process_holds_every_row_and_bad_splits_are_one_sentence(mesh):
    assert multihost.process_rows(mesh, 16, group_size=4) == [range(0, 16)]
    with pytest.raises(ValueError, match="does not split over the 4 data x fsdp devices"):
        multihost.process_rows(mesh, 10)
    with pytest.raises(ValueError, match="no such mesh"):
        multihost.process_rows(None, 8)


@pytest.mark.devices(8)
def test_local_rows_reads_row_sharded_and_replicated_arrays(mesh):
    host = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    for sharding in (sharding_lib.batch_sharding(mesh, 2), jax.sharding.NamedSharding(mesh, jax.P())):
        x = multihost.global_from_host(host, sharding)
        assert x.sharding == sharding
        np.testing.assert_array_equal(multihost.local_rows(x, range(4, 12)), host[4:12])
        np.testing.assert_array_equal(multihost.local_rows(x, range(0, 16)), host)
    by_columns = jax.device_put(np.zeros((16, 4), np.float32),  # no shard holds a whole row
                                jax.sharding.NamedSharding(mesh, jax.P(None, "tensor")))
    with pytest.raises(ValueError, match="not whole"):
        multihost.local_rows(by_columns, range(0, 4))


def test_gather_rows_puts_rows_back_in_row_order():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(8, 3)), rng.integers(0, 9, size=(8,))
    # this process contributed rows 4..7 then 0..3 (two sampler calls, its half of each)
    parts = (np.concatenate([a[4:], a[:4]]), np.concatenate([b[4:], b[:4]]))
    got_a, got_b = multihost.gather_rows(parts, [[range(4, 8), range(0, 4)]], 8)
    np.testing.assert_array_equal(got_a, a)
    np.testing.assert_array_equal(got_b, b)
    with pytest.raises(ValueError, match="exactly once"):
        multihost.gather_rows(parts, [[range(4, 8), range(3, 7)]], 8)


def test_one_process_helpers_are_plain_reads():
    x = jax.numpy.arange(6.0)
    out = multihost.to_host({"x": x, "none": None})
    assert isinstance(out["x"], np.ndarray) and out["none"] is None
    np.testing.assert_array_equal(out["x"], np.arange(6.0))
    fn = lambda *a: a  # noqa: E731
    assert multihost.replicated_sampler(fn) is fn
    assert multihost.any_process(True) and not multihost.any_process(False)
