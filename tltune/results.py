"""Read finished or interrupted runs from disk (no Ray), format the seed's table and the per-trial table.

Run directories may be local paths or storage URIs (``s3://bucket/prefix/run``): every read
goes through :mod:`tltune.storage`. A run directory (one invocation of a sweep script) holds one Tune experiment directory per
experiment; each has ``tltune_experiment.json`` from the start, a trial directory per
trial (``params.json``, ``result.json`` with one JSON line per epoch), and, once the
experiment finished, ``tltune_best.json`` with the best trial's test accuracy, or, if its
trials failed for good, ``tltune_failed.json`` (``{"experiment": ..., "reason": ...}``).
An interrupted experiment has neither. An experiment with a search space also keeps its
Optuna study in ``optuna.journal`` (runs from before the study was kept have none).

A damaged file (not JSON, not a JSON object) is skipped with one line on stderr,
``warning: skipping <path>: <why>``, and the rest of the run is still read.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tltune import storage
from tltune.errors import UserError
from tltune.records import ExperimentRecord, ExperimentSummary, FailureRecord, Record, RunRecord, TimeRecord, is_number
from tltune.specs import duration_text

EXPERIMENT_FILE = ExperimentRecord.FILE
SUMMARY_FILE = ExperimentSummary.FILE
FAILED_FILE = FailureRecord.FILE
RUNS_FILE = RunRecord.FILE  # one line per invocation that wrote to the run directory
TIME_FILE = TimeRecord.FILE  # seconds an interrupted experiment ran before its resume
OPTUNA_JOURNAL = "optuna.journal"  # the experiment's Optuna study (JournalStorage, study name = experiment name)
METRIC = "val_acc"


@dataclass
class Trial:
    name: str
    config: dict
    epochs: list[dict]  # one result per epoch, in order
    errored: bool

    @property
    def last(self) -> dict | None:
        return self.epochs[-1] if self.epochs else None

    @property
    def epochs_run(self) -> int:
        return self.last["training_iteration"] if self.last else 0

    @property
    def diverged(self) -> bool:
        return bool((self.last or {}).get("diverged"))

    @property
    def score(self) -> float:
        value = (self.last or {}).get(METRIC)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


@dataclass
class ExperimentResult:
    path: str  # local path or URI
    record: ExperimentRecord  # tltune_experiment.json
    summary: ExperimentSummary | None  # tltune_best.json, None while unfinished
    trials: list[Trial] = field(default_factory=list)
    failure: str | None = None  # the reason in tltune_failed.json: the experiment failed

    @property
    def name(self) -> str:
        return self.record.name if self.record.name is not None else storage.name(self.path)

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.failure is None

    @property
    def all_diverged(self) -> bool:
        """Some trial diverged and no other trial reported a val_acc."""
        return any(t.diverged for t in self.trials) and not any(t.score > -math.inf and not t.diverged for t in self.trials)

    def best(self) -> dict | None:
        """The best trial: from the summary when the experiment finished, else by last val_acc;
        never a diverged trial (``None`` when all diverged, see ``all_diverged``)."""
        diverged = {t.name for t in self.trials if t.diverged}
        if self.summary and self.summary.config is not None and self.summary.best_trial not in diverged:
            s = self.summary
            tested = {"test_acc": s.test_acc} if s.test_acc is not None else {}
            return {"best_trial": s.best_trial, "config": s.config, "epochs_trained": s.epochs_trained, "val_acc": s.val_acc, **tested}
        scored = [t for t in self.trials if t.score > -math.inf and not t.diverged]
        if not scored:
            return None
        trial = max(scored, key=lambda t: t.score)
        return {
            "best_trial": trial.name,
            "config": trial.config,
            "epochs_trained": trial.epochs_run,
            "val_acc": trial.score,
        }


def warn_skip(what: str, why: str | BaseException) -> None:
    """One line on stderr: ``warning: skipping <what>: <why>`` (an exception: its message on one line)."""
    print(f"warning: skipping {what}: {why if isinstance(why, str) else _one_line(why)}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc})"
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _not_an_object(value) -> str:
    kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
    return f"a JSON {kind}, not an object"


def _read_text(path: str) -> str | None:
    """The text of file ``path``; ``None`` if it is missing, or (with a warning) unreadable."""
    try:
        return storage.read_text(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        warn_skip(path, _one_line(exc))
        return None


def read_record(path: str, kind: type[Record]):
    """The record of type ``kind`` in file ``path``; ``None`` if the file is missing, or, with
    one warning line, if it cannot be read or is not such a record."""
    data = read_json_object(path)
    if data is None:
        return None
    try:
        return kind.from_dict(data, path)
    except ValueError as exc:
        warn_skip(path, str(exc))
        return None


def read_json_object(path: str) -> dict | None:
    """The JSON object in file ``path``. ``None`` if the file is missing, or, with one warning
    line on stderr, if it cannot be read, is not JSON or is JSON but not an object."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        warn_skip(path, _one_line(exc))
        return None
    if not isinstance(value, dict):
        warn_skip(path, _not_an_object(value))
        return None
    return value


def _read_result_rows(path: str) -> list[dict]:
    """The rows of a trial's ``result.json``; a row that is not an object with an integer
    ``training_iteration`` is skipped with a warning."""
    rows = []
    for number, line in enumerate((_read_text(path) or "").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:  # a line cut short by a crash (and continued by a resume)
            continue
        if not isinstance(row, dict):
            warn_skip(f"line {number} of {path}", _not_an_object(row))
        elif not isinstance(row.get("training_iteration"), int):
            warn_skip(f"line {number} of {path}", "no integer training_iteration")
        else:
            rows.append(row)
    return rows



def load_trials(exp_dir: str) -> list[Trial]:
    trials = []
    for name in storage.list_dir(exp_dir):
        trial_dir = storage.join(exp_dir, name)
        config = read_json_object(storage.join(trial_dir, "params.json"))  # None: not a trial (yet)
        if config is None:
            continue
        epochs = {}
        for row in _read_result_rows(storage.join(trial_dir, "result.json")):
            epochs[row["training_iteration"]] = row  # a resumed trial may repeat an epoch: keep the last
        files = set(storage.list_dir(trial_dir))
        errored = bool(files & {"error.txt", "error.pkl"})
        trials.append(Trial(name, config, [epochs[k] for k in sorted(epochs)], errored))
    return trials


def load_experiment(exp_dir: str) -> ExperimentResult | None:
    """The experiment in ``exp_dir``; ``None`` (after a warning) if its record is damaged."""
    record = read_record(storage.join(exp_dir, EXPERIMENT_FILE), ExperimentRecord)
    if record is None:
        return None
    summary_path, failed_path = storage.join(exp_dir, SUMMARY_FILE), storage.join(exp_dir, FAILED_FILE)
    summary = read_record(summary_path, ExperimentSummary)
    problem = summary.problem() if summary is not None else None
    if problem:
        warn_skip(summary_path, problem)
        summary = None
    failed = read_record(failed_path, FailureRecord)
    failure = None
    if failed is not None:
        lines = failed.reason.strip().splitlines()
        failure = lines[0].strip() if lines else "no reason given"
    elif storage.is_file(failed_path):  # there, but damaged (warned): it still failed
        failure = f"reason unreadable ({FAILED_FILE} is damaged)"
    if summary is not None and failure is not None:  # a later attempt wrote the other: the newer one holds
        if storage.mtime(summary_path) >= storage.mtime(failed_path):
            failure = None
        else:
            summary = None
    return ExperimentResult(exp_dir, record, summary, load_trials(exp_dir), failure)


def _experiment_dirs(run_dir: str) -> list[str]:
    records = [storage.join(run_dir, name, EXPERIMENT_FILE) for name in storage.list_dir(run_dir)]
    records = sorted((r for r in records if storage.is_file(r)), key=storage.mtime)  # run order
    return [storage.parent(r) for r in records]  # a URI keeps its ?query options


def load_experiments(run_dir: str) -> list[ExperimentResult]:
    """The readable experiments directly in ``run_dir``, in run order (maybe none);
    damaged ones are skipped with a warning."""
    experiments = [load_experiment(d) for d in _experiment_dirs(run_dir)]
    return [e for e in experiments if e is not None]


def load_run(path: str | Path) -> list[ExperimentResult]:
    """All experiments in a run directory (or the one experiment, given its directory);
    ``UserError`` if there is none that can be read."""
    path = storage.absolute(str(path))
    if storage.is_file(storage.join(path, EXPERIMENT_FILE)):
        experiments = [e for e in [load_experiment(path)] if e is not None]
    elif storage.is_dir(path):
        exp_dirs = _experiment_dirs(path)
        if not exp_dirs:
            raise UserError(f"{path} holds no tltune experiment (no */{EXPERIMENT_FILE}): pass a run directory of a sweep")
        experiments = [e for e in map(load_experiment, exp_dirs) if e is not None]
    elif storage.exists(path):
        raise UserError(f"{path} is a file: pass a run directory printed by a sweep (under ./results by default)")
    else:
        raise UserError(f"{path} does not exist: pass a run directory printed by a sweep (under ./results by default)")
    if not experiments:
        raise UserError(f"{path}: every experiment in it is damaged (see the warnings above), nothing to show")
    return experiments


def best_checkpoint(path: str | Path, experiment: str) -> tuple[dict, Path]:
    """(config, latest checkpoint directory on local disk) of the best trial of ``experiment``
    in a run; a checkpoint in cloud storage is downloaded to a temporary directory."""
    hint = f"run '{experiment}' first (sweeps/mnist_to_svhn.py runs it before the transfer), or pass --source-run RUN_DIR"
    try:
        matches = [e for e in load_run(path) if e.name == experiment] if str(path) else []
    except UserError:
        matches = []
    best = matches[0].best() if matches else None
    if best is None:
        raise UserError(f"no finished trial of '{experiment}' in {path or 'this run'}: {hint}")
    trial_dir = storage.join(matches[0].path, best["best_trial"])
    checkpoints = sorted(name for name in storage.list_dir(trial_dir) if name.startswith("checkpoint_"))
    if not checkpoints:
        raise UserError(f"the best trial of '{experiment}' in {path} kept no checkpoint: {hint}")
    latest = storage.join(trial_dir, checkpoints[-1])
    if storage.is_uri(latest):
        return best["config"], storage.download(latest, tempfile.mkdtemp(prefix="tltune-checkpoint-"))
    return best["config"], Path(latest)


def top_configs(path: str | Path, experiment: str, k: int = 3) -> list[dict]:
    """The configurations of the ``k`` best trials of ``experiment`` in a previous run (warm start)."""
    matches = [e for e in load_run(path) if e.name == experiment]
    if not matches:
        return []
    trials = [t for t in matches[0].trials if t.score > -math.inf and not t.diverged]  # a diverged config would diverge again
    trials.sort(key=lambda t: t.score, reverse=True)
    return [t.config for t in trials[:k]]


# ---------------------------------------------------------------------------- formatting

DATASET_NAMES = {"cifar10": "CIFAR-10", "mnist": "MNIST", "svhn": "SVHN"}


def dataset_title(dataset: str) -> str:
    """A table's Dataset: CIFAR-10 for cifar10; a folder's own name, not its whole path."""
    return DATASET_NAMES.get(dataset, Path(dataset).name if os.sep in dataset else dataset)


HYPERPARAMETERS = ("model", "mode", "optimizer", "activation", "lr", "epochs", "batch_size", "image_size",
                   "weight_decay", "schedule", "augmentation", "width", "label_smoothing")  # fmt: skip
# In a best configuration's text: these only where searched (every trial of most experiments shares them)
SHOWN_WHEN_SEARCHED = ("model", "mode")


def shown_config(config: dict, searched) -> dict:
    """The hyperparameters of ``config`` a reader compares: the common ones (model and mode only
    where searched) and whatever else the experiment searched (a user factory's keywords)."""
    keys = [k for k in HYPERPARAMETERS if k not in SHOWN_WHEN_SEARCHED or k in searched]
    keys += [k for k in searched if k not in keys]
    return {k: config[k] for k in keys if config.get(k) is not None}


def best_per_model_mode(exp: ExperimentResult) -> list[dict]:
    """For an experiment that searches the model or the mode: per (model, mode) its trials, the
    best trial by last val_acc and that accuracy (%), best first. Empty for any other experiment."""
    if not {"model", "mode"} & set(exp.record.space or {}):
        return []
    groups: dict[tuple, list[Trial]] = {}
    for trial in exp.trials:
        groups.setdefault((trial.config.get("model"), trial.config.get("mode")), []).append(trial)
    rows = []
    for (model, mode), trials in groups.items():
        scored = [t for t in trials if t.score > -math.inf and not t.diverged]
        best = max(scored, key=lambda t: t.score, default=None)
        rows.append({"experiment": exp.name, "model": model, "mode": mode, "trials": len(trials),
                     "best_trial": best.name if best else None, "val_acc": 100 * best.score if best else None,
                     "config": shown_config(best.config, exp.record.space or {}) if best else None})  # fmt: skip
    return sorted(rows, key=lambda r: -(r["val_acc"] if r["val_acc"] is not None else -1))


def model_mode_text(experiments: list[ExperimentResult]) -> str:
    """The best per (model, mode) of each experiment that searches them, as Markdown tables."""
    parts = []
    for exp in experiments:
        rows = best_per_model_mode(exp)
        if not rows:
            continue
        lines = [f"{exp.name}: best per model and mode (validation accuracy; only the overall best is tested)",
                 "| Model | Mode | Trials | Best val accuracy | Its configuration |", "|---|---|---|---|---|"]  # fmt: skip
        for row in rows:
            val = f"{row['val_acc']:.2f}%" if row["val_acc"] is not None else "-"
            config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (row["config"] or {}).items()
                               if k not in ("model", "mode"))  # fmt: skip
            lines.append(f"| {row['model']} | {row['mode']} | {row['trials']} | {val} | {config or '-'} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


ALL_DIVERGED = "all trials diverged"


def experiment_status(exp: ExperimentResult) -> str:
    """``finished``, ``failed: <reason>``, ``all trials diverged``, ``unfinished ...`` or ``interrupted ...``."""
    best = exp.best()
    if exp.failure is not None:
        return f"failed: {exp.failure}"
    if exp.all_diverged:
        return ALL_DIVERGED
    if best is None:
        return "finished, but no trial reported a result" if exp.summary is not None else "interrupted (no trial reported a result yet)"
    if "test_acc" in best:
        return "finished"
    return "unfinished (no test accuracy yet)" if exp.summary is None else "finished (best trial not tested)"


def seed_accuracies(summary: ExperimentSummary | None, group: str) -> list[float]:
    """Test accuracies of the ``best`` or the ``reference`` configuration: one per seed when the
    sweep re-trained it (``--repeats``), else the search's own trial, else none."""
    summary = summary or ExperimentSummary()
    repeated = ((summary.repeats or {}).get(group) or {}).get("test_acc")
    if isinstance(repeated, list) and repeated and all(is_number(v) for v in repeated):
        return list(repeated)
    single = summary.test_acc if group == "best" else (summary.reference_trial or {}).get("test_acc")
    return [single] if is_number(single) else []


def spread(values: list[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value); ``None`` for none."""
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def accuracy_text(values: list[float]) -> str:
    """``85.40%``, or ``85.40 ± 0.52% (3 seeds)``; ``-`` for none."""
    stats = spread(values)
    if stats is None:
        return "-"
    return f"{100 * stats[0]:.2f}%" if len(values) == 1 else f"{100 * stats[0]:.2f} ± {100 * stats[1]:.2f}% ({len(values)} seeds)"


def difference_text(best: list[float], reference: list[float]) -> str:
    """Best minus reference in points, and whether it exceeds the seeds' spread (the sum of the
    two standard deviations), when both were re-trained."""
    b, r = spread(best), spread(reference)
    if b is None or r is None:
        return "-"
    text = f"{100 * (b[0] - r[0]):+.2f}"
    if len(best) > 1 and len(reference) > 1:
        text += " (beyond the spread)" if abs(b[0] - r[0]) > b[1] + r[1] else " (within the spread)"
    return text


def reference_cap_note(exp: ExperimentResult) -> str:
    """What the "at the reference settings" trial ran where it differs from the declared
    reference: `` (4 of 10 epochs: --max-epochs)`` (``--max-epochs``, ``--quick``), and any
    value a flag replaced, `` (lr=1e-30, not 0.001)``; else empty."""
    declared = exp.record.reference or {}
    used = exp.record.settings.get("reference") or {}
    notes = []
    if is_number(declared.get("epochs")) and is_number(used.get("epochs")) and used["epochs"] < declared["epochs"]:
        notes.append(f"{used['epochs']} of {declared['epochs']} epochs: --max-epochs")
    for key, value in declared.items():
        if key != "epochs" and key in used and used[key] != value:
            notes.append(f"{key}={used[key]:g}, not {value:g}" if is_number(used[key]) and is_number(value) else f"{key}={used[key]}, not {value}")
    return f" ({'; '.join(notes)})" if notes else ""


BEST_IS_REFERENCE = "0 (the reference is the best)"


def best_vs_reference(summary: ExperimentSummary | None) -> str:
    """:func:`difference_text` of the best and the reference configuration, or that the search's
    best trial is the reference trial itself (the same runs: no difference to measure)."""
    summary = summary or ExperimentSummary()
    reference_trial = (summary.reference_trial or {}).get("trial")
    if reference_trial is not None and reference_trial == summary.best_trial:
        return BEST_IS_REFERENCE
    return difference_text(seed_accuracies(summary, "best"), seed_accuracies(summary, "reference"))


def table_rows(experiments: list[ExperimentResult]) -> list[dict]:
    """One row per experiment in the seed's format, plus the reference and what we tested on."""
    rows = []
    for exp in experiments:
        best = exp.best()
        record, summary = exp.record, exp.summary or ExperimentSummary()
        dataset = record.dataset or "?"
        reference = record.reference_accuracy
        row = {
            "experiment": exp.name,
            "Dataset": dataset_title(dataset),
            "Model type": record.label if record.label is not None else exp.name,
            "Learning rate": None,
            "Epochs": None,
            "Accuracy": None,
            "val_acc": None,
            "reference": reference if is_number(reference) else None,
            "status": experiment_status(exp),
            "config": None,
            "best_test_acc": seed_accuracies(exp.summary, "best"),
            "reference_test_acc": seed_accuracies(exp.summary, "reference"),
            "reference_cap": reference_cap_note(exp),
            "best_vs_reference": best_vs_reference(exp.summary),
            "trials": summary.trials if summary.trials is not None else len(exp.trials),
            "budget": budget_note(exp.summary),
            "epochs_spent": summary.epochs_spent if summary.epochs_spent is not None else sum(len(t.epochs) for t in exp.trials),
            "wall_s": summary.wall_s,
        }
        if best is not None:
            lr = best["config"].get("lr")
            row.update(
                {
                    "Learning rate": lr if is_number(lr) else None,
                    "Epochs": best.get("epochs_trained"),
                    "Accuracy": 100 * best["test_acc"] if "test_acc" in best else None,
                    "val_acc": 100 * best["val_acc"],
                    "config": shown_config(best["config"], record.space or {}),
                }
            )
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The seed's table (its Accuracy: our best configuration's), then the reference, ours at the
    reference settings, and what the search spent."""
    lines = ["| Dataset | Model type | Learning rate | Epochs | Accuracy | Reference | At the reference settings | Best − ours at the reference settings | Trials | Epochs spent | Wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        if row["status"].startswith("failed: "):
            accuracy = row["status"]
        elif row["Accuracy"] is not None:
            accuracy = accuracy_text(row["best_test_acc"]) if row["best_test_acc"] else f"{row['Accuracy']:.2f}%"
        elif row["val_acc"] is not None:
            accuracy = f"not tested (val {row['val_acc']:.2f}%)"
        elif row["status"] == ALL_DIVERGED:
            accuracy = "all diverged"
        else:
            accuracy = row["status"]
        lr = f"{row['Learning rate']:.3g}" if row["Learning rate"] is not None else "-"
        epochs = row["Epochs"] if row["Epochs"] is not None else "-"
        reference = f"{row['reference']:.2f}%" if row["reference"] is not None else "-"
        wall = f"{row['wall_s'] / 60:.1f} min" if is_number(row["wall_s"]) else "-"
        trials = f"{row['trials']} ({row['budget']})" if row["budget"] else row["trials"]
        lines.append(f"| {row['Dataset']} | {row['Model type']} | {lr} | {epochs} | {accuracy} | {reference} | "
                     f"{accuracy_text(row['reference_test_acc'])}{row['reference_cap'] if row['reference_test_acc'] else ''} | {row['best_vs_reference']} | "
                     f"{trials} | {row['epochs_spent']} | {wall} |")  # fmt: skip
    return "\n".join(lines)


def best_configs_text(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if row["config"] is None or row["status"].startswith("failed: "):
            lines.append(f"{row['experiment']}: {row['status']}")
            continue
        config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["config"].items())
        accuracy = f"test {row['Accuracy']:.2f}%" if row["Accuracy"] is not None else "not tested"
        reference = f", reference {row['reference']:.2f}%" if row["reference"] is not None else ""
        budget = f" ({row['budget']} after {row['trials']} trials)" if row["budget"] else ""
        lines.append(f"{row['experiment']}: {config} -> val {row['val_acc']:.2f}%, {accuracy}{reference}{budget}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- per-trial table

COMPLETED, DIVERGED, ERROR = "completed", "diverged", "error"
ASHA_STOP, INTERRUPTED = "stopped by ASHA", "interrupted"  # each followed by " at epoch N"
BUDGET_STOP = "stopped by the time budget"  # followed by " at epoch N" too
TRIAL_COLUMNS = ("epochs_run", "stop_reason", "best_val_acc", "last_val_acc", "test_acc", "wall_s", "cpu_s", "gpu_s", "precision_used")


def planned_epochs(config: dict) -> int | None:
    """The epochs a trial of ``config`` trains when nothing stops it: its ``epochs``, or a repeat's ``stop_epoch``."""
    planned = config.get("stop_epoch") or config.get("epochs")
    return planned if isinstance(planned, int) else None


def stop_reason(trial: Trial, exp: ExperimentResult) -> str:
    """Why ``trial`` ended: ``completed`` (its config's epochs), ``diverged``, ``error``,
    ``stopped by ASHA at epoch N``, or ``interrupted at epoch N`` (the experiment never finished)."""
    planned = planned_epochs(trial.config)
    if trial.diverged:
        return DIVERGED
    if planned is not None and trial.epochs_run >= planned:
        return COMPLETED  # maybe after a failure it recovered from
    # With tltune_best.json no trial failed for good (else tltune_failed.json is written): an
    # error.txt there is a failure Tune retried from a checkpoint.
    if trial.errored and exp.summary is None:
        return ERROR
    if exp.summary is None and exp.failure is None:
        return f"{INTERRUPTED} at epoch {trial.epochs_run}"
    if trial.name in budget_stopped(exp.summary):
        return f"{BUDGET_STOP} at epoch {trial.epochs_run}"
    return f"{ASHA_STOP} at epoch {trial.epochs_run}"


def budget_stopped(summary: ExperimentSummary | None) -> set[str]:
    """The trials an experiment's time budget stopped."""
    budget = summary.time_budget if summary else None
    stopped = budget.get("stopped_trials") if isinstance(budget, dict) else None
    return {t for t in stopped if isinstance(t, str)} if isinstance(stopped, list) else set()


def budget_note(summary: ExperimentSummary | None) -> str:
    """``time budget 30m ended the search`` where it did, else ``""``."""
    budget = summary.time_budget if summary else None
    if not (isinstance(budget, dict) and budget.get("ended_search") and is_number(budget.get("seconds"))):
        return ""
    return f"the time budget of {duration_text(budget['seconds'])} ended the search"


def stop_kind(reason: str) -> str:
    """A :func:`stop_reason` without its epoch: ``completed``, ``stopped by ASHA``, ``interrupted``, ..."""
    return reason.split(" at epoch ", 1)[0]


def _flat(config: dict, prefix: str = "config/") -> dict:
    """``{"config/a": 1, "config/b/c": 2}`` for ``{"a": 1, "b": {"c": 2}}`` (Ray's column names)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def val_acc_of(row: dict) -> float | None:
    """The val_acc of a result row; ``None`` if it has none, or diverged (its 0 only ranks it last)."""
    value = row.get(METRIC)
    return value if is_number(value) and math.isfinite(value) and not row.get("diverged") else None


def _wall_s(trial: Trial) -> float | None:
    """Seconds the trial trained: Ray's ``time_total_s``, else the span of its timestamps."""
    if trial.last and is_number(trial.last.get("time_total_s")):
        return round(trial.last["time_total_s"], 2)
    stamps = [row["timestamp"] for row in trial.epochs if is_number(row.get("timestamp"))]
    return round(stamps[-1] - stamps[0], 2) if len(stamps) > 1 else None


def compute_held(trial: Trial) -> dict:
    """The compute a trial held: its wall seconds times the CPUs (``cpu_s``) and GPUs
    (``gpu_s``) Ray gave it, whether it used them or not (what a cluster's bill counts);
    ``None`` for runs from before trials reported what they held."""
    wall = _wall_s(trial)
    held = next((row for row in reversed(trial.epochs) if is_number(row.get("cpus_held"))), None)
    if wall is None or held is None:
        return {"cpu_s": None, "gpu_s": None}
    gpus = held.get("gpus_held")
    return {"cpu_s": round(wall * held["cpus_held"], 2), "gpu_s": round(wall * gpus, 2) if is_number(gpus) else None}


def compute_of(row: dict) -> tuple[str, float] | None:
    """What a trial row's compute is measured in, and how much: GPU-seconds where it held a
    GPU, else CPU-seconds."""
    if is_number(row.get("gpu_s")) and row["gpu_s"] > 0:
        return "gpu_s", row["gpu_s"]
    if is_number(row.get("cpu_s")):
        return "cpu_s", row["cpu_s"]
    return None


COMPUTE_UNITS = {"gpu_s": "GPU-seconds", "cpu_s": "CPU-seconds"}
NEAR_BEST_POINTS = 1.0  # "nearly the best": within this many accuracy points of it


def pareto_front(rows: list[dict]) -> dict:
    """Of one experiment's trial rows: the trials no other beats in both validation accuracy
    and compute (cheapest first), the best, and the cheapest within NEAR_BEST_POINTS of it."""
    scored = [(compute_of(r), r) for r in rows if is_number(r.get("last_val_acc"))]
    scored = [(c[1], r) for c, r in scored if c is not None]
    unit = next((compute_of(r)[0] for _, r in scored), None)
    front, best_so_far = [], -math.inf
    for cost, row in sorted(scored, key=lambda cr: (cr[0], -cr[1]["last_val_acc"])):
        if row["last_val_acc"] > best_so_far:
            front.append(row)
            best_so_far = row["last_val_acc"]
    best = max((r for _, r in scored), key=lambda r: r["last_val_acc"], default=None)
    near = [(c, r) for c, r in scored if best is not None and 100 * (best["last_val_acc"] - r["last_val_acc"]) <= NEAR_BEST_POINTS]
    cheapest = min(near, key=lambda cr: cr[0])[1] if near else None
    return {"unit": unit, "front": front, "best": best, "cheapest_near_best": cheapest}


def pareto_text(experiments: list[ExperimentResult]) -> str:
    """``tltune best --pareto``: per experiment, the trials on the accuracy/compute front."""
    parts = []
    for exp in experiments:
        rows = trial_rows([exp])
        found = pareto_front(rows)
        if not found["front"]:
            parts.append(f"{exp.name}: no trial with both a validation accuracy and its compute")
            continue
        unit = COMPUTE_UNITS[found["unit"]]
        lines = [f"{exp.name}: accuracy against compute ({unit}), the trials nothing beats in both",
                 f"| Trial | Val accuracy | {unit} | Configuration |", "|---|---|---|---|"]  # fmt: skip
        for row in found["front"]:
            config = {k.removeprefix("config/"): v for k, v in row.items() if k.startswith("config/")}
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown_config(config, exp.record.space or {}).items())
            lines.append(f"| {row['trial']} | {100 * row['last_val_acc']:.2f}% | {row[found['unit']]:.0f} | {shown} |")
        best, cheap = found["best"], found["cheapest_near_best"]
        if cheap is not None and cheap is not best:
            lines.append(f"Cheapest within {NEAR_BEST_POINTS:g} point of the best: {cheap['trial']} at {100 * cheap['last_val_acc']:.2f}% "
                         f"for {cheap[found['unit']] / best[found['unit']]:.0%} of the best's compute ({best['trial']}, {100 * best['last_val_acc']:.2f}%)")  # fmt: skip
        elif best is not None:
            lines.append(f"The best ({best['trial']}) is also the cheapest within {NEAR_BEST_POINTS:g} point of it")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def tested_trials(summary: ExperimentSummary | None) -> dict[str, float]:
    """Trial name → test accuracy of the trials an experiment tested (its best and its reference)."""
    summary, tested = summary or ExperimentSummary(), {}
    reference = summary.reference_trial or {}
    for name, value in ((reference.get("trial"), reference.get("test_acc")), (summary.best_trial, summary.test_acc)):
        if isinstance(name, str) and is_number(value):
            tested[name] = value
    return tested


def trial_rows(experiments: list[ExperimentResult]) -> list[dict]:
    """One row per trial of ``experiments``: experiment, trial, every config value as
    ``config/<key>`` (the same columns in every row, the common hyperparameters first),
    epochs run, stop reason (see :func:`stop_reason`), best and last val_acc, test_acc (the
    tested trials only: the best and the reference) and wall time in seconds; ``None`` where unknown."""
    flat_configs = {(exp.name, t.name): _flat(t.config) for exp in experiments for t in exp.trials}
    keys = {k for config in flat_configs.values() for k in config}
    first = [f"config/{k}" for k in HYPERPARAMETERS if f"config/{k}" in keys]
    config_columns = first + sorted(keys - set(first))
    rows = []
    for exp in experiments:
        tested = tested_trials(exp.summary)
        for trial in exp.trials:
            accuracies = [a for a in map(val_acc_of, trial.epochs) if a is not None]
            config = flat_configs[exp.name, trial.name]
            rows.append(
                {
                    "experiment": exp.name,
                    "trial": trial.name,
                    **{column: config.get(column) for column in config_columns},
                    "epochs_run": trial.epochs_run,
                    "stop_reason": stop_reason(trial, exp),
                    "best_val_acc": max(accuracies, default=None),
                    "last_val_acc": val_acc_of(trial.last) if trial.last else None,
                    "test_acc": tested.get(trial.name),
                    "wall_s": _wall_s(trial),
                    **compute_held(trial),
                    "precision_used": trial.last.get("precision_used") if trial.last else None,
                }
            )
    return rows


def experiment_rows(experiments: list[ExperimentResult]) -> list[dict]:
    """One row per experiment: how it ended, what it spent (trials, search and repeat epochs,
    the search's wall time and the whole experiment's, the precision its trials trained in) and
    its test accuracies over seeds (mean, std, count) at the reference settings and for the best
    configuration, with best − reference and whether that exceeds the spread; accuracies in %,
    ``None`` where unknown."""
    rows = []
    for exp in experiments:
        summary = exp.summary or ExperimentSummary()
        repeat_epochs = ((summary.repeats or {}).get("epochs_spent")) or 0
        spent = summary.epochs_spent
        row = {
            "experiment": exp.name,
            "status": experiment_status(exp),
            "seed_reference_acc": exp.record.reference_accuracy,
            "trials": summary.trials if summary.trials is not None else len(exp.trials),
            "budget": budget_note(exp.summary),
            "search_epochs": spent - repeat_epochs if is_number(spent) else sum(t.epochs_run for t in exp.trials),
            "repeat_epochs": repeat_epochs,
            "search_wall_s": search_wall_s(exp),
            "wall_s": summary.wall_s,
            "precision_used": "/".join(sorted({t.last["precision_used"] for t in exp.trials if t.last and t.last.get("precision_used")})) or None,
        }
        accuracies = {group: seed_accuracies(exp.summary, group) for group in ("reference", "best")}
        for group, values in accuracies.items():
            stats = spread(values)
            row.update({f"{group}_test_acc_mean": round(100 * stats[0], 3) if stats else None,
                        f"{group}_test_acc_std": round(100 * stats[1], 3) if stats else None,
                        f"{group}_seeds": len(values)})  # fmt: skip
        row["best_minus_reference"] = best_vs_reference(exp.summary)
        rows.append(row)
    return rows


def trial_table(run_dir: str | Path) -> list[dict]:
    """:func:`trial_rows` of every experiment in a run directory (or of the one experiment,
    given its directory); ``UserError`` as :func:`load_run`."""
    return trial_rows(load_run(run_dir))


def trial_ends(exp: ExperimentResult) -> tuple[float | None, list[tuple[float, float]]]:
    """When the search's first trial started, and (time, last val_acc) of each trial's last report."""
    def time_of(row: dict):
        return row.get("reported_at", row.get("timestamp"))

    starts, ends = [], []
    for trial in exp.trials:
        rows = [row for row in trial.epochs if is_number(time_of(row))]
        starts += [row["started_at"] if is_number(row.get("started_at")) else time_of(row) for row in rows]
        if rows and (acc := val_acc_of(rows[-1])) is not None:
            ends.append((time_of(rows[-1]), acc))
    return min(starts, default=None), ends


def search_wall_s(exp: ExperimentResult) -> float | None:
    """Seconds from the search's first trial start to its last trial's last report (no test
    scoring, no repeats)."""
    start, ends = trial_ends(exp)
    return round(max(at for at, _ in ends) - start, 1) if ends else None


def best_over_time(exp: ExperimentResult) -> list[tuple[float, float]]:
    """The sweep's answer against its time: each time a trial ends (its last report), the best
    last-epoch validation accuracy of the trials ended so far, as (minutes since the first trial
    started, best val_acc). Last epochs, because that is what the sweep keeps and selects on."""
    start, ends = trial_ends(exp)
    if not ends:
        return []
    curve, best = [], -math.inf
    for at, acc in sorted(ends):
        if acc > best:
            best, minutes = acc, round((at - start) / 60, 2)
            if curve and curve[-1][0] == minutes:  # trials that ended in the same instant: one point
                curve[-1] = (minutes, best)
            else:
                curve.append((minutes, best))
    return curve


def repeat_rows(experiments: list[ExperimentResult]) -> list[dict]:
    """One row per training of the reference and the best configuration (the search's own trial
    and each ``--repeats`` seed): experiment, group, seed, trial, epochs, val and test accuracy."""
    rows = []
    for exp in experiments:
        repeats = (exp.summary.repeats if exp.summary else None) or {}
        for group in ("reference", "best"):
            runs = repeats.get(group) or {}
            # runs of tltune before the seeds were recorded per run: the run's seeds, in order
            runs = {"seeds": repeats.get("seeds"), **runs}
            for i, trial in enumerate(runs.get("trials") or []):
                value = lambda key: runs[key][i] if isinstance(runs.get(key), list) and i < len(runs[key]) else None  # noqa: E731
                rows.append({"experiment": exp.name, "group": group, "seed": value("seeds"), "trial": trial,
                             "epochs": value("epochs"), "val_acc": value("val_acc"), "test_acc": value("test_acc")})  # fmt: skip
    return rows


def trials_csv(rows: list[dict]) -> str:
    """``rows`` of :func:`trial_rows` as CSV text: a header, then a line per row; ``None`` is
    an empty cell, a list a JSON cell."""
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["experiment", "trial", *TRIAL_COLUMNS]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return text.getvalue()


def write_trials_csv(rows: list[dict], path: str | Path) -> None:
    """:func:`trials_csv` of ``rows`` written to ``path`` (a local path or storage URI)."""
    storage.write_text(str(path), trials_csv(rows))
