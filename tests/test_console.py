"""Console output of a run: start-up summary, per-iteration lines every log_every, learning-signal warnings."""
import io
import types

import jax
import numpy as np

from rl_testing import tiny_config

from jaxrl_reason.train import console


def _metrics(kept=4, std=0.5, reward=0.25):
    return {"reward/mean": reward, "reward/accuracy": reward, "reward/std": std, "response/length_mean": 21.06,
            "rollout/kept_groups": kept, "rollout/rounds": 2}


def test_iteration_lines_every_log_every_with_eta_and_warnings():
    config = tiny_config(train__num_steps=5, train__log_every=2)
    clock = iter([100.0, 104.0, 108.0, 112.0, 116.0, 120.0])
    out = io.StringIO()
    log = console.IterationLog(config, lines=True, file=out, clock=lambda: next(clock))
    log.iteration(1, _metrics())                # not a multiple of 2: no line
    log.iteration(2, _metrics(kept=0))          # warning + line
    log.iteration(3, _metrics(std=0.0, reward=0.0))
    log.iteration(4, _metrics())
    log.iteration(5, _metrics())                # the last iteration always prints
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("warning: iteration 2: dynamic sampling kept 0 of 4 groups after 2 rounds")
    # the clock is read at the start (100) and at each printed line: 104 after 2 iterations -> 2 s/it, 3 left: 6 s
    assert lines[1] == "iter 2/5  reward 0.250  length 21.1  kept 0/4 groups (2 rounds)  2.0 s/it  ETA 0m06s"
    assert lines[2].startswith("warning: iteration 3: every reward of the batch equals 0.000")
    assert lines[3].startswith("iter 4/5 ") and lines[4].startswith("iter 5/5 ") and lines[4].endswith("ETA 0m00s")
    assert len(lines) == 5


def test_terminal_shows_no_lines_but_warnings():
    out = io.StringIO()
    out.isatty = lambda: True
    log = console.IterationLog(tiny_config(), file=out)
    log.iteration(1, _metrics())
    log.iteration(2, _metrics(kept=0))
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("warning: iteration 2")


def test_startup_summary_names_model_data_method_mesh():
    config = tiny_config("dapo", model__init="random")
    task = types.SimpleNamespace(train=[0] * 7, heldout=[0] * 3)
    params = {"policy": {"w": np.zeros((10, 10), np.float32), "b": np.zeros((5,), np.float32)}}
    mesh = jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "tensor"))
    lines = console.summary_lines(config, task, params, mesh)
    assert lines[0] == "model: random init  105 parameters, float32"
    assert lines[1] == "data: arithmetic arithmetic  train 7 prompts, held-out 3"
    assert lines[2].startswith("method: dapo  loss ppo/token-mean  advantage grpo  filter zero_variance  batch 4 "
                               "prompts x 4 samples")
    # params 420 B + grads 420 B + Adam moments 105 x 8 B
    assert lines[3].endswith("trained state ~1.68KB (params, grads, Adam moments)")


def test_wandb_logger_is_optional_and_logs_the_iteration_metrics(monkeypatch, tmp_path):
    import sys

    import pytest

    from jaxrl_reason.train import workdir

    config = tiny_config(train__wandb_project="proj")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ValueError, match="wandb is not installed: pip install wandb"):
        with workdir.claim(config, str(tmp_path)):
            pass
    logged = []
    fake = types.SimpleNamespace(init=lambda **kw: types.SimpleNamespace(
        log=lambda m, step: logged.append((step, m)), project=kw["project"]))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = console.IterationLog(config, lines=False, file=io.StringIO())
    assert log.wandb.project == "proj"
    log.iteration(1, {**_metrics(), "note": "text"})
    assert logged == [(1, _metrics())]
