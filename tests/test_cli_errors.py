"""Entry points end a user error with one sentence (exit 2, no traceback); the `own` preset has no toy defaults."""
import importlib
import os
import subprocess
import sys

import pytest

from rl_testing import ROOT

from experiments import _cli
from jaxrl_reason.data.sources import validate_task


def test_missing_config_file_is_two_lines_on_stderr_and_exit_2():
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("JAXRL_TRACEBACK", None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"), "--config=configs/nope.py:tiny"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert lines[-2:] == ["error: config file 'configs/nope.py' does not exist.",
                          "(set JAXRL_TRACEBACK=1 for the full traceback)"]
    assert "Traceback" not in p.stderr


def test_sentences_of_config_key_errors():
    assert _cli.sentence(KeyError("'trainnig'\nDid you mean \"train\" instead of \"trainnig\"?")) == (
        "config: unknown key 'trainnig'; Did you mean \"train\" instead of \"trainnig\"?")
    assert _cli.sentence(AttributeError("'lr'")).startswith("config: unknown key 'lr' (the keys of each section")
    assert _cli.sentence(ValueError("optim.lr must be positive, got -1.")) == "optim.lr must be positive, got -1."


def test_run_plain_exits_2_with_the_sentence(capsys, monkeypatch):
    monkeypatch.delenv("JAXRL_TRACEBACK", raising=False)

    def main(argv):
        raise ValueError("the training set 'x.jsonl' is empty.")

    with pytest.raises(SystemExit) as e:
        _cli.run_plain(main, [])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: the training set 'x.jsonl' is empty.\n")
    monkeypatch.setenv("JAXRL_TRACEBACK", "1")
    with pytest.raises(ValueError):
        _cli.run_plain(main, [])


def test_own_preset_requires_model_and_data():
    c = importlib.import_module("configs.grpo").get_config("own")
    assert c.scale == "full" and c.task.name == "jsonl" and c.rollout.max_new_tokens == 1024
    with pytest.raises(ValueError, match="model.init is empty: point it to your model"):
        validate_task(c)
    c.model.init = "hf:/models/x"
    with pytest.raises(ValueError, match="needs task.train_path"):
        validate_task(c)


def test_plot_without_matplotlib_names_what_to_install(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_no_mpl", os.path.join(ROOT, "experiments", "plot.py"))
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError) as e:
        plot.write_plots({}, "/nonexistent/never_created")
    assert _cli.sentence(e.value) == ("plotting needs matplotlib, which the base install does not include: pip install "
                                      "matplotlib (or the extra: pip install -e '.[nb]').")
