"""Each experiment's Optuna study, kept as a journal file beside its results.

Ray's OptunaSearch holds its study in memory (pickled inside Tune's state). The study kept
here is rebuilt from the trials' own results whenever an experiment stops — finished,
failed or interrupted — so it survives every resume, holds every trial exactly once and
needs no pickle to read. Each Tune trial is one Optuna trial with its hyperparameters, its
validation accuracy per epoch (Optuna's intermediate values) and a state saying how it ended:
COMPLETE, PRUNED where ASHA stopped it, FAIL where it diverged or errored, RUNNING where the
sweep was interrupted. Optuna's tools read it as is (``optuna-dashboard <exp>/optuna.journal``,
``optuna.load_study(study_name=<experiment>, storage=JournalStorage(...))``).
"""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from tltune import storage
from tltune.experiments import Choice, IntRange, LogUniform, Uniform
from tltune.results import (
    ASHA_STOP,
    COMPLETED,
    INTERRUPTED,
    OPTUNA_JOURNAL,
    ExperimentResult,
    Trial,
    load_experiment,
    stop_kind,
    stop_reason,
    val_acc_of,
)

STATES = {COMPLETED: TrialState.COMPLETE, ASHA_STOP: TrialState.PRUNED, INTERRUPTED: TrialState.RUNNING}  # else FAIL


def distribution(domain) -> BaseDistribution:
    if isinstance(domain, Choice):
        return CategoricalDistribution(list(domain.options))
    if isinstance(domain, LogUniform):
        return FloatDistribution(domain.low, domain.high, log=True)
    if isinstance(domain, Uniform):
        return FloatDistribution(domain.low, domain.high)
    if isinstance(domain, IntRange):
        return IntDistribution(domain.low, domain.high)
    raise TypeError(f"unknown search domain {domain!r}")


def _time(stamp) -> datetime.datetime | None:
    return datetime.datetime.fromtimestamp(stamp) if isinstance(stamp, (int, float)) else None


def optuna_trial(trial: Trial, exp: ExperimentResult, distributions: dict[str, BaseDistribution]) -> optuna.trial.FrozenTrial:
    reason = stop_reason(trial, exp)
    state = STATES.get(stop_kind(reason), TrialState.FAIL)
    curve = {row["training_iteration"]: val_acc_of(row) for row in trial.epochs if isinstance(row.get("training_iteration"), int)}
    curve = {epoch: value for epoch, value in curve.items() if value is not None}
    final = curve.get(max(curve)) if curve else None
    if state == TrialState.COMPLETE and final is None:
        state = TrialState.FAIL
    first, last = (trial.epochs[0], trial.epochs[-1]) if trial.epochs else ({}, {})
    finished = state != TrialState.RUNNING
    return optuna.trial.FrozenTrial(
        number=0,  # add_trial numbers it
        trial_id=0,
        state=state,
        value=final if state == TrialState.COMPLETE else None,
        datetime_start=_time(first.get("started_at", first.get("timestamp"))) or datetime.datetime.now(),
        datetime_complete=(_time(last.get("timestamp")) or datetime.datetime.now()) if finished else None,
        params={name: trial.config[name] for name in distributions},
        distributions=distributions,
        user_attrs={"trial": trial.name, "stop_reason": reason, "epochs_run": len(trial.epochs)},
        system_attrs={},
        intermediate_values=curve,
    )


def write_study(exp_dir: str, space: dict) -> str | None:
    """(Re)write ``exp_dir``'s study from its results; its path, ``None`` with no space searched
    or no readable experiment. Trials whose hyperparameters are outside ``space`` are left out."""
    exp = load_experiment(exp_dir)
    if not space or exp is None:
        return None
    distributions = {name: distribution(domain) for name, domain in space.items()}
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / OPTUNA_JOURNAL
        study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(journal))), study_name=exp.name, direction="maximize")
        for trial in exp.trials:
            try:
                study.add_trial(optuna_trial(trial, exp, distributions))
            except (KeyError, ValueError):  # a config without, or outside, a searched hyperparameter
                continue
        target = storage.join(exp_dir, OPTUNA_JOURNAL)
        storage.write_text(target, journal.read_text())
    return target
