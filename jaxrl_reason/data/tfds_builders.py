"""Materialize lists of `Example`s as a TFDS dataset (array_record, no TensorFlow).

`build_dataset({"train": [...], "test": [...]}, data_dir, name)` writes `<data_dir>/<name>/1.0.0/` with one
array_record file set per split, in the given order (`DatasetInfo(builder=self, disable_shuffling=True)`).
`load_split(path, split)` reads it back with `tfds.builder_from_directory` (no builder class needed, so it
works in a fresh process) and returns a random-access source of dicts
`{"prompt": str, "answer": str, "data_source": str, "extra": dict}` (`len(src)`, `src[i]`, `src[[i, j]]`).

Stored features: the four `Example` fields as `tfds.features.Text` (`extra` as a JSON string).
"""
import json
import os
import re
import shutil
import types

from jaxrl_reason.data.example import Example

VERSION = "1.0.0"
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")


def _tfds():
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    return tfds


def _builder_class(name: str):
    """A GeneratorBasedBuilder subclass named `name` (not registered: many names may be built per process)."""
    tfds = _tfds()

    class ExamplesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        examples_by_split: dict = {}

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                         features=tfds.features.FeaturesDict({
                                             "prompt": tfds.features.Text(),
                                             "answer": tfds.features.Text(),
                                             "data_source": tfds.features.Text(),
                                             "extra": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in self.examples_by_split}

        def _generate_examples(self, split):
            for i, ex in enumerate(self.examples_by_split[split]):
                yield i, {"prompt": ex.prompt, "answer": ex.answer, "data_source": ex.data_source,
                          "extra": json.dumps(ex.extra, sort_keys=True)}

    return types.new_class(name, (ExamplesBuilder,), {"skip_registration": True},
                           lambda ns: ns.update(name=name))


def build_dataset(examples_by_split: dict, data_dir: str, name: str, overwrite: bool = False) -> str:
    """Writes the splits of `examples_by_split` (split name -> list[Example]) as TFDS array_record files.

    Args:
      name: dataset name, snake_case (`[a-z][a-z0-9_]*`).
      overwrite: an existing `<data_dir>/<name>/1.0.0` raises ValueError unless True (then it is rebuilt).

    Returns:
      The dataset directory `<data_dir>/<name>/1.0.0` (give it to `load_split`).
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"dataset name must match [a-z][a-z0-9_]*, got {name!r}.")
    if not examples_by_split:
        raise ValueError("examples_by_split must hold at least one split.")
    for split, examples in examples_by_split.items():
        if not _NAME_RE.fullmatch(str(split)) or not examples:
            raise ValueError(f"split {split!r} must have a snake_case name and at least one example.")
        if not all(isinstance(ex, Example) for ex in examples):
            raise ValueError(f"split {split!r} must be a list of Example.")
        for ex in examples:
            try:
                json.dumps(ex.extra)   # fail before any file is written
            except TypeError as e:
                raise ValueError(f"split {split!r} holds an extra that is not JSON-serializable ({e}).") from e
    path = os.path.join(data_dir, name, VERSION)
    if os.path.exists(path):
        if not overwrite:
            raise ValueError(f"dataset {path!r} already exists; pass overwrite=True to rebuild it.")
        shutil.rmtree(path)
    builder = _builder_class(name)(data_dir=data_dir, file_format="array_record")
    builder.examples_by_split = {str(k): list(v) for k, v in examples_by_split.items()}
    builder.download_and_prepare()
    return path


class ExampleSource:
    """Random access to one split: `len(src)`, `src[i] -> dict`, `src[[i, j]] -> list[dict]`."""

    def __init__(self, data_source):
        self._source = data_source

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        if isinstance(index, (list, tuple)):
            return [_decode(r) for r in self._source.__getitems__(list(index))]
        return _decode(self._source[index])


def _decode(record) -> dict:
    out = {k: (v.decode("utf-8") if isinstance(v, bytes) else str(v)) for k, v in record.items()}
    out["extra"] = json.loads(out["extra"])
    return out


def load_split(path: str, split: str, name: str | None = None) -> ExampleSource:
    """Opens a split written by `build_dataset`.

    Args:
      path: the dataset dir returned by `build_dataset` (`.../<name>/<version>`), or `.../<name>` (latest
        version), or a `data_dir` together with `name`.
      split: e.g. "train" or "test".
    """
    if name is not None:
        path = os.path.join(path, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Dataset directory {path!r} does not exist.")
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
        versions = sorted((d for d in os.listdir(path) if re.fullmatch(r"\d+\.\d+\.\d+", d)),
                          key=lambda v: tuple(map(int, v.split("."))))
        if not versions:
            raise FileNotFoundError(f"Directory {path!r} holds no TFDS dataset (no dataset_info.json).")
        path = os.path.join(path, versions[-1])
    builder = _tfds().builder_from_directory(path)
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} is not in {path!r} (has {sorted(builder.info.splits)}).")
    return ExampleSource(builder.as_data_source(split=split))
