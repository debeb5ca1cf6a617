"""The one record type every task and loader produces (data/).

`Example(prompt, answer, data_source, extra)`:
  prompt       the text given to the policy (for chat rows: the last user message, see `data.loaders`);
  answer       the ground truth a verifier compares against, normalized (`"42"`, `"\\frac{1}{2}"`);
  data_source  the task or file it came from (verl's field): picks a verifier, splits metrics;
  extra        anything else (difficulty level, chat messages, the reasoning-gym entry). It must be
               JSON-serializable to be written by `data.tfds_builders.build_dataset`.
"""
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    data_source: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
