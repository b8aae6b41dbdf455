"""Markdown report with plots: every experiment beside the seed's reference, top trials,
learning curves (ASHA's stops marked), accuracy vs learning rate, fine-tuning vs feature
extraction, Optuna's plots of each kept study, and every trial in trials.csv.

    python analysis/report.py results                       # every run under ./results
    python analysis/report.py results/all --out docs/report

Reads result directories only; experiments without results show as "not run", failed ones with
their reason; damaged files are skipped with a warning on stderr.
"""

import sys

from tltune.command import report_main

if __name__ == "__main__":
    sys.exit(report_main(prog="analysis/report.py"))
