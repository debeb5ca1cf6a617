"""A corrupted newest checkpoint: restore falls back to the newest intact one, and the run can save again."""
import os

import jax
import numpy as np
import optax
from flax import nnx

from jaxrl_reason.train.checkpoint import Checkpointer, abstract_like
from jaxrl_reason.train.state import init_train_state


def _state(scale: float):
    state = init_train_state(nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param), optax.adam(1e-2), 1)
    return state._replace(params=jax.tree.map(lambda p: p * scale, state.params))


def _corrupt(step_dir):
    for root, _, files in os.walk(step_dir):
        for name in files:
            if "state" in root and name not in ("_METADATA", "_sharding", "manifest.ocdbt"):
                with open(os.path.join(root, name), "wb") as f:
                    f.write(os.urandom(64))


def test_corrupted_newest_step_falls_back_with_a_warning(tmp_path, capsys):
    d = str(tmp_path / "ckpt")
    with Checkpointer(d, max_to_keep=3) as ckpt:
        ckpt.save(1, _state(1.0), {"iteration": 1}, force=True)
        ckpt.save(2, _state(2.0), {"iteration": 2}, force=True)
    _corrupt(os.path.join(d, "2"))
    target = abstract_like(_state(0.0))
    with Checkpointer(d, max_to_keep=3) as ckpt:
        state, meta = ckpt.restore(target)
        assert meta == {"iteration": 1}
        for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(_state(1.0).params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert ckpt.all_steps() == [1] and os.path.isdir(os.path.join(d, "2.corrupt"))
        ckpt.save(2, _state(3.0), {"iteration": 2}, force=True)  # the resumed run saves that step again
        assert ckpt.all_steps() == [1, 2]
    out = capsys.readouterr().out
    assert f"checkpoint {d}/2 cannot be restored" in out and "resumed from step 1" in out


def test_layout_mismatch_renames_nothing_and_raises(tmp_path):
    d = str(tmp_path / "ckpt")
    with Checkpointer(d) as ckpt:
        ckpt.save(1, _state(1.0), {}, force=True)
        ckpt.save(2, _state(1.0), {}, force=True)
    other = init_train_state(nnx.state(nnx.Linear(3, 5, rngs=nnx.Rngs(0)), nnx.Param), optax.adam(1e-2), 1)
    with Checkpointer(d) as ckpt:
        try:
            ckpt.restore(abstract_like(other))
            raise AssertionError("a mismatched target restored")
        except ValueError as e:
            assert "with shape" in str(e) and "step 2" in str(e)
        assert ckpt.all_steps() == [1, 2]
