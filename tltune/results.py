"""Read finished or interrupted runs from disk (no Ray) and format the seed's table.

Run directories may be local paths or storage URIs (``s3://bucket/prefix/run``): every read
goes through :mod:`tltune.storage`. A run directory (one invocation of a sweep script) holds one Tune experiment directory per
experiment; each has ``tltune_experiment.json`` from the start, a trial directory per
trial (``params.json``, ``result.json`` with one JSON line per epoch), and, once the
experiment finished, ``tltune_best.json`` with the best trial's test accuracy.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tltune import storage
from tltune.errors import UserError

EXPERIMENT_FILE = "tltune_experiment.json"
SUMMARY_FILE = "tltune_best.json"
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
    def diverged(self) -> bool:
        return bool((self.last or {}).get("diverged"))

    @property
    def score(self) -> float:
        value = (self.last or {}).get(METRIC)
        return value if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


@dataclass
class ExperimentResult:
    path: str  # local path or URI
    record: dict  # tltune_experiment.json
    summary: dict | None  # tltune_best.json, None while unfinished
    trials: list[Trial] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.record.get("name", _basename(self.path))

    def best(self) -> dict | None:
        """The best trial: from the summary when the experiment finished, else by last val_acc."""
        if self.summary and "config" in self.summary:
            return self.summary
        scored = [t for t in self.trials if t.score > -math.inf]
        if not scored:
            return None
        trial = max(scored, key=lambda t: t.score)
        return {
            "best_trial": trial.name,
            "config": trial.config,
            "epochs_trained": trial.last["training_iteration"],
            "val_acc": trial.score,
        }


def _basename(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _read_json_lines(path: str) -> list[dict]:
    rows = []
    if storage.is_file(path):
        for line in storage.read_text(path).splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                pass
    return rows


def load_trials(exp_dir: str) -> list[Trial]:
    trials = []
    for name in storage.list_dir(exp_dir):
        trial_dir = storage.join(exp_dir, name)
        params = storage.join(trial_dir, "params.json")
        if not storage.is_file(params):
            continue
        try:
            config = json.loads(storage.read_text(params))
        except json.JSONDecodeError:
            continue
        epochs = {}
        for row in _read_json_lines(storage.join(trial_dir, "result.json")):
            epochs[row.get("training_iteration")] = row  # a resumed trial may repeat an epoch: keep the last
        files = set(storage.list_dir(trial_dir))
        errored = bool(files & {"error.txt", "error.pkl"})
        trials.append(Trial(name, config, [epochs[k] for k in sorted(epochs, key=lambda k: k or 0)], errored))
    return trials


def load_experiment(exp_dir: str) -> ExperimentResult:
    record = json.loads(storage.read_text(storage.join(exp_dir, EXPERIMENT_FILE)))
    summary_path = storage.join(exp_dir, SUMMARY_FILE)
    summary = json.loads(storage.read_text(summary_path)) if storage.is_file(summary_path) else None
    return ExperimentResult(exp_dir, record, summary, load_trials(exp_dir))


def load_run(path: str | Path) -> list[ExperimentResult]:
    """All experiments in a run directory (or the one experiment, given its directory)."""
    path = storage.absolute(str(path))
    if storage.is_file(storage.join(path, EXPERIMENT_FILE)):
        return [load_experiment(path)]
    if not storage.is_dir(path):
        raise UserError(f"{path} does not exist: pass a run directory printed by a sweep (under ./results by default)")
    records = [storage.join(path, name, EXPERIMENT_FILE) for name in storage.list_dir(path)]
    records = sorted((r for r in records if storage.is_file(r)), key=storage.mtime)  # run order
    experiments = [load_experiment(r.rsplit("/", 1)[0]) for r in records]
    if not experiments:
        raise UserError(f"{path} holds no tltune experiment (no */{EXPERIMENT_FILE}): pass a run directory of a sweep")
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
    trials = sorted((t for t in matches[0].trials if t.score > -math.inf), key=lambda t: t.score, reverse=True)
    return [t.config for t in trials[:k]]


# ---------------------------------------------------------------------------- formatting

DATASET_NAMES = {"cifar10": "CIFAR-10", "mnist": "MNIST", "svhn": "SVHN"}
HYPERPARAMETERS = ("optimizer", "activation", "lr", "epochs", "batch_size", "image_size")


def table_rows(experiments: list[ExperimentResult]) -> list[dict]:
    """One row per experiment in the seed's format, plus the reference and what we tested on."""
    rows = []
    for exp in experiments:
        best = exp.best()
        record = exp.record
        row = {
            "experiment": exp.name,
            "Dataset": DATASET_NAMES.get(record["dataset"], record["dataset"]),
            "Model type": record["label"],
            "Learning rate": None,
            "Epochs": None,
            "Accuracy": None,
            "val_acc": None,
            "reference": record.get("reference_accuracy"),
            "status": "not run",
            "config": None,
        }
        if best is not None:
            row.update(
                {
                    "Learning rate": best["config"].get("lr"),
                    "Epochs": best.get("epochs_trained"),
                    "Accuracy": 100 * best["test_acc"] if "test_acc" in best else None,
                    "val_acc": 100 * best["val_acc"],
                    "status": "finished" if "test_acc" in best else "unfinished (no test accuracy yet)",
                    "config": {k: best["config"][k] for k in HYPERPARAMETERS if best["config"].get(k) is not None},
                }
            )
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| Dataset | Model type | Learning rate | Epochs | Accuracy |", "|---|---|---|---|---|"]
    for row in rows:
        if row["Accuracy"] is not None:
            accuracy = f"{row['Accuracy']:.2f}%"
        elif row["val_acc"] is not None:
            accuracy = f"not tested (val {row['val_acc']:.2f}%)"
        else:
            accuracy = row["status"]
        lr = f"{row['Learning rate']:.3g}" if row["Learning rate"] is not None else "-"
        epochs = row["Epochs"] if row["Epochs"] is not None else "-"
        lines.append(f"| {row['Dataset']} | {row['Model type']} | {lr} | {epochs} | {accuracy} |")
    return "\n".join(lines)


def best_configs_text(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if row["config"] is None:
            lines.append(f"{row['experiment']}: {row['status']}")
            continue
        config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["config"].items())
        accuracy = f"test {row['Accuracy']:.2f}%" if row["Accuracy"] is not None else "not tested"
        reference = f", reference {row['reference']:.2f}%" if row["reference"] is not None else ""
        lines.append(f"{row['experiment']}: {config} -> val {row['val_acc']:.2f}%, {accuracy}{reference}")
    return "\n".join(lines)
