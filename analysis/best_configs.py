"""Best configurations and the seed-format table of a finished or interrupted run, or every trial.

    python analysis/best_configs.py results/cifar10-20261125-191447
    python analysis/best_configs.py results/cifar10-20261125-191447 --json
    python analysis/best_configs.py results/cifar10-20261125-191447 --trials > trials.csv

Reads the run directory only: nothing is trained or evaluated again.
"""

import sys

from tltune.command import best_main

if __name__ == "__main__":
    sys.exit(best_main(prog="analysis/best_configs.py"))
