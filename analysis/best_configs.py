"""Best configurations and the seed-format table of a finished or interrupted run, or every trial.

    python analysis/best_configs.py results/cifar10-20261125-191447
    python analysis/best_configs.py results/cifar10-20261125-191447 --json
    python analysis/best_configs.py results/cifar10-20261125-191447 --trials > trials.csv

Reads the run directory only: nothing is trained or evaluated again.
"""

import argparse
import csv
import json
import sys

from tltune.errors import UserError
from tltune.results import best_configs_text, load_run, markdown_table, table_rows, trial_rows, trials_csv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory printed by a sweep (or one experiment directory in it)")
    parser.add_argument("--trials", action="store_true", help="one row per trial (config, epochs run, stop reason, accuracies, wall time), as CSV unless --json")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="one CSV row per experiment (per trial with --trials) on stdout")
    output.add_argument("--json", action="store_true", help="a JSON list, one object per experiment (per trial with --trials), on stdout")
    args = parser.parse_args(argv)
    try:
        experiments = load_run(args.run_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # storage that cannot be listed or reached
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    rows = trial_rows(experiments) if args.trials else table_rows(experiments)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.trials:
        print(trials_csv(rows), end="")
    elif args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=[k for k in rows[0] if k != "config"] + ["config"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "config": json.dumps(row["config"])})
    else:
        print("Best configuration of each experiment:")
        print(best_configs_text(rows))
        print()
        print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
