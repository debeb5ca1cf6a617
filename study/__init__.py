"""The small-scale reproduction study: do the claims of the DLER, LSPO, HAPO, REPRO and TraceRL papers hold for
tiny models on the arithmetic task, against each paper's baseline method from the same start?

  runs.py     the run table: which runs each study compares (data only)
  common.py   a run's config and key, training one run, the files runs keep
  runner.py   runs a study (reading back finished runs) and assembles results/<study>.json
  dler.py     the DLER study's evaluations at a common budget and its merged checkpoint
  tracerl.py  the TraceRL studies: diffusion SFT starts and their RL runs
  pool.py     the runs in worker processes, one per core (--workers)
  report.py   tables and verdicts (stats.py, plots.py; the papers' numbers: papers.py)
  table.py    the results table of README.md, generated from the committed JSON
  cli.py      the command line of experiments/reproduce.py

Results and how to run it: README.md beside this file.
"""
