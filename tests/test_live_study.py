"""The experiment's Optuna study is live and true: each trial's start, epochs and end reach
``<experiment>/optuna.journal`` as they happen (a real sweep, read through ``optuna.load_study``
while it runs), every state agrees with trials.csv, trials are numbered in start order, an
interruption leaves RUNNING trials that a resume ends, a study on S3 is uploaded within
seconds, and ``optuna-dashboard`` serves the finished study."""

from __future__ import annotations

import csv
import io
import json
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from conftest import WATCHED_EXPERIMENT, WATCHED_SAMPLES
from s3server import free_port, open_loopback, s3, s3_server  # noqa: F401  (fixtures)
from test_studies import SPACE
from test_trials_table import write_run
from tltune import storage
from tltune.raytune import live_study
from tltune.raytune.live_study import LiveStudy
from tltune.results import OPTUNA_JOURNAL, load_experiment, stop_kind, trial_table
from tltune.studies import write_study

# trials.csv's stop reason (without its epoch) → the state the study must show
STATE_OF_REASON = {"completed": TrialState.COMPLETE, "stopped by ASHA": TrialState.PRUNED, "diverged": TrialState.FAIL,
                   "error": TrialState.FAIL, "interrupted": TrialState.RUNNING}  # fmt: skip
EXPERIMENT = WATCHED_EXPERIMENT


def read_study(journal: Path) -> optuna.Study:
    return optuna.load_study(study_name=EXPERIMENT, storage=JournalStorage(JournalFileBackend(str(journal))))


def states_by_trial(study: optuna.Study) -> dict[str, TrialState]:
    return {t.user_attrs["trial"]: t.state for t in study.trials}


def expected_states(rows: list[dict]) -> dict[str, TrialState]:
    return {row["trial"]: STATE_OF_REASON[stop_kind(row["stop_reason"])] for row in rows}


# ---------------------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def live_sweep(watched_sweep):
    """The session's watched sweep (conftest: a real small sweep, its journal read through
    Optuna every few tenths of a second while it ran): (run directory, the states seen, in order)."""
    return watched_sweep.run_dir, watched_sweep.seen


@pytest.mark.slow  # reads the session's sweep, watched while it ran
def test_the_study_is_live_while_the_sweep_runs(live_sweep):
    _, seen = live_sweep
    assert any(seen), "the study had trials before the sweep ended"
    assert any(TrialState.RUNNING in states.values() for states in seen), "running trials show as RUNNING"
    assert any(TrialState.PRUNED in s.values() or TrialState.COMPLETE in s.values() for s in seen), "ends show as they happen"
    for earlier, later in zip(seen, seen[1:]):  # a trial, once ended, stays as it ended
        assert {n: s for n, s in earlier.items() if s.is_finished()}.items() <= later.items()


@pytest.mark.slow  # reads the session's sweep, watched while it ran
def test_every_state_agrees_with_trials_csv_and_numbers_follow_start_order(live_sweep):
    run, _ = live_sweep
    out = subprocess.run([sys.executable, "-m", "tltune", "best", str(run), "--trials"], capture_output=True, text=True, check=True)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    study = read_study(run / EXPERIMENT / OPTUNA_JOURNAL)
    assert states_by_trial(study) == expected_states(rows)
    assert len(study.trials) == WATCHED_SAMPLES and TrialState.PRUNED in states_by_trial(study).values(), "ASHA stopped some (grace period 1)"
    for trial in study.trials:
        row = next(r for r in rows if r["trial"] == trial.user_attrs["trial"])
        assert trial.user_attrs["stop_reason"] == row["stop_reason"]
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(float(row["last_val_acc"]))
        assert len(trial.intermediate_values) == int(row["epochs_run"])
    # numbers in start order: each trial's first start (its result.json), allowing for two
    # trials the driver starts within the same instant
    first_start = {}
    for trial in study.trials:
        first_row = json.loads((run / EXPERIMENT / trial.user_attrs["trial"] / "result.json").read_text().splitlines()[0])
        first_start[trial.number] = first_row["started_at"]
    numbers = sorted(first_start)
    assert numbers == list(range(WATCHED_SAMPLES))
    for earlier, later in zip(numbers, numbers[1:]):
        assert first_start[earlier] <= first_start[later] + 1.0, first_start


@pytest.mark.slow  # reads the session's sweep, watched while it ran
def test_optuna_dashboard_serves_the_finished_study(live_sweep):
    run, _ = live_sweep
    journal = run / EXPERIMENT / OPTUNA_JOURNAL
    before = journal.read_bytes()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    assert dashboard.exists(), "optuna-dashboard is not installed: pip install -e '.[test]'"
    port = free_port()
    argv = [str(dashboard), str(journal), "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        studies = None
        deadline = time.time() + 120
        while studies is None and time.time() < deadline:
            try:
                with open_loopback(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    studies = json.load(response)["study_summaries"]
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.2)
        [study] = studies
        assert study["study_name"] == EXPERIMENT
        with open_loopback(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=10) as response:
            detail = json.load(response)
    finally:
        server.terminate()
        server.wait(10)
    shown = {next(a["value"] for a in t["user_attrs"] if a["key"] == "trial"): t["state"] for t in detail["trials"]}
    expected = states_by_trial(read_study(journal))
    assert shown == {name: state.name.capitalize() for name, state in expected.items()}
    assert [t["number"] for t in detail["trials"]] == list(range(len(expected)))
    assert detail["best_trials"] and detail["best_trials"][0]["state"] == "Complete"
    assert journal.read_bytes() == before, "the dashboard only reads"


# ---------------------------------------------------------------------------- Tune's calls, one by one


@dataclass
class FakeTrial:
    """What LiveStudy reads of a Tune trial."""

    name: str
    config: dict
    status: str = "RUNNING"
    last_result: dict = field(default_factory=dict)

    @property
    def storage(self):
        return SimpleNamespace(trial_dir_name=self.name)


def config(lr: float = 1e-3, epochs: int = 3) -> dict:
    return {"optimizer": "adam", "activation": "relu", "lr": lr, "epochs": epochs, "batch_size": 64}


def report(callback: LiveStudy, trial: FakeTrial, *accuracies: float, diverged: bool = False) -> None:
    for acc in accuracies:
        epoch = trial.last_result.get("training_iteration", 0) + 1
        trial.last_result = {"training_iteration": epoch, "val_acc": acc, **({"diverged": True} if diverged else {})}
        callback.on_trial_result(iteration=0, trials=[], trial=trial, result=trial.last_result)


def start(callback: LiveStudy, *trials: FakeTrial) -> None:
    for trial in trials:
        trial.status = "RUNNING"
        callback.on_trial_start(iteration=0, trials=[], trial=trial)


def end(callback: LiveStudy, trial: FakeTrial, error: bool = False) -> None:
    trial.status = "ERROR" if error else "TERMINATED"
    (callback.on_trial_error if error else callback.on_trial_complete)(iteration=0, trials=[], trial=trial)


def numbered(journal: Path) -> list[tuple[str, str, str | None]]:
    """(trial, state, stop reason) in number order."""
    return [(t.user_attrs["trial"], t.state.name, t.user_attrs.get("stop_reason")) for t in read_study(journal).trials]


def test_every_way_a_trial_ends_and_an_interruption_then_resumes(tmp_path, capsys):
    exp_dir = str(tmp_path / EXPERIMENT)
    journal = tmp_path / EXPERIMENT / OPTUNA_JOURNAL
    done, asha, nan, broken, cut, waiting = (FakeTrial(n, config()) for n in ("done", "asha", "nan", "broken", "cut", "waiting"))
    short = FakeTrial("short", config(epochs=1))
    outside = FakeTrial("outside", config(lr=50.0))  # outside the space searched: left out
    waiting.status = "PENDING"
    live = LiveStudy(exp_dir, SPACE)
    live.setup()
    start(live, asha, done)  # numbered as they start, not as Tune named them
    assert numbered(journal) == [("asha", "RUNNING", None), ("done", "RUNNING", None)], "RUNNING as soon as it starts"
    report(live, done, 0.5, 0.7, 0.9)
    report(live, asha, 0.3)
    end(live, asha)
    report(live, asha, 0.35)  # a result Tune got after it stopped the trial: no epoch of the study
    end(live, done)
    start(live, nan, broken, short, outside)
    report(live, nan, 0.4)
    report(live, nan, 0.0, diverged=True)
    end(live, nan)
    report(live, broken, 0.2)
    end(live, broken, error=True)
    report(live, short, 0.6)
    end(live, short)
    start(live, cut)
    report(live, cut, 0.5)
    # SIGINT/SIGTERM: Tune marks its running trials TERMINATED without ending them in its callbacks
    cut.status = "TERMINATED"
    live.on_experiment_end(trials=[done, asha, nan, broken, short, outside, cut, waiting])
    assert numbered(journal) == [("asha", "PRUNED", "stopped by ASHA at epoch 1"), ("done", "COMPLETE", "completed"),
                                 ("nan", "FAIL", "diverged"), ("broken", "FAIL", "error"), ("short", "COMPLETE", "completed"),
                                 ("cut", "RUNNING", "interrupted at epoch 1")]  # fmt: skip
    study = read_study(journal)
    assert study.best_trial.user_attrs["trial"] == "done" and study.best_value == 0.9
    assert study.trials[1].intermediate_values == {1: 0.5, 2: 0.7, 3: 0.9}
    assert study.trials[2].intermediate_values == {1: 0.4}, "a diverged epoch's 0 is no accuracy"

    # --resume: Tune unpickles the callback from its tuner.pkl; the interrupted and the
    # errored trials go on from their checkpoints, keeping their numbers
    resumed = pickle.loads(pickle.dumps(live))
    resumed.setup()
    start(resumed, cut, broken, waiting)
    report(resumed, cut, 0.6, 0.8)
    end(resumed, cut)
    report(resumed, broken, 0.3)
    end(resumed, broken)
    report(resumed, waiting, 0.1)
    end(resumed, waiting)
    resumed.on_experiment_end(trials=[done, asha, nan, broken, short, outside, cut, waiting])
    assert numbered(journal) == [("asha", "PRUNED", "stopped by ASHA at epoch 1"), ("done", "COMPLETE", "completed"),
                                 ("nan", "FAIL", "diverged"), ("broken", "PRUNED", "stopped by ASHA at epoch 2"),
                                 ("short", "COMPLETE", "completed"), ("cut", "COMPLETE", "completed"),
                                 ("waiting", "PRUNED", "stopped by ASHA at epoch 1")]  # fmt: skip
    assert read_study(journal).trials[3].intermediate_values == {1: 0.2, 2: 0.3}
    assert capsys.readouterr().err == ""


def test_a_finished_resume_ends_what_a_killed_driver_left_running(tmp_path):
    """kill -9 (no on_experiment_end): the journal keeps RUNNING trials; once a resumed session
    finishes, those Tune ended before the kill end as Tune says."""
    exp_dir = str(tmp_path / EXPERIMENT)
    journal = tmp_path / EXPERIMENT / OPTUNA_JOURNAL
    lost, goes_on = FakeTrial("lost", config()), FakeTrial("goes_on", config())
    killed = LiveStudy(exp_dir, SPACE)
    killed.setup()
    start(killed, lost, goes_on)
    report(killed, lost, 0.3)
    report(killed, goes_on, 0.4)
    lost.status = "TERMINATED"  # ASHA stopped it; its end never reached the journal (e.g. on S3, not yet uploaded)
    resumed = LiveStudy(exp_dir, SPACE)
    resumed.setup()
    start(resumed, goes_on)
    report(resumed, goes_on, 0.5, 0.6)
    end(resumed, goes_on)
    resumed.on_experiment_end(trials=[lost, goes_on])
    assert numbered(journal) == [("lost", "PRUNED", "stopped by ASHA at epoch 1"), ("goes_on", "COMPLETE", "completed")]


def test_a_journal_cut_short_by_a_kill_is_continued(tmp_path):
    exp_dir = str(tmp_path / EXPERIMENT)
    journal = tmp_path / EXPERIMENT / OPTUNA_JOURNAL
    first = FakeTrial("first", config())
    live = LiveStudy(exp_dir, SPACE)
    live.setup()
    start(live, first)
    with journal.open("a") as f:
        f.write('{"op_code": 7, "worker_id": "x", "tri')  # the driver killed mid-line
    resumed = LiveStudy(exp_dir, SPACE)
    resumed.setup()
    second = FakeTrial("second", config())
    start(resumed, first, second)
    report(resumed, first, 0.2, 0.4, 0.6)
    end(resumed, first)
    assert numbered(journal) == [("first", "COMPLETE", "completed"), ("second", "RUNNING", None)]


def test_the_final_rebuild_agrees_with_the_live_study(tmp_path):
    """When the experiment stops, write_study finds nothing to change in what the live study
    wrote: the same numbers, the same states, the states trials.csv shows."""
    run = str(tmp_path / "run")
    write_run(run)
    exp_dir = storage.join(run, EXPERIMENT)
    exp = load_experiment(exp_dir)
    live = LiveStudy(exp_dir, SPACE)
    live.setup()
    tune_trials = []
    for trial in sorted(exp.trials, key=lambda t: t.name, reverse=True):  # started in another order than by name
        fake = FakeTrial(trial.name, trial.config)
        tune_trials.append(fake)
        start(live, fake)
        for row in trial.epochs:
            fake.last_result = row
            live.on_trial_result(iteration=0, trials=[], trial=fake, result=row)
        end(live, fake)
    live.on_experiment_end(trials=tune_trials)
    journal = Path(exp_dir) / OPTUNA_JOURNAL
    written = journal.read_bytes()
    write_study(exp_dir, SPACE)
    assert journal.read_bytes() == written, journal.read_text()[len(written):]
    assert [name for name, _, _ in numbered(journal)] == [t.name for t in tune_trials]
    assert states_by_trial(read_study(journal)) == expected_states(trial_table(exp_dir))


def test_a_study_on_s3_is_uploaded_within_seconds(s3, monkeypatch, tmp_path):
    exp_dir = storage.join(s3.root, "run", EXPERIMENT)
    target = storage.join(exp_dir, OPTUNA_JOURNAL)
    clock = [1000.0]
    monkeypatch.setattr(live_study.time, "monotonic", lambda: clock[0])

    def uploaded() -> list[tuple[str, str, str | None]]:
        local = tmp_path / f"copy-{time.perf_counter_ns()}.journal"
        local.write_bytes(storage.read_bytes(target))
        return numbered(local)

    first, second = FakeTrial("first", config()), FakeTrial("second", config())
    live = LiveStudy(exp_dir, SPACE)
    live.setup()
    start(live, first)
    assert uploaded() == [("first", "RUNNING", None)], "the first change goes up at once"
    clock[0] += 0.5
    start(live, second)
    live.on_step_end(iteration=0, trials=[])
    assert uploaded() == [("first", "RUNNING", None)], f"at most every {live_study.UPLOAD_EVERY_S} s"
    clock[0] += live_study.UPLOAD_EVERY_S
    live.on_step_end(iteration=0, trials=[])
    assert uploaded() == [("first", "RUNNING", None), ("second", "RUNNING", None)], "a Tune step later, it is there"
    report(live, first, 0.3)
    end(live, first)
    live.on_experiment_end(trials=[first, second])
    assert uploaded() == [("first", "PRUNED", "stopped by ASHA at epoch 1"), ("second", "RUNNING", "interrupted at epoch 0")]
    resumed = LiveStudy(exp_dir, SPACE)  # a resume goes on with the study in the bucket
    resumed.setup()
    start(resumed, second)
    report(resumed, second, 0.2, 0.4, 0.6)
    end(resumed, second)
    resumed.on_experiment_end(trials=[first, second])
    assert uploaded() == [("first", "PRUNED", "stopped by ASHA at epoch 1"), ("second", "COMPLETE", "completed")]
