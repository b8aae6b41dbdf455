"""Every trial of a sweep as one run in MLflow and/or W&B (``--log-to``).

A run holds its trial's hyperparameters, its per-epoch metrics (step = epoch), and how the
trial ended (:func:`end_state`: completed, stopped by ASHA at epoch N, diverged, error, or
interrupted at epoch N); once the experiment is tested, :func:`record_outcome` adds the test
accuracy of the trials tested and marks the best (and the reference, and the repeats).

Both callbacks run in the driver and find a trial's run again by what tltune names it: MLflow
by the tags ``tltune.trial_id`` / ``tltune.trial`` (the trial folder's name) and
``tltune.exp_dir``, W&B by a run id made of the experiment and the trial id. A tracker that
fails mid-sweep prints one warning and stops logging: it never fails the sweep.

Why not Ray's own callbacks (``ray.air.integrations``):

- ``MLflowLoggerCallback`` names runs ``str(trial)`` ("train_trial_<id>"), logs every numeric
  field of every result (``config/*`` and Ray's bookkeeping too) one request per value, each
  after a ``get_run`` (dozens of round trips per epoch and trial against a server), and
  forgets its trial -> run map in ``setup``, so a resumed sweep gives each unfinished trial a
  second run; it records no end state. Kept from it would be experiment creation only. And
  its module imports mlflow on import, which this module (imported by every sweep) must not.
- ``WandbLoggerCallback`` logs each trial from two Ray actors of its own (the logger and its
  queue, wandb imported in each), which ``chdir`` into the trial folder, so offline run files
  land in the run folder; it finishes the run when the trial ends and keeps no handle to it:
  the test accuracy and the best mark, known only after the experiment, could not be added to
  the trial's run (an offline run cannot be reopened; resuming it makes a second one). Here a
  W&B run stays open from its trial's start until :func:`record_outcome` finishes it.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from typing import Any

from ray import tune

from tltune.records import is_finite_number
from tltune.results import ASHA_STOP, COMPLETED, DIVERGED, ERROR, INTERRUPTED, planned_epochs, stop_kind
from tltune.trackers import mlflow_tracking_uri, wandb_dir, wandb_mode, wandb_project

# The per-epoch metrics a run gets (the trainable's report; Ray's bookkeeping left out but one).
METRICS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "train_images_per_s", "time_this_iter_s")
TESTED = ("test_acc", "test_loss")  # logged once the experiment is tested


def tracker_callbacks(log_to: tuple[str, ...] | None, experiment: str, exp_dir: str, group: str) -> list:
    """Tune callbacks logging each trial of ``experiment`` (``group``: the search, or its repeats)."""
    callbacks: list[tune.Callback] = []
    if "mlflow" in (log_to or ()):
        callbacks.append(MLflowTrialRuns(experiment, exp_dir, group))
    if "wandb" in (log_to or ()):
        callbacks.append(WandbTrialRuns(experiment, exp_dir, group))
    return callbacks


def record_outcome(log_to: tuple[str, ...] | None, experiment: str, exp_dir: str, summary: dict) -> None:
    """After an experiment: the tested trials' test accuracy, and its best trial marked."""
    outcome = tested_runs(summary)
    for name, record in (("mlflow", mlflow_outcome), ("wandb", wandb_outcome)):
        if name in (log_to or ()):
            try:
                record(experiment, exp_dir, outcome)
            except Exception as exc:  # noqa: BLE001  the results are on disk; the tracker is a copy
                warn(name, f"the test accuracies of {experiment} were not recorded", exc)


def tested_runs(summary: dict) -> dict[str, dict]:
    """Trial name -> what the experiment's testing says of it: ``roles`` (best, reference,
    "best repeat", "reference repeat"), its test scores, and for a repeat the trial it repeats."""
    runs: dict[str, dict] = {}

    def add(name, role: str, scores: dict, **extra) -> None:
        if isinstance(name, str) and name:
            run = runs.setdefault(name, {"roles": [], **extra})
            run["roles"].append(role)
            run.update({k: v for k, v in scores.items() if k in TESTED and is_finite_number(v)})

    add(summary.get("best_trial"), "best", summary)
    add((summary.get("reference_trial") or {}).get("trial"), "reference", summary.get("reference_trial") or {})
    for group, runs_of in ((summary.get("repeats") or {}).items()):
        if not isinstance(runs_of, dict) or not isinstance(runs_of.get("trials"), list):
            continue
        trials, tests = runs_of["trials"], runs_of.get("test_acc") or []
        for i, name in enumerate(trials[1:], start=1):  # the first is the search's own trial
            add(name, f"{group} repeat", {"test_acc": tests[i] if i < len(tests) else None}, repeat_of=trials[0])
    return runs


def trial_name(trial) -> str:
    """The trial folder's name, as tltune names trials everywhere (``trial_name`` in sweep)."""
    return str(trial.path).rstrip("/").rsplit("/", 1)[-1]


def end_state(trial, failed: bool) -> str:
    """How a trial ended, in :func:`tltune.results.stop_reason`'s words: an error, diverged,
    completed (its ``epochs``, or a repeat's ``stop_epoch``), or else stopped by ASHA."""
    if failed:
        return ERROR
    last = trial.last_result or {}
    if last.get("diverged"):
        return DIVERGED
    epochs = last.get("training_iteration") or 0
    planned = planned_epochs(trial.config)
    if planned is not None and epochs >= planned:
        return COMPLETED
    return f"{ASHA_STOP} at epoch {epochs}"


def epoch_metrics(result: dict) -> dict[str, float]:
    return {k: float(result[k]) for k in METRICS if is_finite_number(result.get(k))}


def warn(tracker: str, what: str, exc: BaseException) -> None:
    first = " ".join(str(exc).split())[:200]
    print(f"warning: --log-to {tracker}: {what}: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)


class TrackerCallback(tune.Callback):
    """A tracker's Tune callback: picklable until ``setup`` (Tune saves the callbacks with
    the tuner), and one that stops at its first failure with one warning."""

    tracker = ""
    _RUNTIME: tuple[str, ...] = ()  # attributes made in setup: never pickled

    def __init__(self, experiment: str, exp_dir: str, group: str):
        self.experiment, self.exp_dir, self.group = experiment, exp_dir, group
        self._broken = False

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def _safely(self, what: str, action, *args) -> Any:
        if self._broken:
            return None
        try:
            return action(*args)
        except Exception as exc:  # noqa: BLE001  a tracker never fails the sweep
            self._broken = True
            warn(self.tracker, f"{what} failed, no more logging to it in {self.experiment} ({self.group})", exc)
            return None

    def setup(self, **info) -> None:
        self._safely("connecting", self._setup)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._safely(f"starting the run of {trial_name(trial)}", self._start, trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._safely(f"logging {trial_name(trial)}", self._result, trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._safely(f"ending the run of {trial_name(trial)}", self._end, trial, False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._safely(f"ending the run of {trial_name(trial)}", self._end, trial, True)

    def on_experiment_end(self, trials, **info) -> None:
        """Trials still running when Tune stops (a signal, a time budget): interrupted."""
        self._safely("ending the interrupted runs", self._interrupted, trials)

    def _setup(self) -> None: ...
    def _start(self, trial) -> None: ...
    def _result(self, trial, result: dict) -> None: ...
    def _end(self, trial, failed: bool) -> None: ...
    def _interrupted(self, trials) -> None: ...


# --- MLflow -------------------------------------------------------------------------------


def mlflow_experiment_id(client, experiment: str) -> str:
    """The MLflow experiment named after the tltune experiment, created where missing."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment)
    except Exception:  # another driver created it meanwhile
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def mlflow_runs(client, experiment_id: str, exp_dir: str, key: str, value: str) -> list:
    """The runs of ``exp_dir`` whose tag ``key`` is ``value`` (trial names and ids hold no quote)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{value}'")
    return [run for run in runs if run.data.tags.get("tltune.exp_dir") == exp_dir]


# exp_dir -> the tracking URI its callbacks log to (a resumed sweep's: the one it started with).
_MLFLOW_URIS: dict[str, str] = {}


class MLflowTrialRuns(TrackerCallback):
    """One MLflow run per trial, in the MLflow experiment named after the tltune experiment
    (``$MLFLOW_TRACKING_URI``, see :func:`tltune.trackers.mlflow_tracking_uri`): params = the
    trial's config, metrics per epoch, the tag ``tltune.end`` when it ends."""

    tracker = "mlflow"
    _RUNTIME = ("_client", "_experiment_id", "_runs", "_ended")

    def __init__(self, experiment: str, exp_dir: str, group: str):
        super().__init__(experiment, exp_dir, group)
        self.tracking_uri = mlflow_tracking_uri()  # kept: a resumed sweep logs where it started

    def _setup(self) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        _MLFLOW_URIS[self.exp_dir] = self.tracking_uri
        self._experiment_id = mlflow_experiment_id(self._client, self.experiment)
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._ended: set[str] = set()

    def _start(self, trial) -> None:
        from mlflow.entities import Param

        if trial.trial_id in self._runs:  # restarted after a failure Tune retried
            self._client.update_run(self._runs[trial.trial_id], status="RUNNING")
            self._ended.discard(trial.trial_id)
            return
        existing = mlflow_runs(self._client, self._experiment_id, self.exp_dir, "tltune.trial_id", trial.trial_id)
        if existing:  # a resumed sweep: the trial's run from before
            run_id = self._runs[trial.trial_id] = existing[0].info.run_id
            self._client.update_run(run_id, status="RUNNING")
            return
        name = trial_name(trial)
        tags = {"tltune.experiment": self.experiment, "tltune.group": self.group, "tltune.exp_dir": self.exp_dir,
                "tltune.trial": name, "tltune.trial_id": trial.trial_id}  # fmt: skip
        run = self._client.create_run(self._experiment_id, run_name=name, tags=tags)
        self._runs[trial.trial_id] = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(trial.config.items())]
        for i in range(0, len(params), 100):  # MLflow's batch limit
            self._client.log_batch(run.info.run_id, params=params[i : i + 100])

    def _result(self, trial, result: dict) -> None:
        from mlflow.entities import Metric

        if trial.trial_id not in self._runs:
            self._start(trial)
        step, stamp = int(result.get("training_iteration") or 0), int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in epoch_metrics(result).items()]
        self._client.log_batch(self._runs[trial.trial_id], metrics=metrics)

    def _end(self, trial, failed: bool) -> None:
        run_id = self._runs.get(trial.trial_id)
        if run_id is None:
            return
        state = end_state(trial, failed)
        self._client.set_tag(run_id, "tltune.end", state)
        self._client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
        self._ended.add(trial.trial_id)

    def _interrupted(self, trials) -> None:
        for trial in trials:
            run_id = self._runs.get(trial.trial_id)
            if run_id is not None and trial.trial_id not in self._ended:
                epochs = (trial.last_result or {}).get("training_iteration") or 0
                self._client.set_tag(run_id, "tltune.end", f"{INTERRUPTED} at epoch {epochs}")
                self._client.set_terminated(run_id, status="KILLED")
                self._ended.add(trial.trial_id)


def mlflow_outcome(experiment: str, exp_dir: str, outcome: dict[str, dict]) -> None:
    """Test scores and roles as metrics and tags of the tested trials' runs; the best's run
    tagged ``tltune.best = true`` and named in the MLflow experiment's tag ``tltune.best_run``."""
    from mlflow.tracking import MlflowClient

    uri = _MLFLOW_URIS.get(exp_dir) or mlflow_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment_id = mlflow_experiment_id(client, experiment)
    for name, tested in outcome.items():
        for run in mlflow_runs(client, experiment_id, exp_dir, "tltune.trial", name):
            run_id = run.info.run_id
            for key in TESTED:
                if key in tested:
                    client.log_metric(run_id, key, float(tested[key]))
            client.set_tag(run_id, "tltune.role", ", ".join(tested["roles"]))
            if "repeat_of" in tested:
                client.set_tag(run_id, "tltune.repeat_of", tested["repeat_of"])
            if "best" in tested["roles"]:
                client.set_tag(run_id, "tltune.best", "true")
                client.set_experiment_tag(experiment_id, "tltune.best_run", run_id)
    print(f"MLflow: the runs of {experiment} are in {uri}, experiment {experiment!r}", flush=True)


# --- W&B ----------------------------------------------------------------------------------

# Runs open in this driver, finished by record_outcome: exp_dir -> trial name -> [run, failed].
_WANDB_RUNS: dict[str, dict[str, list]] = {}
_END_TAGS = {COMPLETED, DIVERGED, ERROR, ASHA_STOP, INTERRUPTED}  # a run's tag of how it ended: one of these


def wandb_run_id(experiment: str, trial_id: str) -> str:
    """A W&B run id from the experiment and the trial id: the same run again on a resume.
    W&B takes letters, digits, - and _ (64 at most); a long name is shortened with its hash."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", experiment).strip("-")
    if len(slug) > 40:
        slug = f"{slug[:31]}-{hashlib.sha1(experiment.encode()).hexdigest()[:8]}"
    return f"{slug}-{re.sub(r'[^A-Za-z0-9_]', '_', trial_id)}"


def wandb_init(experiment: str, trial_id: str, **kwargs):
    """The W&B run of a trial, created or resumed, in ``$WANDB_DIR`` (else the working
    directory): silent (its banners would bury tltune's progress), without the driver's
    console and system metrics, which are not the trial's."""
    import wandb

    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
    return wandb.init(project=wandb_project(), id=wandb_run_id(experiment, trial_id), resume="allow",
                      reinit="create_new", settings=settings, **kwargs)  # fmt: skip


class WandbTrialRuns(TrackerCallback):
    """One W&B run per trial (group: the experiment; job type: search or repeats): config =
    the trial's config, metrics per epoch, the summary's ``tltune/end`` and a tag when it ends."""

    tracker = "wandb"

    def _runs(self) -> dict[str, list]:
        return _WANDB_RUNS.setdefault(self.exp_dir, {})

    def _start(self, trial) -> None:
        name = trial_name(trial)
        if name in self._runs():  # restarted after a failure Tune retried
            self._runs()[name][1] = None
            return
        run = wandb_init(self.experiment, trial.trial_id, name=name, group=self.experiment,
                         job_type="search" if self.group == self.experiment else self.group,
                         config=dict(trial.config), notes=f"tltune: {self.exp_dir}")  # fmt: skip
        self._runs()[name] = [run, None]  # None: not ended

    def _result(self, trial, result: dict) -> None:
        if trial_name(trial) not in self._runs():
            self._start(trial)
        run = self._runs()[trial_name(trial)][0]
        run.log(epoch_metrics(result), step=int(result.get("training_iteration") or 0))

    def _end(self, trial, failed: bool, state: str | None = None) -> None:
        entry = self._runs().get(trial_name(trial))
        if entry is None:
            return
        run, state = entry[0], state or end_state(trial, failed)
        run.summary["tltune/end"] = state
        run.tags = tuple(t for t in run.tags if t not in _END_TAGS) + (stop_kind(state),)
        entry[1] = failed

    def _interrupted(self, trials) -> None:
        """Interrupted runs are finished now: no outcome is recorded for them in this driver."""
        for trial in trials:
            entry = self._runs().get(trial_name(trial))
            if entry is not None and entry[1] is None:
                epochs = (trial.last_result or {}).get("training_iteration") or 0
                self._end(trial, True, f"{INTERRUPTED} at epoch {epochs}")
                entry[0].finish(exit_code=1)
                del self._runs()[trial_name(trial)]


def wandb_outcome(experiment: str, exp_dir: str, outcome: dict[str, dict]) -> None:
    """Test scores and roles in the tested trials' summaries and tags (``best``, ...), then
    every run of the experiment finished. A tested trial whose run is not open here (it ended
    in an earlier invocation of a resumed sweep) is resumed by its id."""
    runs = _WANDB_RUNS.pop(exp_dir, {})
    for name, tested in outcome.items():
        entry = runs.get(name)
        if entry is None:
            runs[name] = entry = [wandb_init(experiment, name.split("-", 1)[0]), False]
        run = entry[0]
        for key in TESTED:
            if key in tested:
                run.summary[key] = tested[key]
        run.summary["tltune/role"] = ", ".join(tested["roles"])
        run.summary["tltune/best"] = "best" in tested["roles"]
        if "repeat_of" in tested:
            run.summary["tltune/repeat_of"] = tested["repeat_of"]
        run.tags = tuple(dict.fromkeys([*run.tags, *tested["roles"]]))
    for run, failed in runs.values():
        run.finish(exit_code=1 if failed else 0)
    mode = wandb_mode()
    where = f"offline in {wandb_dir()} (upload: wandb sync {wandb_dir()}/offline-run-*)" if mode == "offline" else f"project {wandb_project()!r}"
    if mode != "disabled":
        print(f"W&B: {len(runs)} runs of {experiment}, {where}", flush=True)
