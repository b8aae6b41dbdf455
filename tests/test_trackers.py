"""--log-to mlflow wandb: the checks before Ray (a missing extra, an unreachable server, W&B
without a login: one line, exit 2), and one real MNIST sweep logging to both, read back
offline: MLflow from its local store with MlflowClient, W&B from its offline run files."""

import http.server
import importlib.util
import json
import pickle
import socket
import struct
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import TRACKER_ENV, WATCHED_SAMPLES
from tltune import trackers
from tltune.errors import UserError
from tltune.raytune import trackers as logging_to
from tltune.raytune.trackers import end_state, wandb_run_id
from tltune.results import stop_reason



@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No tracker settings of the machine's; an empty netrc; the working directory a temporary one."""
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- before Ray ----------------------------------------------------------------------------


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_missing_extra_is_one_line_naming_it(clean_env, tracker):
    real = importlib.util.find_spec
    clean_env.setattr(importlib.util, "find_spec", lambda name, *args: None if name == tracker else real(name, *args))
    with pytest.raises(UserError) as error:
        trackers.check_trackers(("mlflow", "wandb"))
    assert str(error.value) == f"--log-to {tracker} needs the {tracker} extra: pip install 'tltune[{tracker}]'"


def test_no_tracker_asked_checks_nothing(clean_env):
    clean_env.setattr(importlib.util, "find_spec", lambda name, *args: None)
    trackers.check_trackers(None)
    trackers.check_trackers(())


def test_an_unreachable_mlflow_server_is_a_user_error_within_seconds(clean_env):
    uri = f"http://127.0.0.1:{free_port()}"
    clean_env.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(UserError, match="tracking server .* is not reachable") as error:
        trackers.check_trackers(("mlflow",))
    assert uri in str(error.value) and "\n" not in str(error.value)
    assert time.monotonic() - started < trackers.REACH_TIMEOUT_S


def test_a_server_that_answers_at_all_is_reachable(clean_env):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        clean_env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
        trackers.check_trackers(("mlflow",))  # a 404 from /health is an answer
    finally:
        server.shutdown()


def test_a_silent_host_times_out(clean_env):
    with socket.socket() as listener:  # accepts nothing: connects, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        started = time.monotonic()
        assert trackers.unreachable(f"http://127.0.0.1:{listener.getsockname()[1]}/health", timeout_s=0.5)
        assert time.monotonic() - started < 3


def test_the_mlflow_store_comes_from_the_environment(clean_env, tmp_path, capsys):
    assert trackers.mlflow_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"  # MLflow 3's own default, in the working dir
    clean_env.setenv("MLFLOW_TRACKING_URI", "stores/mlruns")
    assert trackers.mlflow_tracking_uri() == (tmp_path / "stores" / "mlruns").as_uri()  # absolute: a resume may start elsewhere
    clean_env.setenv("MLFLOW_TRACKING_URI", "databricks")
    assert trackers.mlflow_tracking_uri() == "databricks"


def test_a_file_store_mlflow_refuses_is_one_line(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    try:
        trackers.check_trackers(("mlflow",))
    except UserError as error:  # MLflow 3's file store is in maintenance mode
        assert "MLFLOW_ALLOW_FILE_STORE=true" in str(error) and "\n" not in str(error)
    clean_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    trackers.check_trackers(("mlflow",))


def test_wandb_online_needs_a_login(clean_env, tmp_path):
    clean_env.setenv("WANDB_MODE", "online")
    with pytest.raises(UserError, match=r"run `wandb login`.*WANDB_MODE=offline") as error:
        trackers.check_trackers(("wandb",))
    assert "\n" not in str(error.value)
    # `wandb login`'s netrc entry is a login; its server must answer then
    port = free_port()
    (tmp_path / "netrc").write_text(f"machine 127.0.0.1\n  login user\n  password {'k' * 40}\n")
    clean_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError, match=f"W&B server http://127.0.0.1:{port} is not reachable"):
        trackers.check_trackers(("wandb",))


@pytest.mark.parametrize("mode", [{"WANDB_MODE": "offline"}, {"WANDB_MODE": "disabled"}, {"WANDB_DISABLED": "true"}])
def test_wandb_offline_or_disabled_needs_no_login(clean_env, tmp_path, capsys, mode):
    for name, value in mode.items():
        clean_env.setenv(name, value)
    trackers.check_trackers(("wandb",))
    said = capsys.readouterr().out
    assert (f"its run files go to {tmp_path / 'wandb'}" in said) == (trackers.wandb_mode() == "offline")


def test_the_command_stops_before_ray_with_one_line(tmp_path, real_data_root, command, monkeypatch):
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.chdir(tmp_path)
    code, out, err = command("sweep", "mnist", "--quick", "--experiments", "mnist-cnn", "--data-root", str(real_data_root),
                             "--storage-path", str(tmp_path / "results"), "--log-to", "mlflow", "wandb")  # fmt: skip
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1 and "not reachable" in err, err
    assert not (tmp_path / "results").exists()  # no run started


# --- the logging, without Ray ----------------------------------------------------------------


def fake_trial(last: dict, **config) -> SimpleNamespace:
    return SimpleNamespace(last_result=last, config={"epochs": 3, **config})


def test_end_states_read_like_the_report():
    assert end_state(fake_trial({"training_iteration": 3}), failed=False) == "completed"
    assert end_state(fake_trial({"training_iteration": 1}), failed=False) == "stopped by ASHA at epoch 1"
    assert end_state(fake_trial({"training_iteration": 2}, stop_epoch=2), failed=False) == "completed"  # a repeat of a stopped trial
    assert end_state(fake_trial({"training_iteration": 1, "diverged": True}), failed=False) == "diverged"
    assert end_state(fake_trial({}), failed=True) == "error"


def test_tested_runs_cover_best_reference_and_repeats():
    summary = {
        "best_trial": "b1-x", "test_acc": 0.9, "test_loss": 0.3,
        "reference_trial": {"trial": "r1-y", "test_acc": 0.8},
        "repeats": {"seeds": [0, 1], "epochs_spent": 4,
                    "reference": {"trials": ["r1-y", "r2-y"], "test_acc": [0.8, 0.81]},
                    "best": {"trials": ["b1-x", "b2-x"], "test_acc": [0.9, 0.88]}},
    }  # fmt: skip
    runs = logging_to.tested_runs(summary)
    assert runs["b1-x"] == {"roles": ["best"], "test_acc": 0.9, "test_loss": 0.3}
    assert runs["r1-y"] == {"roles": ["reference"], "test_acc": 0.8}
    assert runs["b2-x"] == {"roles": ["best repeat"], "repeat_of": "b1-x", "test_acc": 0.88}
    assert runs["r2-y"]["repeat_of"] == "r1-y"
    same = logging_to.tested_runs({"best_trial": "t-a", "test_acc": 0.7, "reference_trial": {"trial": "t-a", "test_acc": 0.7}})
    assert same == {"t-a": {"roles": ["best", "reference"], "test_acc": 0.7}}
    assert logging_to.tested_runs({"best_trial": None}) == {}


def test_wandb_run_ids_are_valid_and_stable():
    assert wandb_run_id("mnist-cnn", "7ea64961") == "mnist-cnn-7ea64961"
    long = wandb_run_id("a very/long:experiment name " * 4, "ab12c_00003")
    assert len(long) <= 64 and set(long) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
    assert long == wandb_run_id("a very/long:experiment name " * 4, "ab12c_00003")


def callback_trial(trial_id: str, **config) -> SimpleNamespace:
    """What the callbacks read of a Tune trial."""
    return SimpleNamespace(trial_id=trial_id, path=f"/runs/r/exp/{trial_id}-lr1e-3", config={"epochs": 3, "lr": 0.001, **config}, last_result={})


def report(callback, trial, epoch: int) -> None:
    trial.last_result = {"training_iteration": epoch, "epoch": epoch, "val_acc": epoch / 10, "config": trial.config}
    callback.on_trial_result(0, [trial], trial, trial.last_result)


def test_an_interrupted_trial_s_mlflow_run_goes_on_when_the_sweep_resumes(clean_env, tmp_path):
    from mlflow.tracking import MlflowClient

    clean_env.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    clean_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    callback = logging_to.MLflowTrialRuns("exp", "/runs/r/exp", "exp")
    saved = pickle.dumps(callback)  # as the Tuner saves it, before setup
    callback.setup()
    trial = callback_trial("abc12345")
    callback.on_trial_start(0, [trial], trial)
    report(callback, trial, 1)
    callback.on_experiment_end([trial])  # the sweep was interrupted
    client = MlflowClient(f"file:{tmp_path}/mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.data.tags["tltune.end"] == "interrupted at epoch 1" and run.info.status == "KILLED"
    assert run.info.run_name == "abc12345-lr1e-3" and run.data.params == {"epochs": "3", "lr": "0.001"}

    resumed = pickle.loads(saved)  # --resume: Tune unpickles the callbacks
    resumed.setup()
    resumed.on_trial_start(0, [trial], trial)
    for epoch in (2, 3):
        report(resumed, trial, epoch)
    resumed.on_trial_complete(0, [trial], trial)
    pickle.dumps(resumed)  # its client is no part of its state
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])  # the same run, not a second
    assert run.data.tags["tltune.end"] == "completed" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]


def test_a_tracker_that_fails_warns_once_and_never_fails_the_sweep(clean_env, tmp_path, capsys):
    clean_env.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")  # no MLFLOW_ALLOW_FILE_STORE: MLflow 3 refuses it
    callback = logging_to.MLflowTrialRuns("exp", "/runs/r/exp", "exp")
    callback.setup()
    trial = callback_trial("abc12345")
    callback.on_trial_start(0, [trial], trial)
    report(callback, trial, 1)
    callback.on_trial_complete(0, [trial], trial)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) <= 1 and all(w.startswith("warning: --log-to mlflow:") for w in warnings)


def test_an_interrupted_trial_s_wandb_run_is_finished_as_such(clean_env, tmp_path):
    clean_env.setenv("WANDB_MODE", "offline")
    clean_env.setenv("WANDB_DIR", str(tmp_path))
    callback = logging_to.WandbTrialRuns("exp", "/runs/r/exp", "exp")
    pickle.dumps(callback)
    trial = callback_trial("abc12345")
    callback.on_trial_start(0, [trial], trial)
    report(callback, trial, 1)
    callback.on_experiment_end([trial])
    assert not logging_to._WANDB_RUNS.get("/runs/r/exp")  # finished: record_outcome has nothing of it left
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = wandb_run(run_dir)
    assert run.id == "exp-abc12345" and run.config == trial.config and "interrupted" in run.tags
    assert run.summary["tltune/end"] == "interrupted at epoch 1" and [r["val_acc"] for r in run.history] == [0.1]
    assert run.exit_code == 1


# --- one real sweep ----------------------------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file (LevelDB's log format: 32 KiB blocks of
    chunks with 7-byte headers, after W&B's own 7-byte file header); wandb ships no reader."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_run(run_dir: Path) -> SimpleNamespace:
    """A W&B offline run as it would be synced: id, name, group, tags, config, summary, history.
    Read once its exit record is on disk: W&B's service writes the file after ``finish`` returns."""
    run = SimpleNamespace(id=None, name=None, group=None, tags=(), config={}, summary={}, history=[], exit_code=None)

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    (path,) = run_dir.glob("*.wandb")
    deadline = time.monotonic() + 120
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.id, run.name, run.group, run.tags = r.run_id, r.display_name, r.run_group, tuple(r.tags)
            run.config.update({i.key: json.loads(i.value_json) for i in r.config.update if i.key != "_wandb"})
        elif kind == "config":
            run.config.update({i.key: json.loads(i.value_json) for i in record.config.update if i.key != "_wandb"})
        elif kind == "summary":
            run.summary.update({key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            run.history.append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


@pytest.fixture(scope="module")
def tracked(watched_sweep):
    """The session's watched sweep (conftest): 6 trials of up to 3 epochs with ASHA, logged to a
    local MLflow store and to W&B offline; its results read back through tltune.results."""
    return watched_sweep


@pytest.fixture(scope="module")
def mlflow_runs(tracked):
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the store the sweep wrote, read back
        client = MlflowClient(tracking_uri=f"file:{tracked.tmp}/mlruns")
        experiment = client.get_experiment_by_name("mnist-cnn")
        runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
        yield SimpleNamespace(client=client, experiment=experiment, runs=runs)


@pytest.mark.slow  # reads the session's watched sweep, logged to both trackers
def test_mlflow_has_one_run_per_trial_with_its_hyperparameters_and_epochs(tracked, mlflow_runs):
    assert set(mlflow_runs.runs) == set(tracked.trials) and len(tracked.trials) == WATCHED_SAMPLES  # no repeats
    for name, trial in tracked.trials.items():
        run = mlflow_runs.runs[name]
        assert run.data.params == {k: str(v) for k, v in trial.config.items()}
        history = mlflow_runs.client.get_metric_history(run.info.run_id, "val_acc")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (row["training_iteration"], row["val_acc"]) for row in trial.epochs
        ]
        assert run.data.tags["tltune.end"] == stop_reason(trial, tracked.exp)  # how it ended, as the report says
        assert run.data.tags["tltune.experiment"] == "mnist-cnn" and run.data.tags["tltune.trial"] == name
        assert run.info.status == "FINISHED"
    assert {stop_reason(t, tracked.exp).split(" at ")[0] for t in tracked.trials.values()} >= {"completed"}


@pytest.mark.slow  # reads the session's watched sweep, logged to both trackers
def test_mlflow_has_the_test_accuracies_and_the_best_marked(tracked, mlflow_runs):
    summary = tracked.exp.summary
    tested = {summary.best_trial: summary.test_acc, summary.reference_trial["trial"]: summary.reference_trial["test_acc"]}
    for name, run in mlflow_runs.runs.items():
        assert run.data.metrics.get("test_acc") == tested.get(name)
        assert (run.data.tags.get("tltune.best") == "true") == (name == summary.best_trial)
    best = mlflow_runs.runs[summary.best_trial]
    assert "best" in best.data.tags["tltune.role"]
    assert mlflow_runs.experiment.tags["tltune.best_run"] == best.info.run_id
    assert f"MLflow: the runs of mnist-cnn are in file:{tracked.tmp}/mlruns" in tracked.stdout


@pytest.mark.slow  # reads the session's watched sweep, logged to both trackers
def test_wandb_has_one_offline_run_per_trial_with_config_summary_and_best(tracked):
    runs = [wandb_run(d) for d in sorted((tracked.tmp / "wandb").glob("offline-run-*"))]
    assert sorted(r.name for r in runs) == sorted(tracked.trials)  # one run per trial, none twice
    assert len({r.id for r in runs}) == WATCHED_SAMPLES and all(r.group == "mnist-cnn" for r in runs)
    summary = tracked.exp.summary
    for run in runs:
        trial = tracked.trials[run.name]
        assert run.id == wandb_run_id("mnist-cnn", run.name.split("-")[0])
        assert run.config == trial.config
        assert [row["val_acc"] for row in run.history] == [row["val_acc"] for row in trial.epochs]
        assert run.summary["val_acc"] == trial.epochs[-1]["val_acc"]
        reason = stop_reason(trial, tracked.exp)
        assert run.summary["tltune/end"] == reason and reason.split(" at epoch")[0] in run.tags and run.exit_code == 0
        if run.name == summary.best_trial:
            assert run.summary["test_acc"] == summary.test_acc and run.summary["tltune/best"] is True and "best" in run.tags
        elif run.name == summary.reference_trial["trial"]:
            assert run.summary["test_acc"] == summary.reference_trial["test_acc"] and "reference" in run.tags
        else:
            assert "test_acc" not in run.summary and "best" not in run.tags
    assert f"W&B: {WATCHED_SAMPLES} runs of mnist-cnn, offline in {tracked.tmp / 'wandb'}" in tracked.stdout
    assert not list(tracked.tmp.glob("results/*/*/*/wandb"))  # never in the run folder
