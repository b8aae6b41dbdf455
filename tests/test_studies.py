"""Each experiment's Optuna study in optuna.journal, made whole from its results when the
experiment stops: every trial once, with its hyperparameters, its accuracy per epoch and how it
ended, numbered in start order, readable by Optuna; what the live study wrote stands, a trial
it holds as running is brought up to its results. (The live study: tests/test_live_study.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from s3server import s3, s3_server  # noqa: F401  (fixtures)
from test_damaged_runs import root, write_experiment  # noqa: F401  (root: a fixture)
from test_trials_table import summary_of, write_run
from tltune import storage
from tltune.experiments import Choice, IntRange, LogUniform
from tltune.results import OPTUNA_JOURNAL
from tltune.studies import distributions_of, open_study, write_study

SPACE = {"optimizer": Choice(("adam", "sgd")), "activation": Choice(("relu", "tanh")), "lr": LogUniform(1e-5, 20.0), "epochs": IntRange(1, 3)}


def load(exp_dir: str, name: str, tmp_path) -> optuna.Study:
    local = tmp_path / f"{name}.journal"
    local.write_text(storage.read_text(storage.join(exp_dir, OPTUNA_JOURNAL)))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(local))))


def test_the_study_holds_every_trial_and_how_it_ended(root, tmp_path):
    run = storage.join(root, "run")
    write_run(run)
    finished = storage.join(run, "mnist-cnn")
    assert write_study(finished, SPACE) == storage.join(finished, OPTUNA_JOURNAL)
    study = load(finished, "mnist-cnn", tmp_path)
    trials = {t.user_attrs["trial"]: t for t in study.trials}
    assert len(trials) == 6
    states = {name: t.state for name, t in trials.items()}
    assert states == {"done": TrialState.COMPLETE, "asha": TrialState.PRUNED, "nan": TrialState.FAIL,
                      "recovered": TrialState.COMPLETE, "retried": TrialState.PRUNED, "short": TrialState.COMPLETE}  # fmt: skip
    done = trials["done"]
    assert done.value == 0.9 and done.intermediate_values == {1: 0.5, 2: 0.7, 3: 0.9}
    assert done.params == {"optimizer": "adam", "activation": "relu", "lr": 1e-3, "epochs": 3}
    assert trials["asha"].user_attrs["stop_reason"] == "stopped by ASHA at epoch 1" and trials["asha"].value is None
    assert study.best_trial.user_attrs["trial"] == "done"
    assert trials["nan"].intermediate_values == {1: 0.4}, "a diverged epoch's 0 is no accuracy"

    interrupted = storage.join(run, "cifar10-cnn-search")
    write_study(interrupted, SPACE)
    states = {t.user_attrs["trial"]: t.state for t in load(interrupted, "cifar10-cnn-search", tmp_path).trials}
    assert states == {"running": TrialState.RUNNING, "waiting": TrialState.RUNNING, "crashed": TrialState.FAIL}


def test_rewritten_whole_never_appended(tmp_path):
    run = str(tmp_path / "run")
    write_run(run)
    exp_dir = storage.join(run, "mnist-cnn")
    write_study(exp_dir, SPACE)
    write_study(exp_dir, SPACE)  # a resume rewrites it: still one Optuna trial per Tune trial
    assert len(load(exp_dir, "mnist-cnn", tmp_path).trials) == 6


def test_nothing_searched_no_study(tmp_path):
    run = str(tmp_path / "run")
    write_run(run)
    assert write_study(storage.join(run, "mnist-cnn"), {}) is None
    assert not storage.exists(storage.join(run, "mnist-cnn", OPTUNA_JOURNAL))


def test_a_trial_outside_the_space_is_left_out(tmp_path):
    run = str(tmp_path / "run")
    write_run(run)
    exp_dir = storage.join(run, "mnist-cnn")
    write_study(exp_dir, {**SPACE, "lr": LogUniform(1e-5, 1.0)})  # "nan" ran with lr 10
    assert "nan" not in {t.user_attrs["trial"] for t in load(exp_dir, "mnist-cnn", tmp_path).trials}


def write_started(exp_dir: str, name: str, started_at: float, accuracies=(0.5, 0.7, 0.9)) -> None:
    storage.write_text(storage.join(exp_dir, name, "params.json"), json.dumps({"optimizer": "adam", "activation": "relu", "lr": 1e-3, "epochs": 3}))
    rows = [{"training_iteration": e, "val_acc": acc, "started_at": started_at, "timestamp": started_at + e} for e, acc in enumerate(accuracies, 1)]
    storage.write_text(storage.join(exp_dir, name, "result.json"), "".join(json.dumps(r) + "\n" for r in rows))


def test_the_rebuild_numbers_trials_in_start_order(tmp_path):
    """Tune names its trials by a random id: the study numbers them as they started."""
    exp_dir = write_experiment(str(tmp_path / "run"), trials=(), summary=summary_of("mnist-cnn", "ffff00", 0.88))
    for name, started_at in (("c0ffee", 1_800_000_300), ("a1b2c3", 1_800_000_200), ("ffff00", 1_800_000_100)):
        write_started(exp_dir, name, started_at)
    write_study(exp_dir, SPACE)
    assert [t.user_attrs["trial"] for t in load(exp_dir, "mnist-cnn", tmp_path).trials] == ["ffff00", "a1b2c3", "c0ffee"]


def test_what_the_live_study_wrote_stands_and_a_running_trial_catches_up(tmp_path):
    run = str(tmp_path / "run")
    write_run(run)
    exp_dir = storage.join(run, "mnist-cnn")
    journal = Path(exp_dir) / OPTUNA_JOURNAL
    live = open_study(journal, "mnist-cnn")  # as the live study left it: "retried" first, "done" running at epoch 1
    distributions = distributions_of(SPACE)
    for name, config in (("retried", {"optimizer": "adam", "activation": "relu", "lr": 1e-3, "epochs": 3}),
                         ("done", {"optimizer": "adam", "activation": "relu", "lr": 1e-3, "epochs": 3})):  # fmt: skip
        trial = live.ask(distributions)
        live._storage.set_trial_user_attr(trial._trial_id, "trial", name)
        live._storage.set_trial_intermediate_value(trial._trial_id, 1, 0.5 if name == "done" else 0.2)
    live.tell(0, state=TrialState.PRUNED)
    before = journal.read_bytes()
    write_study(exp_dir, SPACE)
    assert journal.read_bytes().startswith(before), "appended to, never rewritten: a dashboard reading it goes on"
    trials = load(exp_dir, "mnist-cnn", tmp_path).trials
    assert [t.user_attrs["trial"] for t in trials[:2]] == ["retried", "done"]
    assert trials[1].state == TrialState.COMPLETE and trials[1].intermediate_values == {1: 0.5, 2: 0.7, 3: 0.9} and trials[1].value == 0.9
    assert trials[1].user_attrs["stop_reason"] == "completed"
    assert {t.user_attrs["trial"] for t in trials[2:]} == {"asha", "nan", "recovered", "short"}


def test_a_damaged_journal_is_replaced_by_the_rebuild(tmp_path):
    run = str(tmp_path / "run")
    write_run(run)
    exp_dir = storage.join(run, "mnist-cnn")
    storage.write_text(storage.join(exp_dir, OPTUNA_JOURNAL), "not a journal\n")
    write_study(exp_dir, SPACE)
    assert len(load(exp_dir, "mnist-cnn", tmp_path).trials) == 6
