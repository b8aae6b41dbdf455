"""Each experiment's Optuna study, kept as a journal file beside its results.

Ray's OptunaSearch holds its study in memory (pickled inside Tune's state), where ASHA's stops
look like completed trials. The study kept here says what happened: each Tune trial is one
Optuna trial, numbered in the order the trials started, with its hyperparameters, its
validation accuracy per epoch (Optuna's intermediate values) and a state that agrees with
``trials.csv`` (:func:`tltune.results.stop_reason`): COMPLETE, PRUNED where ASHA stopped it,
FAIL where it diverged or errored, RUNNING while it runs, or where the sweep was interrupted.

While a sweep runs, :class:`tltune.raytune.live_study.LiveStudy` writes each trial's start,
epochs and end as they happen; when an experiment stops (finished, failed or interrupted)
:func:`write_study` checks the journal against the trials' own results and adds or ends what
the live writer missed, so the study also exists for runs from before it was written live.
Optuna's tools read it as is (``optuna-dashboard <exp>/optuna.journal``,
``optuna.load_study(study_name=<experiment>, storage=JournalStorage(...))``).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from tltune import storage
from tltune.experiments import Choice, IntRange, LogUniform, Uniform
from tltune.results import (
    ASHA_STOP,
    BUDGET_STOP,
    COMPLETED,
    DIVERGED,
    ERROR,
    INTERRUPTED,
    OPTUNA_JOURNAL,
    ExperimentResult,
    Trial,
    load_experiment,
    planned_epochs,
    stop_kind,
    stop_reason,
    val_acc_of,
)

# a trial the time budget stopped is PRUNED as ASHA's are: stopped before its planned epochs, by the sweep
STATES = {COMPLETED: TrialState.COMPLETE, ASHA_STOP: TrialState.PRUNED, BUDGET_STOP: TrialState.PRUNED, INTERRUPTED: TrialState.RUNNING}  # else FAIL
TRIAL_ATTR = "trial"  # the user attribute naming the Tune trial (its directory) of an Optuna trial


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


def distributions_of(space: dict) -> dict[str, BaseDistribution]:
    return {name: distribution(domain) for name, domain in space.items()}


def params_of(config: dict, distributions: dict[str, BaseDistribution]) -> dict:
    """The searched hyperparameters of a trial's config; ``KeyError`` / ``ValueError`` where one
    is missing or outside its distribution (such a trial is left out of the study)."""
    params = {name: config[name] for name in distributions}
    for name, value in params.items():
        if not distributions[name]._contains(distributions[name].to_internal_repr(value)):  # a choice not there: ValueError
            raise ValueError(f"{name}={value!r} is outside {distributions[name]!r}")
    return params


def open_study(journal: str | Path, name: str) -> optuna.Study:
    """The study ``name`` in the local journal file ``journal``, created where it is not there
    yet (loaded first: ``create_study(load_if_exists=True)`` would append a create each time)."""
    journal_storage = JournalStorage(JournalFileBackend(str(journal)))
    try:
        return optuna.load_study(study_name=name, storage=journal_storage)
    except KeyError:
        return optuna.create_study(storage=journal_storage, study_name=name, direction="maximize")


def repair_tail(journal: Path) -> None:
    """Cut a last line a killed writer left half written: Optuna skips it when reading, but
    the next append would run on from it and damage both."""
    if not journal.is_file():
        return
    data = journal.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(journal, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def rewrite_journal(journal: Path, name: str, trials: list[FrozenTrial]) -> None:
    """Replace the local journal file with study ``name`` holding ``trials`` (same numbers, in
    order): the one way to take back a trial's end, which a journal can only append."""
    tmp = journal.with_name(f".{journal.name}.rewrite")
    tmp.unlink(missing_ok=True)
    study = open_study(tmp, name)
    for trial in trials:
        study.add_trial(trial)
    os.replace(tmp, journal)


def reopened(trial: FrozenTrial) -> FrozenTrial:
    """``trial`` running again (a resume restarts an errored trial)."""
    attrs = {k: v for k, v in trial.user_attrs.items() if k != "stop_reason"}
    return FrozenTrial(number=trial.number, trial_id=trial._trial_id, state=TrialState.RUNNING, value=None,
                       datetime_start=trial.datetime_start, datetime_complete=None, params=trial.params,
                       distributions=trial.distributions, user_attrs=attrs, system_attrs=trial.system_attrs,
                       intermediate_values=trial.intermediate_values)  # fmt: skip


@contextlib.contextmanager
def local_journal(target: str) -> Iterator[Path]:
    """A local journal file for ``target`` (a path or a storage URI): the file itself on local
    disk; for cloud storage a downloaded copy, uploaded back when the block changed it."""
    if not storage.is_uri(target):
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tltune-study-") as tmp:
        path = Path(tmp) / OPTUNA_JOURNAL
        try:
            before = storage.read_bytes(target)
        except FileNotFoundError:
            before = b""
        path.write_bytes(before)
        yield path
        after = path.read_bytes()
        if after != before:
            storage.write_text(target, after.decode("utf-8"))


def ended_state(trial: Trial, failed: bool, budget_stopped: bool = False) -> tuple[TrialState, str]:
    """The state and stop reason of a trial Tune ended (``failed``: by an error, for good), by
    the rules :func:`tltune.results.stop_reason` applies once the experiment stopped: its planned
    epochs done is COMPLETE (FAIL with no accuracy to show), a divergence or an error FAIL,
    anything else ASHA's stop, or the time budget's (``budget_stopped``)."""
    planned = planned_epochs(trial.config)
    if trial.diverged:
        return TrialState.FAIL, DIVERGED
    if planned is not None and trial.epochs_run >= planned:
        return (TrialState.COMPLETE if final_value(trial) is not None else TrialState.FAIL), COMPLETED
    if failed:
        return TrialState.FAIL, ERROR
    return TrialState.PRUNED, f"{BUDGET_STOP if budget_stopped else ASHA_STOP} at epoch {trial.epochs_run}"


def final_value(trial: Trial) -> float | None:
    return val_acc_of(trial.last) if trial.last else None


def curve_of(trial: Trial) -> dict[int, float]:
    """Validation accuracy per epoch (a diverged epoch's 0 is no accuracy)."""
    curve = {row["training_iteration"]: val_acc_of(row) for row in trial.epochs if isinstance(row.get("training_iteration"), int)}
    return {epoch: value for epoch, value in curve.items() if value is not None}


def _time(stamp) -> datetime.datetime | None:
    return datetime.datetime.fromtimestamp(stamp) if isinstance(stamp, (int, float)) else None


def first_start(trial: Trial) -> float:
    """When the trial first started (its results' earliest ``started_at``, else timestamp)."""
    stamps = [row.get("started_at", row.get("timestamp")) for row in trial.epochs]
    return min((s for s in stamps if isinstance(s, (int, float)) and math.isfinite(s)), default=math.inf)


def state_from_results(trial: Trial, exp: ExperimentResult) -> tuple[TrialState, str]:
    """The state :func:`tltune.results.stop_reason` gives ``trial`` (its words beside it)."""
    reason = stop_reason(trial, exp)
    state = STATES.get(stop_kind(reason), TrialState.FAIL)
    if state == TrialState.COMPLETE and final_value(trial) is None:
        state = TrialState.FAIL
    return state, reason


def optuna_trial(trial: Trial, exp: ExperimentResult, distributions: dict[str, BaseDistribution]) -> FrozenTrial:
    """``trial`` as Optuna's, from its results alone."""
    state, reason = state_from_results(trial, exp)
    first, last = (trial.epochs[0], trial.epochs[-1]) if trial.epochs else ({}, {})
    finished = state != TrialState.RUNNING
    return FrozenTrial(
        number=0,  # add_trial numbers it
        trial_id=0,
        state=state,
        value=final_value(trial) if state == TrialState.COMPLETE else None,
        datetime_start=_time(first.get("started_at", first.get("timestamp"))) or datetime.datetime.now(),
        datetime_complete=(_time(last.get("timestamp")) or datetime.datetime.now()) if finished else None,
        params=params_of(trial.config, distributions),
        distributions=distributions,
        user_attrs={TRIAL_ATTR: trial.name, "stop_reason": reason, "epochs_run": trial.epochs_run},
        system_attrs={},
        intermediate_values=curve_of(trial),
    )


def catch_up(study: optuna.Study, kept: FrozenTrial, trial: Trial, exp: ExperimentResult) -> None:
    """Bring a trial the journal holds as RUNNING up to its results: the epochs it lacks and,
    where the results say the trial ended, its end."""
    journal = study._storage
    for epoch, value in curve_of(trial).items():
        if kept.intermediate_values.get(epoch) != value:
            journal.set_trial_intermediate_value(kept._trial_id, epoch, value)
    state, reason = state_from_results(trial, exp)
    if kept.user_attrs.get("stop_reason") != reason:
        journal.set_trial_user_attr(kept._trial_id, "stop_reason", reason)
    if kept.user_attrs.get("epochs_run") != trial.epochs_run:
        journal.set_trial_user_attr(kept._trial_id, "epochs_run", trial.epochs_run)
    if state != TrialState.RUNNING:
        journal.set_trial_state_values(kept._trial_id, state, [final_value(trial)] if state == TrialState.COMPLETE else None)


def write_study(exp_dir: str, space: dict) -> str | None:
    """Make ``exp_dir``'s study hold every trial of its results and how each ended; its path,
    ``None`` with no space searched or no readable experiment.

    What the live writer recorded stands (its numbers, the ends it saw); a trial it lacks is
    added after the others, in start order, and a trial it holds as running is brought up to
    its results (still RUNNING where the sweep was interrupted). A journal that is not one is
    replaced by a study from the results alone. Trials whose hyperparameters are outside
    ``space`` are left out."""
    exp = load_experiment(exp_dir)
    if not space or exp is None:
        return None
    distributions = distributions_of(space)
    target = storage.join(exp_dir, OPTUNA_JOURNAL)
    with local_journal(target) as journal:
        repair_tail(journal)
        try:
            study = open_study(journal, exp.name)
            kept = {t.user_attrs.get(TRIAL_ATTR): t for t in study.get_trials(deepcopy=False)}
        except Exception:  # noqa: BLE001  not a journal, or one Optuna cannot replay: rebuilt whole
            journal.write_bytes(b"")
            study, kept = open_study(journal, exp.name), {}
        for trial in sorted(exp.trials, key=lambda t: (first_start(t), t.name)):
            known = kept.get(trial.name)
            try:
                if known is None:
                    study.add_trial(optuna_trial(trial, exp, distributions))
                elif known.state == TrialState.RUNNING:
                    catch_up(study, known, trial, exp)
            except (KeyError, ValueError):  # a config without, or outside, a searched hyperparameter
                continue
    return target
