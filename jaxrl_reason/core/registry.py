"""The one way a part registers under a name: `register = registrar(TABLE)`, then `@register("name")`.

Every stage looks its parts up by name in such a table (`POLICY_LOSSES`, `ADVANTAGE_ESTIMATORS`, `AGGREGATIONS`,
`REWARD_SHAPINGS`, `GROUP_FILTERS`), so registering a function (in a method module or a notebook cell) makes its
name a valid config value.
"""
from __future__ import annotations

from typing import Callable


def registrar(table: dict[str, Callable]) -> Callable[[str], Callable[[Callable], Callable]]:
    """A decorator factory that stores the decorated function in `table` under the given name."""

    def register(name: str):
        def deco(fn: Callable) -> Callable:
            table[name] = fn
            return fn

        return deco

    return register
