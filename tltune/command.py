"""The ``tltune`` command: sweeps, the experiments, best configurations and reports.

    tltune sweep cifar10 --quick            # a family of experiments (or experiment names)
    tltune sweep my.yaml                    # the experiments of a spec file
    tltune sweep --resume RUN               # an interrupted run, as it was started
    tltune spec cifar10 > my.yaml           # a built-in spec file to copy and edit (tltune spec: their names)
    tltune list                             # every experiment, its family and reference accuracy
    tltune best RUN [--trials] [--csv | --json]
    tltune report RUN... [--out DIR]
    tltune --version

``sweeps/*.py`` and ``analysis/*.py`` are the same commands as scripts.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

from tltune import cli
from tltune.errors import UserError
from tltune.experiments import EXPERIMENTS, FAMILIES, Experiment
from tltune.specs import builtin_spec_path, builtin_specs, did_you_mean, is_spec_path, load_spec_file

USAGE = __doc__.split("\n\n")[1]


def sweep_main(argv: list[str]) -> int:
    """``tltune sweep TARGET... [flags]``: TARGETs are families, experiment names or spec files."""
    targets = []
    while argv and not argv[0].startswith("-"):
        targets.append(argv.pop(0))
    if not targets and not ("-h" in argv or "--help" in argv) and (resume := resume_flag(argv)):
        try:  # the run says what it swept
            from tltune.plan import recorded_targets

            targets = recorded_targets(resume)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not targets:
        targets = ["--help"] if "-h" in argv or "--help" in argv else []
    if not targets or targets == ["--help"]:
        print(f"usage: tltune sweep FAMILY|EXPERIMENT|SPEC.yaml... [flags]\n  families: {', '.join(FAMILIES)}\n  "
              f"experiments: tltune list\n  spec files: tltune spec\n  flags: tltune sweep cifar10 --help", file=sys.stderr if not targets else sys.stdout)  # fmt: skip
        return 2 if not targets else 0
    chosen: dict[str, str | Experiment] = {}  # name -> a built-in's name, or a spec file's Experiment
    for target in targets:
        if target in FAMILIES or target in EXPERIMENTS:
            declared = {name: name for name in FAMILIES.get(target, [target])}
        elif is_spec_path(target):
            try:
                declared = {e.name: e for e in load_spec_file(target)}
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        else:
            print(f"error: unknown family or experiment {target!r}: {did_you_mean(target, [*FAMILIES, *EXPERIMENTS])}use one of {', '.join(FAMILIES)}, "
                  "an experiment name (tltune list) or a spec file, SPEC.yaml (tltune spec)", file=sys.stderr)  # fmt: skip
            return 2
        for name, experiment in declared.items():
            if name in chosen and chosen[name] != experiment:
                print(f"error: {target}: experiment {name!r} is declared by an earlier target too: rename one", file=sys.stderr)
                return 2
            chosen[name] = experiment
    description = f"Sweep {' '.join(targets)}: {', '.join(chosen)}."
    return cli.main(list(chosen.values()), description, argv, run_all=targets == ["all"], prog=f"tltune sweep {' '.join(targets)}")


def resume_flag(argv: list[str]) -> str | None:
    """The run directory of ``--resume RUN`` (or ``--resume=RUN``) among a sweep's flags."""
    for i, arg in enumerate(argv):
        if arg == "--resume" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--resume="):
            return arg.partition("=")[2]
    return None


def list_main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="tltune list", description="Every experiment tltune declares.").parse_args(argv)
    family_of = {name: family for family, names in FAMILIES.items() if family != "all" for name in names}
    print(f"{'experiment':34} {'family':14} {'model':8} {'mode':16} {'trials':>6}  reference")
    for e in EXPERIMENTS.values():
        ref = "-" if e.reference_accuracy is None else f"{e.reference_accuracy:.2f}%"
        print(f"{e.name:34} {family_of.get(e.name, '-'):14} {e.model:8} {e.mode:16} {e.num_samples:>6}  {ref}  {e.label}")
    return 0


def spec_main(argv: list[str]) -> int:
    """``tltune spec NAME``: a built-in spec file's text, a start for one's own."""
    parser = argparse.ArgumentParser(
        prog="tltune spec", description="Print a built-in spec file to copy and edit: tltune spec cifar10 > my.yaml, then tltune sweep my.yaml.")
    parser.add_argument("name", nargs="?", help="a family (its file) or a built-in experiment (the file declaring it); none: list them")
    args = parser.parse_args(argv)
    if args.name is None:
        print(f"{'spec':16} experiments")
        for family, spec in builtin_specs().items():
            print(f"{family:16} {', '.join(e.name for e in spec.experiments)}")
        return 0
    try:
        path = builtin_spec_path(args.name)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path.read_text(encoding="utf-8"), end="")
    return 0


def best_main(argv: list[str] | None = None, prog: str = "tltune best") -> int:
    from tltune.results import best_configs_text, load_run, markdown_table, model_mode_text, pareto_text, table_rows, trial_rows, trials_csv

    parser = argparse.ArgumentParser(prog=prog, description="Best configurations and the seed-format table of a run, or every trial. Reads the run only.")
    parser.add_argument("run_dir", help="a run directory printed by a sweep (or one experiment directory in it)")
    parser.add_argument("--trials", action="store_true", help="one row per trial (config, epochs run, stop reason, accuracies, wall time, compute), as CSV unless --json")
    parser.add_argument("--pareto", action="store_true", help="per experiment, the trials no other beats in both validation accuracy and compute, and the cheapest within 1 point of the best")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="one CSV row per experiment (per trial with --trials) on stdout")
    output.add_argument("--json", action="store_true", help="a JSON list, one object per experiment (per trial with --trials), on stdout")
    args = parser.parse_args(argv)
    experiments = _or_exit_2(lambda: load_run(args.run_dir))
    if experiments is None:
        return 2
    if args.pareto:
        print(pareto_text(experiments))
        return 0
    rows = (trial_rows if args.trials else table_rows)(experiments)
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
        per_model_mode = model_mode_text(experiments)
        if per_model_mode:
            print(f"\n{per_model_mode}")
    return 0


def report_main(argv: list[str] | None = None, prog: str = "tltune report") -> int:
    from tltune.report import write_report

    parser = argparse.ArgumentParser(prog=prog, description="A Markdown report with plots (learning curves, Optuna's plots, fine-tuning vs feature extraction) and trials.csv. Reads the runs only.")
    parser.add_argument("paths", nargs="+", help="run directories, or folders holding them")
    parser.add_argument("--out", default="report", help="folder for report.md, trials.csv and the PNG plots")
    args = parser.parse_args(argv)
    report = _or_exit_2(lambda: write_report(args.paths, args.out))
    if report is None:
        return 2
    print(f"wrote {report}")
    return 0


def _or_exit_2(work):
    """``work()``, or ``None`` after one ``error:`` line for what a user can fix."""
    try:
        return work()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:  # storage that cannot be listed or reached
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
    return None


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("tltune")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown (not installed)"


COMMANDS = {"sweep": sweep_main, "spec": spec_main, "list": list_main, "best": best_main, "report": report_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage:\n{USAGE}")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"tltune {version()}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except KeyboardInterrupt:  # Ctrl-C in best, report, list (a sweep handles its signals itself)
        print(f"\ninterrupted: tltune {argv[0]} stopped (it only reads runs: none was changed)", file=sys.stderr)
        return 130
