"""The RL loop end to end on a (data, fsdp, tensor) = (2, 2, 2) mesh with 2 micro-batches: the same numbers as on a
data-only mesh with 1 micro-batch; stopped after one iteration and resumed from its checkpoint on the data-only mesh
it repeats the uninterrupted run. The sharded run samples in its own decode layout (rollout.layout "decode": a
(4, 1, 2) mesh the weights are resharded into before each rollout; tests/test_sampler_weights.py shows it gives the
training layout's tokens), so the three loop runs also cover the reshard.

Parameters agree to atol 1e-5 (1% of one Adam step at the smoke lr 1e-3): Adam divides by the root of the squared
gradient, so for a parameter whose gradient is near zero the float-rounding differences of another reduction order
move its update by more than rtol 1e-5 of the parameter."""
import shutil

import numpy as np
import pytest

from rl_testing import digit_scorer, final_policy_params, tiny_config

from jaxrl_reason.train import build, loop
from jaxrl_reason.train.checkpoint import Checkpointer
from jaxrl_reason.train.metrics import read_metrics

SHARDED = dict(mesh__data=2, mesh__fsdp=2, mesh__tensor=2, optim__micro_batches=2)
SHARDED_DECODE = dict(SHARDED, rollout__layout="decode", rollout__decode_tensor=2)
DATA_ONLY = dict(mesh__data=-1, mesh__fsdp=1, mesh__tensor=1, optim__micro_batches=1)


def _config(mesh: dict, steps: int):
    # a KL term, so the frozen reference copy is sharded too
    return tiny_config("grpo", train__num_steps=steps, train__checkpoint_every=1, loss__kl_coef=0.01, **mesh)


def _numbers(workdir) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(str(workdir))]


def _assert_same_run(out_a, dir_a, out_b, dir_b, what: str):
    for x, y in zip(final_policy_params(str(dir_a)), final_policy_params(str(dir_b)), strict=True):
        # AdamW divides by sqrt(v): a gradient entry near zero turns its float rounding (which differs with the
        # reduction order of a sharded step) into an update difference of up to ~2e-5 at lr 1e-3, on 1 of ~2k
        # entries; a real wiring error (a gradient divided by M, a dropped term) moves every entry by far more
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=5e-5, err_msg=f"{what}: params")
    rows_a, rows_b = _numbers(dir_a), _numbers(dir_b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b], what
    for ra, rb in zip(rows_a, rows_b):
        assert sorted(ra) == sorted(rb), f"{what}: metric keys differ at step {ra['step']}"
        for key, value in ra.items():
            np.testing.assert_allclose(rb[key], value, rtol=1e-5, atol=1e-6, err_msg=f"{what}: {key} {ra['step']}")


@pytest.mark.devices(8)
def test_sharded_loop_matches_data_parallel_and_resumes_on_another_mesh(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "arithmetic_scorer", digit_scorer)
    ref_dir, sharded_dir, moved_dir = (tmp_path / d for d in ("ref", "sharded", "moved"))
    ref = loop.run(_config(DATA_ONLY, 2), str(ref_dir))
    sharded = loop.run(_config(SHARDED_DECODE, 2), str(sharded_dir))
    _assert_same_run(ref, ref_dir, sharded, sharded_dir,
                     "(2,2,2) mesh, 2 micro-batches, sampling in a (4,1,2) decode layout vs data-only")

    # the sharded run as if killed after iteration 1's checkpoint, resumed on the data-only mesh
    shutil.copytree(sharded_dir, moved_dir)
    with Checkpointer(str(moved_dir / "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [1, 2]
    shutil.rmtree(moved_dir / "checkpoints" / "2")
    capsys.readouterr()
    moved = loop.run(_config(DATA_ONLY, 2), str(moved_dir))
    assert "resumed from" in capsys.readouterr().out
    _assert_same_run(ref, ref_dir, moved, moved_dir, "stopped on (2,2,2) after iteration 1, resumed on data-only")
