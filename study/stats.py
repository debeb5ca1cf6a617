"""Statistics and accessors over the per-seed run records of results/<study>.json (tables and plots share them)."""
from __future__ import annotations

import numpy as np


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std with ddof 1 (0.0 for one value), n) of the finite values; (nan, nan, 0) if none."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def ev(runs: list[dict], key: str, where: str = "eval_after") -> list[float]:
    """`key` of each seed's evaluation `where` ("eval_after" or "eval_before")."""
    return [r[where].get(key) for r in runs if r.get(where)]


def common(runs: list[dict], key: str, tier: str = "all") -> list[float]:
    """`key` of each seed's evaluation on the study's common setting (the DLER study's control budget)."""
    return [r["eval_common"][tier].get(key) for r in runs if r.get("eval_common") and tier in r["eval_common"]]
