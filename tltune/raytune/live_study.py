"""The experiment's Optuna study kept live while the sweep runs (``<experiment>/optuna.journal``).

Tune tells its callbacks, in the driver, when each trial starts, reports an epoch and ends;
:class:`LiveStudy` appends each to the study's journal as it happens (Optuna's JournalStorage),
so ``optuna-dashboard`` on a running sweep shows it. Trials are numbered as they start; a trial
ends COMPLETE, PRUNED (ASHA stopped it) or FAIL (diverged, or an error for good) by the rules
of ``trials.csv`` (:func:`tltune.studies.ended_state`), and stays RUNNING where the sweep is
interrupted (SIGINT/SIGTERM reach Tune as SIGUSR1: it stops its trials without ending them in
its callbacks, then calls ``on_experiment_end``). A resume goes on with the same study: a
restarted trial keeps its number. On cloud storage the journal is written locally and
uploaded at most every :data:`UPLOAD_EVERY_S` seconds and when the experiment ends.

The study is a by-product: a failure here is one warning, never the sweep's end, and
:func:`tltune.studies.write_study` makes the study whole from the results when the experiment stops.
"""

from __future__ import annotations

import datetime
import functools
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune import Callback

from tltune import storage
from tltune.errors import is_storage_full
from tltune.raytune import budget
from tltune.results import INTERRUPTED, OPTUNA_JOURNAL, Trial
from tltune.studies import (
    TRIAL_ATTR,
    distributions_of,
    ended_state,
    final_value,
    open_study,
    params_of,
    reopened,
    repair_tail,
    rewrite_journal,
)

UPLOAD_EVERY_S = 2.0  # cloud storage: the study there is at most this far behind (plus one Tune step)
ENDED = ("TERMINATED", "ERROR")  # Tune's statuses of a trial it ended


def trial_name(trial) -> str:
    """The Tune trial's directory name: what results, trials.csv and the study call it."""
    return trial.storage.trial_dir_name


def as_result(trial, failed: bool) -> Trial:
    """A Tune trial as :mod:`tltune.results` reads one, from its last result."""
    last = trial.last_result or {}
    rows = [last] if isinstance(last.get("training_iteration"), int) else []
    return Trial(trial_name(trial), dict(trial.config), rows, failed)


def _by_product(method):
    """Run a callback method; the first error stops the live study with one warning."""

    @functools.wraps(method)
    def guarded(self: LiveStudy, *args, **kwargs) -> None:
        if self._broken:
            return
        try:
            method(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001  the study is a by-product
            self._broken = True
            if is_storage_full(exc):  # the sweep stops with its own line for that
                return
            print(f"warning: the live Optuna study of {self.exp_dir} stopped ({type(exc).__name__}: {exc}); "
                  "it is made whole from the results when the experiment stops", file=sys.stderr)  # fmt: skip

    return guarded


class LiveStudy(Callback):
    """Writes each trial's start, epochs and end to the experiment's Optuna journal as they happen."""

    def __init__(self, exp_dir: str, space: dict):
        self.exp_dir = exp_dir
        self.space = space
        self._forget()

    def _forget(self) -> None:
        self._study: optuna.Study | None = None
        self._journal: Path | None = None  # the local journal file written
        self._tmp: tempfile.TemporaryDirectory | None = None  # cloud storage: where the local copy lies
        self._ids: dict[str, int] = {}  # Tune trial name → Optuna trial id
        self._running: set[str] = set()  # started in this session and not ended
        self._dirty = False  # cloud storage: changes not uploaded yet
        self._uploaded_at = -float("inf")
        self._upload_warned = False
        self._broken = False

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks with the tuner: the settings, never an open journal."""
        return {"exp_dir": self.exp_dir, "space": self.space}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._forget()

    @property
    def target(self) -> str:
        return storage.join(self.exp_dir, OPTUNA_JOURNAL)

    @property
    def study_name(self) -> str:
        return storage.name(self.exp_dir)

    def _open(self) -> None:
        if self._study is not None:
            return
        if storage.is_uri(self.target):
            self._tmp = tempfile.TemporaryDirectory(prefix="tltune-live-study-")
            self._journal = Path(self._tmp.name) / OPTUNA_JOURNAL
            try:  # a resume goes on with the study so far
                self._journal.write_bytes(storage.read_bytes(self.target))
            except FileNotFoundError:
                pass
        else:
            self._journal = Path(self.target)
            self._journal.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self._journal)
        self._distributions = distributions_of(self.space)
        self._load()

    def _load(self) -> None:
        self._study = open_study(self._journal, self.study_name)
        self._ids = {t.user_attrs[TRIAL_ATTR]: t._trial_id for t in self._study.get_trials(deepcopy=False) if TRIAL_ATTR in t.user_attrs}

    def _changed(self) -> None:
        self._dirty = True
        self._upload()

    def _upload(self, now: bool = False) -> None:
        """Cloud storage: the local journal uploaded whole, at most every UPLOAD_EVERY_S (``now``: at once)."""
        if not self._dirty:
            return
        if self._tmp is None:  # local disk: every append is already there
            self._dirty = False
            return
        if not now and time.monotonic() - self._uploaded_at < UPLOAD_EVERY_S:
            return
        try:
            storage.write_text(self.target, self._journal.read_text(encoding="utf-8"))
        except OSError as exc:  # a network blip: tried again at the next change or step
            if not self._upload_warned:
                self._upload_warned = True
                print(f"warning: the live Optuna study was not uploaded to {self.target} ({exc}); trying again", file=sys.stderr)
            return
        self._uploaded_at, self._dirty = time.monotonic(), False

    @_by_product
    def setup(self, **info) -> None:
        self._open()

    @_by_product
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._open()
        name = trial_name(trial)
        trial_id = self._ids.get(name)
        if trial_id is None:
            try:
                params = params_of(trial.config, self._distributions)
            except (KeyError, ValueError):  # a config without, or outside, a searched hyperparameter: left out
                return
            started = FrozenTrial(number=0, trial_id=0, state=TrialState.RUNNING, value=None,
                                  datetime_start=datetime.datetime.now(), datetime_complete=None, params=params,
                                  distributions=self._distributions, user_attrs={TRIAL_ATTR: name},
                                  system_attrs={}, intermediate_values={})  # fmt: skip
            self._ids[name] = self._study._storage.create_new_trial(self._study._study_id, started)
        elif self._study._storage.get_trial(trial_id).state.is_finished():  # a resume restarts an errored trial
            self._reopen(trial_id)
        self._running.add(name)
        self._changed()

    def _reopen(self, trial_id: int) -> None:
        """A journal only appends: the study is written again with that trial running."""
        trials = [reopened(t) if t._trial_id == trial_id else t for t in self._study.get_trials(deepcopy=False)]
        rewrite_journal(self._journal, self.study_name, trials)
        self._load()

    @_by_product
    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        trial_id = self._ids.get(trial_name(trial))
        epoch = result.get("training_iteration")
        value = final_value(Trial("", {}, [result], False))
        if trial_id is None or not isinstance(epoch, int) or value is None:
            return
        if self._study._storage.get_trial(trial_id).state.is_finished():  # a result Tune got after it stopped the trial
            return
        self._study._storage.set_trial_intermediate_value(trial_id, epoch, value)
        self._changed()

    @_by_product
    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, failed=False)

    @_by_product
    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._end(trial, failed=True)

    def _end(self, trial, failed: bool) -> None:
        name = trial_name(trial)
        self._running.discard(name)
        trial_id = self._ids.get(name)
        if trial_id is None or self._study._storage.get_trial(trial_id).state.is_finished():
            return
        ended = as_result(trial, failed)
        state, reason = ended_state(ended, failed, budget_stopped=getattr(trial, "trial_id", None) in budget.stopped_trials(self.exp_dir))
        journal = self._study._storage
        journal.set_trial_user_attr(trial_id, "stop_reason", reason)
        journal.set_trial_user_attr(trial_id, "epochs_run", ended.epochs_run)
        journal.set_trial_state_values(trial_id, state, [final_value(ended)] if state == TrialState.COMPLETE else None)
        self._changed()

    @_by_product
    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._upload()

    def on_experiment_end(self, trials: list, **info) -> None:
        self._finish(trials)
        if self._tmp is not None:
            self._tmp.cleanup()
        self._forget()  # a later fit in this process opens the journal again

    @_by_product
    def _finish(self, trials: list) -> None:
        """Finished: a trial still running in the journal is one whose end an earlier session
        did not get to write (killed): it ends as Tune says. Interrupted (a trial started here
        and never ended, or one Tune never ran): the running trials stay RUNNING, with why."""
        self._open()
        interrupted = bool(self._running) or any(t.status not in ENDED for t in trials)
        by_name = {trial_name(t): t for t in trials}
        for kept in self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            tune_trial = by_name.get(kept.user_attrs.get(TRIAL_ATTR))
            if not interrupted and tune_trial is not None:
                self._end(tune_trial, failed=tune_trial.status == "ERROR")
            elif interrupted:
                epochs = as_result(tune_trial, False).epochs_run if tune_trial is not None else max(kept.intermediate_values, default=0)
                reason = f"{INTERRUPTED} at epoch {epochs}"
                if kept.user_attrs.get("stop_reason") != reason:
                    self._study._storage.set_trial_user_attr(kept._trial_id, "stop_reason", reason)
                    self._study._storage.set_trial_user_attr(kept._trial_id, "epochs_run", epochs)
                    self._changed()
        self._upload(now=True)
