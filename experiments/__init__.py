"""Entry points and benchmarks (run as scripts: `python experiments/train.py ...`). A package so that the scripts'
shared helpers (`_cli`, `_compile_targets`, `_bench_diffusion`) and `merge` are imported by name, never by path."""
