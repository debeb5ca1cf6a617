"""The results table of study/README.md, generated from results/*/*.json (study/table.py).

  python experiments/results_table.py           # rewrites the block between its markers
  python experiments/results_table.py --check   # exits 1 if the block is not what the JSON files give
"""
import sys

from study.table import main

if __name__ == "__main__":
    sys.exit(main())
