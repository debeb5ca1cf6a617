"""Methods with settings or hooks of their own (DLER, HAPO, LSPO, REPRO): one module each, collected in
`registry.METHODS`. Baseline recipes, which only compose registered parts, live in `jaxrl_reason/algorithms.py`."""
