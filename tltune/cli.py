"""The command line every ``sweeps/*.py`` script and ``tltune sweep`` share: a thin face over
:mod:`tltune.plan`.

``main(experiment_names, description)`` parses the flags into :class:`SweepOptions` (exit code 2
with one message for a bad one, before torch or Ray is imported), runs the sweep and prints
the best configurations and the seed-format table.
"""

from __future__ import annotations

import contextlib
import os
import sys

from tltune import openmp, signals, storage
from tltune.errors import StorageFull, TrialsFailed, UserError
from tltune.experiments import Experiment
from tltune.options import SweepOptions, build_parser


def main(experiments: list[str | Experiment], description: str, argv: list[str] | None = None, run_all: bool = False, prog: str | None = None) -> int:
    """The command line of ``sweeps/*.py`` and ``tltune sweep``: run the experiments and print
    the best configurations; an exit code (2: bad input, 1: an experiment failed, 128 + signal)."""
    parser = build_parser(description, prog or os.path.basename(sys.argv[0]), [e if isinstance(e, str) else e.name for e in experiments])
    namespace = parser.parse_args(argv)
    signals.install()
    openmp.wait_passively_unless_set()  # before the sweep imports torch
    try:
        options = SweepOptions(**vars(namespace))
        from tltune.plan import sweep  # the planning core imports more; flags and --help stay fast

        outcome = sweep(experiments, options, run_all, argv=sys.argv if argv is None else [parser.prog, *argv])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except signals.Interrupted as stop:
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            if stop.run_dir:
                print(f"\ninterrupted ({stop}): finished trials are kept in {stop.run_dir}; continue with --resume {stop.run_dir}", file=sys.stderr)
            else:
                print(f"\ninterrupted ({stop}) before the run started: nothing was written", file=sys.stderr)
        return stop.exit_code
    except StorageFull as full:
        resume = f" {full.run_dir}" if full.run_dir else ""
        print(f"error: {full}{resume}", file=sys.stderr)
        return 1
    except TrialsFailed as exc:
        return report(exc.run_dir, {}, failed=exc)
    else:
        return report(outcome.run_dir, outcome.skipped)
    finally:
        signals.settle()  # the exit code is decided (report settles as soon as its table is printed)


def report(run_dir: str | None, skipped: dict[str, str], failed: TrialsFailed | None = None) -> int:
    """The end of a sweep that ran: its table, what was not run, and the exit code."""
    try:
        with signals.finishing():  # the results are written: a first stop signal lets the table print
            if run_dir:
                print_report(run_dir)
            for name, why in skipped.items():
                print(f"Not run: {name} ({why})")
            signals.settle()
    except signals.Interrupted as stop:  # a second one
        return stop.exit_code
    if failed:
        print(f"error: {failed}", file=sys.stderr)
        return 1
    return 0


def print_report(run_dir: str) -> None:
    from tltune.results import best_configs_text, load_run, markdown_table, model_mode_text, table_rows

    experiments = load_run(run_dir)
    rows = table_rows(experiments)
    print("\nBest configuration of each experiment:")
    print(best_configs_text(rows))
    print()
    print(markdown_table(rows))
    per_model_mode = model_mode_text(experiments)
    if per_model_mode:
        print(f"\n{per_model_mode}")
    if storage.is_uri(run_dir):  # TensorBoard reads cloud storage only with extra packages
        print(f"\nTensorBoard:  copy {run_dir} to a local folder, then tensorboard --logdir FOLDER --host 127.0.0.1")
    else:
        print(f"\nTensorBoard:  tensorboard --logdir {run_dir} --host 127.0.0.1")
    print(f"Table again:  python analysis/best_configs.py {run_dir}")
