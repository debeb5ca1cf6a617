"""What a method module declares: its recipes, its config section and its hooks into the shared RL loop.

A method is a recipe (config overrides composing registered parts) plus, where the paper needs more than a
composition, a few hooks. The loop and its stages call the hooks of every method whose section the config
carries; they never test a method's name. Every hook is optional.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Method:
    """One method family.

    Attributes:
      name: the method's config section (`config.<name>`) and its key in `METHODS`.
      recipes: recipe name -> flat dict of dotted config overrides (paper defaults), as in `algorithms.RECIPES`.
        A key in the method's own section (`"hapo.tau"`) adds the section first.
      based_on: a baseline recipe of `algorithms.py` the method's recipes extend (HAPO is DAPO plus its pieces).
      section: `(config) -> ConfigDict`, the method's own settings, added as `config.<name>` by its recipes.
      stacks_on: base recipes the method is applied on top of (LSPO on GRPO / DAPO / GSPO); applying its recipe
        keeps the run's name, which its config file sets (e.g. `<name>_<base>`).
      validate: `(config) -> None`, raises ValueError with one sentence for an impossible setting.
      sampling: `(config) -> dict`, extra fields of the training sampler's `SamplingParams`.
      next_state: `(section, entropy_NxR, mask_NxR) -> JSON-safe state or None`, what the method carries from one
        iteration to the next (stored in the checkpoint meta under "method_state").
      sampler_args: `(section, state) -> tuple`, extra positional arguments of the training sampler built from the
        carried state.
      legacy_meta_key: a checkpoint meta key older runs stored that state under.
      parts: names of the registered parts (reward shapings, filters, advantage estimators) that read the method's
        section; a config that names one needs the section.
      policy_hook: `(config) -> hook | None` with `hook(logp_NxR, entropy_NxR, batch, hp) -> (adv_NxR, overrides,
        metrics)` (`batch` a `train.contracts.UpdateBatch` micro-batch): reshapes the advantages and the policy
        loss's keyword arguments inside the loss (per micro-batch).
      extra_advantage: `(config, graphdef, tokenizer, *, spec, mesh, forward_shardings) -> fn | None` with
        `fn(rows, policy_params) -> (adv_NxR, metrics)` (`rows` a `train.contracts.Rows`), a term added to the
        outcome advantage.
    """

    name: str
    recipes: dict[str, dict[str, Any]]
    based_on: str = ""
    section: Callable | None = None
    stacks_on: tuple[str, ...] = ()
    validate: Callable | None = None
    sampling: Callable | None = None
    next_state: Callable | None = None
    sampler_args: Callable | None = None
    legacy_meta_key: str = ""
    parts: tuple[str, ...] = ()
    policy_hook: Callable | None = None
    extra_advantage: Callable | None = None
