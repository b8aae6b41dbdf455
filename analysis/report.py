"""Markdown report with plots: every experiment beside the seed's reference, top trials,
learning curves (ASHA's stops marked), accuracy vs learning rate, fine-tuning vs feature
extraction, Optuna's plots of each kept study, and every trial in trials.csv.

    python analysis/report.py results                       # every run under ./results
    python analysis/report.py results/all --out docs/report

Reads result directories only; experiments without results show as "not run", failed ones with
their reason; damaged files are skipped with a warning on stderr.
"""

import argparse
import sys

from tltune.errors import UserError
from tltune.report import write_report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories, or folders holding them")
    parser.add_argument("--out", default="report", help="folder for report.md and the PNG plots")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.paths, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # storage that cannot be listed or reached
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
