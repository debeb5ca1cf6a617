"""TFDS array_record round trip (no TensorFlow), read back in a fresh process without the builder class."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow_datasets")

from jaxrl_reason.data import arithmetic as A  # noqa: E402
from jaxrl_reason.data.example import Example  # noqa: E402
from jaxrl_reason.data.loaders import load_examples  # noqa: E402
from jaxrl_reason.data.tfds_builders import build_dataset, load_split  # noqa: E402


def _as_dict(ex: Example) -> dict:
    return {"prompt": ex.prompt, "answer": ex.answer, "data_source": ex.data_source, "extra": ex.extra}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    train, held = A.split_disjoint(7, 3)
    splits = {"train": [A.to_example(p) for p in train],
              "test": [A.to_example(p) for p in held] + [
                  Example("Ünïcode ✓ prompt\nline 2", "\\frac{1}{2}", "reasoning_gym/x",
                          {"entry": {"metadata": {"difficulty": [1, 2]}}, "messages": [{"role": "user"}]})]}
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return build_dataset(splits, data_dir, "arith_tiny"), data_dir, splits


def test_round_trip_in_a_fresh_process(built):
    path, _, splits = built
    assert path.endswith(os.path.join("arith_tiny", "1.0.0"))
    code = ("import json, sys\n"
            "from jaxrl_reason.data.tfds_builders import load_split\n"
            "out = {s: [load_split(sys.argv[1], s)[i] for i in range(len(load_split(sys.argv[1], s)))]\n"
            "       for s in ('train', 'test')}\n"
            "print(json.dumps(out, sort_keys=True))\n"
            "assert 'tensorflow' not in sys.modules\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {s: [_as_dict(ex) for ex in exs] for s, exs in splits.items()}   # same order, same values


def test_in_process_access_patterns(built):
    path, data_dir, splits = built
    src = load_split(data_dir, "test", name="arith_tiny")          # data_dir + name
    assert len(src) == 4 and src[3] == _as_dict(splits["test"][3])
    assert src[[2, 0]] == [_as_dict(splits["test"][2]), _as_dict(splits["test"][0])]
    src = load_split(os.path.dirname(path), "train")              # <data_dir>/<name>: latest version
    assert [src[i]["prompt"] for i in range(len(src))] == [ex.prompt for ex in splits["train"]]
    with pytest.raises(ValueError, match="split 'validation' is not in"):
        load_split(path, "validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(data_dir, "train", name="missing")
    with pytest.raises(FileNotFoundError, match="no TFDS dataset"):
        load_split(data_dir, "train")


def test_existing_dataset_needs_overwrite(built, tmp_path):
    path, data_dir, _ = built
    with pytest.raises(ValueError, match="already exists"):
        build_dataset({"train": [A.to_example(A.sample_problems(0, 1)[0])]}, data_dir, "arith_tiny")
    small = {"train": [Example("p", "1", "s", {})]}
    build_dataset(small, str(tmp_path), "redo")
    build_dataset({"train": [Example("q", "2", "s", {}), Example("r", "3", "s", {})]}, str(tmp_path), "redo",
                  overwrite=True)
    src = load_split(str(tmp_path), "train", name="redo")
    assert [src[i]["prompt"] for i in range(len(src))] == ["q", "r"]


def test_from_a_jsonl_file(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"... #### {i}"}) for i in range(3)))
    examples, n_skipped = load_examples(str(path))
    out = build_dataset({"train": examples[:2], "test": examples[2:]}, str(tmp_path / "d"), "gsm")
    assert n_skipped == 0 and load_split(out, "test")[0] == {
        "prompt": "q2", "answer": "2", "data_source": "gsm", "extra": {"raw_answer": "... #### 2"}}


@pytest.mark.parametrize("splits, name, match", [
    ({"train": [Example("p", "1", "s")]}, "Bad-Name", "dataset name"),
    ({}, "ok", "at least one split"),
    ({"train": []}, "ok", "at least one example"),
    ({"train": ["not an example"]}, "ok", "list of Example"),
    ({"train": [Example("p", "1", "s", {"x": {1, 2}})]}, "ok", "not JSON-serializable"),
])
def test_bad_arguments(tmp_path, splits, name, match):
    with pytest.raises(ValueError, match=match):
        build_dataset(splits, str(tmp_path), name)
    assert not os.path.exists(tmp_path / name)
