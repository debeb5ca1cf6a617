"""Adapter over the `reasoning_gym` package: offline procedural tasks that come with their own verifiers.

`make_examples(task_name, n, seed, **task_kwargs)` draws entries `{"question", "answer", "metadata"}` from
`reasoning_gym.create_dataset(task_name, size=n, seed=seed, **task_kwargs)` and stores, in
`Example.extra`, everything the task's scorer needs: `{"task_name", "task_kwargs", "entry"}` (the entry after
a JSON round trip, so scoring is identical before and after `data.tfds_builders` storage).

`score(response_text, gold)` extracts the answer (reasoning-gym's `<answer>...</answer>` convention, else
the whole stripped response) and calls the dataset's OWN `score_answer(answer, entry)` (in [0, 1]; partial
credit is task-defined). `gold` is `Example.extra` (or the Example), so `VerifierPool.score_batch(
"reasoning_gym", responses, [ex.extra for ex in examples])` works across processes.
"""
import functools
import json

from jaxrl_reason.data.example import Example


def _rg():
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError("reasoning_gym is not installed: pip install reasoning-gym.") from e
    return reasoning_gym


def make_examples(task_name: str, n: int, seed: int, **task_kwargs) -> list[Example]:
    """`n` examples of a reasoning-gym task; same `(task_name, n, seed, task_kwargs)` -> same examples."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    rg = _rg()
    if task_name not in rg.factory.DATASETS:
        raise ValueError(f"unknown reasoning_gym task {task_name!r}.")
    dataset = rg.create_dataset(task_name, size=n, seed=seed, **task_kwargs)
    examples = []
    for i in range(n):
        entry = dataset[i]
        try:
            entry = json.loads(json.dumps(entry))
            kwargs = json.loads(json.dumps(task_kwargs))
        except TypeError as e:
            raise ValueError(f"task {task_name!r} entries or kwargs are not JSON-serializable ({e}).") from e
        examples.append(Example(prompt=entry["question"], answer=str(entry["answer"]),
                                data_source=f"reasoning_gym/{task_name}",
                                extra={"task_name": task_name, "task_kwargs": kwargs, "entry": entry}))
    return examples


@functools.lru_cache(maxsize=64)
def _scorer_dataset(task_name: str, kwargs_json: str):
    return _rg().create_dataset(task_name, size=1, seed=0, **json.loads(kwargs_json))


def extract_tagged_answer(response_text: str, answer_tag: str | None = "answer") -> str:
    """Content of the last `<answer_tag>...</answer_tag>`, else (or if `answer_tag` is None) the stripped text."""
    if answer_tag:
        close = f"</{answer_tag}>"
        end = response_text.rfind(close)
        start = response_text.rfind(f"<{answer_tag}>", 0, max(end, 0))
        if end >= 0 and start >= 0:
            return response_text[start + len(answer_tag) + 2:end].strip()
    return response_text.strip()


def score(response_text: str, gold, answer_tag: str | None = "answer") -> float:
    """The task's own `score_answer` of the response's answer against `gold` (an Example or its `extra`)."""
    extra = gold.extra if isinstance(gold, Example) else gold
    if not isinstance(extra, dict) or not {"task_name", "task_kwargs", "entry"} <= extra.keys():
        raise ValueError("gold must be an Example from make_examples or its extra dict.")
    dataset = _scorer_dataset(extra["task_name"], json.dumps(extra["task_kwargs"], sort_keys=True))
    return float(dataset.score_answer(extract_tagged_answer(response_text, answer_tag), extra["entry"]))
