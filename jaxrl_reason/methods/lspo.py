"""LSPO (arXiv 2510.01459): length-aware dynamic sampling on top of GRPO, DAPO or GSPO.

Each generation round first drops the groups whose score does not vary (DAPO's dynamic sampling), then keeps, among
the rest, the groups whose mean response length is short (<= the `lspo.low` percentile) or long (between the
`lspo.high` and `lspo.max` percentiles), percentiles taken over the round's candidates. Thresholds (0.30, 0.60,
0.90) are the released script's; the paper summary's (0.30, 0.65, 0.95) are `--config.lspo.high=0.65
--config.lspo.max=0.95`. The math is `core.filters.lspo_length_filter`.
"""
from __future__ import annotations

from ml_collections import config_dict

from jaxrl_reason.core import filters as filters_lib
from jaxrl_reason.methods.hooks import Method


def section(config) -> config_dict.ConfigDict:
    s = config_dict.ConfigDict()
    s.low, s.high, s.max = filters_lib.LSPO_THRESHOLDS_CODE
    return s


@filters_lib.register_filter("lspo")
def lspo_filter(arrays, hp):
    keep, metrics = filters_lib.zero_variance_filter(arrays["score_N"], hp.group_size)
    keep, lspo_metrics = filters_lib.lspo_length_filter(arrays["length_N"], hp.group_size, hp.lspo.low, hp.lspo.high,
                                                        hp.lspo.max, candidates_B=keep)
    return keep, {**metrics, **{f"lspo_{k}": v for k, v in lspo_metrics.items()}}


METHOD = Method(name="lspo", recipes={"lspo": {"filter.kind": "lspo", "lspo.low": 0.30, "lspo.high": 0.60,
                                               "lspo.max": 0.90}},
                section=section, stacks_on=("grpo", "dapo", "gspo"), parts=("lspo",))
