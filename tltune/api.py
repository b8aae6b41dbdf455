"""tltune from Python: the sweeps of the command line, as functions.

    import tltune
    run = tltune.run(["cifar10-cnn-search"], quick=True, num_samples=6)
    run["cifar10-cnn-search"].test_acc, run["cifar10-cnn-search"].best_config
    run.trials()                                    # one row per trial, with its stop reason
    tltune.load("results/cifar10-20261127-041500")  # a finished or interrupted run

``run`` takes the fields of :class:`tltune.SweepOptions` as keyword arguments (the command
line's flags: ``num_samples=6`` for ``--num-samples 6``), checked as the command line checks
them; a mistake raises :class:`tltune.UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tltune import signals, storage, trust
from tltune.errors import TrialsFailed, UserError
from tltune.experiments import EXPERIMENTS, FAMILIES, Experiment
from tltune.options import SweepOptions
from tltune.plan import recorded_targets, sweep
from tltune.results import ExperimentResult, experiment_status, load_run, markdown_table, table_rows, trial_rows
from tltune.specs import is_spec_path, load_spec_file


@dataclass
class ExperimentRun:
    """One experiment of a run: how it ended and its best trial."""

    result: ExperimentResult

    @property
    def name(self) -> str:
        return self.result.name

    @property
    def path(self) -> str:
        return self.result.path

    @property
    def status(self) -> str:
        """``finished``, ``unfinished``, ``all trials diverged`` or ``failed: <why>``."""
        return experiment_status(self.result)

    @property
    def best_config(self) -> dict | None:
        best = self.result.best()
        return best["config"] if best else None

    @property
    def val_acc(self) -> float | None:
        best = self.result.best()
        return best.get("val_acc") if best else None

    @property
    def test_acc(self) -> float | None:
        """The best trial's accuracy on the test split (once the experiment finished)."""
        return self.result.summary.test_acc if self.result.summary else None

    def trials(self) -> list[dict]:
        return trial_rows([self.result])

    def result_grid(self):
        """Ray Tune's ``ResultGrid`` of this experiment. Ray unpickles files of its folder at
        every depth (its state, a failed trial's ``error.pkl``): each is checked first against
        the signatures tltune made when it was written (:mod:`tltune.trust`); a run with a file
        tltune did not write, or made under another account, raises :class:`UserError`."""
        trust.signed_state_files(self.path, purpose="read")
        from tltune.raytune.sweep import result_grid

        return result_grid(self.path)

    def __repr__(self) -> str:
        acc = "" if self.test_acc is None else f", test_acc={self.test_acc:.4f}"
        return f"ExperimentRun({self.name!r}, {self.status}{acc})"


@dataclass
class Run:
    """A run directory: its experiments by name, in the order they ran."""

    path: str
    experiments: dict[str, ExperimentRun]

    def __getitem__(self, name: str) -> ExperimentRun:
        if name not in self.experiments:
            raise KeyError(f"{name}: this run has {', '.join(self.experiments) or 'no experiments'}")
        return self.experiments[name]

    def __iter__(self):
        return iter(self.experiments.values())

    def __len__(self) -> int:
        return len(self.experiments)

    def trials(self) -> list[dict]:
        """One row per trial: config, epochs run, stop reason, val/test accuracy, wall time."""
        return trial_rows([e.result for e in self])

    def table(self) -> str:
        """The seed-format Markdown table."""
        return markdown_table(table_rows([e.result for e in self]))

    def report(self, out: str | Path = "report") -> Path:
        """Write report.md, its plots and trials.csv to folder ``out``."""
        from tltune.report import write_report

        return write_report([self.path], out)


def experiments() -> list[Experiment]:
    """Every declared experiment (``tltune list`` prints them)."""
    return list(EXPERIMENTS.values())


def load(run_dir: str | Path) -> Run:
    """A run directory (local or a URI) as the sweep left it; nothing is re-run."""
    path = storage.absolute(str(run_dir))
    found = load_run(path)
    return Run(path, {e.name: ExperimentRun(e) for e in found})


def run(experiments: str | Experiment | list[str | Experiment] | None = None, **options) -> Run:
    """Sweep ``experiments`` (names, spec files ``*.yaml`` or :class:`Experiment` objects), one after another, into a
    new run directory (or ``resume=RUN_DIR``: without ``experiments``, those the run swept), and return it loaded. ``options`` are the fields
    of :class:`tltune.SweepOptions` (the command line's flags: ``num_samples=6`` is
    ``--num-samples 6``); a wrong name, type or value raises :class:`UserError`. A failed
    experiment does not raise: its ``status`` says why. It prints only a count of trials per
    state at most once a minute and the final table (``quiet=False``: all the command line prints)."""
    options.setdefault("quiet", True)
    run_all = False
    if experiments is None:
        if not options.get("resume"):
            raise UserError("tltune.run: name the experiments (names, spec files or Experiment objects), or resume=RUN_DIR")
        experiments = recorded_targets(str(options["resume"]))
        if experiments == ["all"]:  # sweeps/all.py's run: every seed experiment whose inputs are at hand
            experiments, run_all = FAMILIES["all"], True
    chosen = [experiments] if isinstance(experiments, (str, Path, Experiment)) else list(experiments)
    chosen = [e for item in chosen for e in (load_spec_file(item) if isinstance(item, (str, Path)) and is_spec_path(str(item)) else [item])]
    checked = SweepOptions.from_keywords(**options)
    skipped = {}
    with signals.installed():
        try:
            outcome = sweep(chosen, checked, run_all, argv=[])
            run_dir, skipped = outcome.run_dir, outcome.skipped
        except TrialsFailed as exc:
            run_dir = exc.run_dir
    if run_dir is None:  # a resumed run that had finished is returned as it is
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items()) or "no experiment left"
        raise UserError(f"nothing to run ({why})")
    result = load(run_dir)
    print(result.table())
    return result
