"""The workdir guard: one run at a time, stale locks taken over, the saved config compared on resume, batch split."""
import json
import os
import subprocess
import sys

import jax
import pytest

from rl_testing import tiny_config

from jaxrl_reason.train import workdir as wd


def test_second_run_refuses_while_the_first_holds_the_lock(tmp_path):
    config = tiny_config()
    with wd.claim(config, str(tmp_path)):
        assert open(tmp_path / wd.LOCK_NAME).read().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(ValueError, match=r"is in use by another run \(pid \d+ on"):
            with wd.claim(config, str(tmp_path)):
                pass
    with wd.claim(config, str(tmp_path)):  # released at exit
        pass


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    # a child takes the lock and dies without any clean-up (os._exit): the kernel drops its flock
    code = ("import fcntl, os; f = open(os.path.join(%r, 'run.lock'), 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('pid 1 on dead'); f.flush(); os._exit(0)" % str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "dead" in open(tmp_path / wd.LOCK_NAME).read()
    with wd.claim(tiny_config(), str(tmp_path)):
        assert open(tmp_path / wd.LOCK_NAME).read().startswith(f"pid {os.getpid()}")


def test_saved_config_refuses_another_method_on_resume_unless_forced(tmp_path, caplog):
    with wd.claim(tiny_config("grpo"), str(tmp_path)):
        pass
    saved = json.load(open(tmp_path / wd.CONFIG_NAME))
    assert saved["algorithm"] == "grpo" and saved["rollout"]["group_size"] == 4
    with wd.claim(tiny_config("gspo"), str(tmp_path)):  # no checkpoint yet: a fresh start, nothing to compare
        pass
    os.makedirs(tmp_path / "checkpoints" / "3")
    with pytest.raises(ValueError, match="another method or model \\(algorithm 'gspo' -> 'grpo'"):
        with wd.claim(tiny_config("grpo"), str(tmp_path)):
            pass
    with wd.claim(tiny_config("grpo", train__force_resume=True), str(tmp_path)):
        pass
    assert json.load(open(tmp_path / wd.CONFIG_NAME))["algorithm"] == "grpo"
    with wd.claim(tiny_config("grpo", optim__lr=0.5), str(tmp_path)):  # other keys: a warning that names them
        pass
    assert "changed config keys: optim.lr" in caplog.text


def test_batch_that_does_not_split_over_the_devices_fails_at_start(tmp_path):
    n = jax.device_count()
    config = tiny_config(rollout__prompts_per_step=3, rollout__group_size=3)
    if 9 % n == 0:
        pytest.skip("needs a device count that does not divide 9")
    with pytest.raises(ValueError, match=f"a micro-batch of 9 rows .* does not split over the {n} data x fsdp"):
        with wd.claim(config, str(tmp_path)):
            pass
    assert not os.path.exists(tmp_path / wd.CONFIG_NAME)
