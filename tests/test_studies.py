"""Each experiment's Optuna study, rebuilt from its results into optuna.journal: every trial
once, with its hyperparameters, its accuracy per epoch and how it ended, readable by Optuna."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from s3server import s3, s3_server  # noqa: F401  (fixtures)
from test_damaged_runs import root  # noqa: F401  (a fixture)
from test_trials_table import write_run
from tltune import storage
from tltune.experiments import Choice, IntRange, LogUniform
from tltune.results import OPTUNA_JOURNAL
from tltune.studies import write_study

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
