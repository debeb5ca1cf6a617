"""The small-scale reproduction study in one command: DLER, LSPO, HAPO, REPRO and TraceRL (the study/ package).

  python experiments/reproduce.py --quick                 # 1 seed, 2 RL iterations, 100 problems x 2 samples
  python experiments/reproduce.py                         # 3 seeds, 100 RL iterations, 500 problems
  python experiments/reproduce.py --studies=dler,hapo --seeds=5 --rl_steps=150 --out=results
  python experiments/reproduce.py --quick --workers=2     # two runs at a time, one per core
  python experiments/reproduce.py --start=checkpoints/arith_tiny_sft_plateau --out=results/plateau
  python experiments/reproduce.py --studies=tracerl_lr --rl_steps=30 --eval_samples=2 --out=results/full

Every AR run starts from an SFT checkpoint with the method's `tiny` config: by default the shipped mid-SFT one
(`checkpoints/arith_tiny_sft`; RL from it improves held-out accuracy, README "Main-job results"), with
`--start=checkpoints/arith_tiny_sft_plateau` the plateaued one (configs/sft.py:plateau; RL from a still-improving
SFT model competes with more SFT, so a plateaued start isolates what RL adds). The TraceRL runs start from the
shipped diffusion SFT checkpoints (`checkpoints/arith_tiny_sft_{block,full}`; built under <out>/work when absent).
Methods are compared with their papers' baseline RL methods from that same start. Within a study every run gets
the same number of RL iterations and the same held-out set (study/runs.py). Runs live under
`<out>/work/runs/<config hash>/seed<k>`: identical runs are shared between studies and a finished run is never
retrained, so an interrupted study resumes where it stopped. Writes `<out>/<study>.json`, `<out>/summary.md`
(tables with the papers' numbers and a computed "reproduced?" column, study/report.py), `<out>/<study>_curves.png`
and `<out>/tradeoff.png`. The study's results: study/README.md.
"""
import logging
import sys

from study.cli import main

if __name__ == "__main__":
    logging.getLogger("absl").setLevel(logging.WARNING)
    main(sys.argv)
