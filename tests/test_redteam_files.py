"""Red-team findings on the files of a run (issue 20, items 1 and 3).

1. Nothing in a run folder runs code: a pickle planted where Ray reads one, at any depth
   (a failed trial's ``error.pkl`` above all), is refused before Ray sees the folder, and a
   trial error Ray pickled itself is signed as it is written, so a failed run still reads back.
2. Credentials never leave the environment: a URI with credentials is refused in one line
   that does not repeat the secret, the secret never reaches Ray's runtime environments
   (whose agent logs them), and a URI's query options (``endpoint_override``...) are kept on
   every path derived from it, so a run in such a bucket reads back after the sweep
   (the real sweep in such a bucket: tests/test_s3_storage_sweep.py).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from tltune import storage, trust
from tltune.errors import UserError


class Planted:
    """A pickle that creates a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- 1. a failed trial's error.pkl -------------------------------------------------------


@dataclasses.dataclass
class SimpleRun:
    run_dir: Path
    exp_dir: Path
    error_pkl: str  # relative to exp_dir


@pytest.fixture
def failed_copy(failed_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(failed_run.run_dir, copy)
    return SimpleRun(copy, copy / failed_run.exp_dir.name, failed_run.error_pkl)


@pytest.mark.slow  # a real sweep with failing trials
def test_the_error_ray_pickled_is_signed_as_it_is_written(failed_copy):
    import tltune

    assert failed_copy.error_pkl in trust.signed_state_files(str(failed_copy.exp_dir), purpose="read")
    grid = tltune.load(failed_copy.run_dir)["mnist-cnn"].result_grid()
    assert grid.num_errors == 1 and "must be at least 4" in str(grid[0].error)


@pytest.mark.slow  # a real sweep with failing trials
def test_a_planted_error_pickle_never_runs(failed_copy, tmp_path):
    import tltune

    marker = tmp_path / "pwned"
    (failed_copy.exp_dir / failed_copy.error_pkl).write_bytes(pickle.dumps(Planted(marker)))
    experiment = tltune.load(failed_copy.run_dir)["mnist-cnn"]  # the JSON records still read
    with pytest.raises(UserError) as refused:
        experiment.result_grid()
    message = str(refused.value)
    assert failed_copy.error_pkl in message and "not a file tltune wrote" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.slow  # a real sweep with failing trials
def test_an_error_pickle_replaced_during_the_sweep_is_not_unpickled(tmp_path):
    """The ResultGrid ``fit`` returns reads a failed trial's error.pkl back from storage: a
    copy replaced there meanwhile is not unpickled (Ray's text of the error is used)."""
    from types import SimpleNamespace

    from ray.tune.experiment.trial import Trial

    from tltune.raytune.sweep import signing_saved_state

    marker = tmp_path / "pwned"
    trial_dir = tmp_path / "exp" / "trial"
    trial_dir.mkdir(parents=True)
    (trial_dir / "error.pkl").write_bytes(pickle.dumps(Planted(marker)))
    trial = SimpleNamespace(run_metadata=SimpleNamespace(pickled_error_filename="error.pkl"),
                            storage=SimpleNamespace(storage_filesystem=storage.resolve(str(trial_dir))[0], trial_fs_path=str(trial_dir)))  # fmt: skip
    with signing_saved_state(str(tmp_path / "exp")):
        assert Trial.get_pickled_error(trial) is None
    assert not marker.exists()


# -- 2. credentials ----------------------------------------------------------------------

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("uri", [
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs",
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs?endpoint_override=127.0.0.1:9&scheme=http",
    f"gs://someone:{SECRET}@bucket/runs",
    f"https://user:{SECRET}@host/runs",
])  # fmt: skip
def test_credentials_in_a_uri_are_refused_without_repeating_them(uri, tmp_path):
    for call in (storage.absolute, storage.check_writable, storage.resolve, storage.exists):
        with pytest.raises(UserError) as refused:
            call(uri)
        message = str(refused.value)
        assert "credentials in the URI are refused" in message and SECRET not in message and "\n" not in message
    assert "AWS_SECRET_ACCESS_KEY" in str(refused.value) or not uri.startswith("s3")


def test_an_hdfs_user_name_is_no_secret():
    assert storage.absolute("hdfs://alice@namenode:8020/runs") == "hdfs://alice@namenode:8020/runs"


@pytest.mark.parametrize("command_name", ["sweep", "best", "report", "resume"])
def test_the_command_line_refuses_credentials_in_one_line(command_name, tmp_path, command, monkeypatch):
    uri = f"s3://AKIAEXAMPLE:{SECRET}@bucket/runs"
    argv = {
        "sweep": ["sweep", "mnist", "--quick", "--storage-path", uri],
        "best": ["best", uri],
        "report": ["report", uri, "--out", str(tmp_path / "report")],
        "resume": ["sweep", "mnist", "--resume", uri + "/run"],
    }[command_name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, out, err = command(*argv)
    assert code == 2, out + err
    assert SECRET not in out + err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "credentials in the URI are refused" in err and "results:" not in out


def test_ray_tune_puts_no_secret_in_a_trial_runtime_env(monkeypatch):
    from ray.tune.execution.class_cache import _ActorClassCache

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET + "-token")
    storage.keep_credentials_out_of_ray()
    storage.keep_credentials_out_of_ray()  # twice: nothing more

    class Trainable:
        pass

    remote = _ActorClassCache().get(Trainable)
    runtime_env = json.dumps(remote._default_options.get("runtime_env") or {})
    assert SECRET not in runtime_env and "AKIAEXAMPLE" not in runtime_env


def test_connect_keeps_secrets_out_of_ray():
    """cluster.connect (every sweep) makes the call: checked in its source, no Ray started."""
    import inspect

    from tltune.raytune import cluster

    assert "keep_credentials_out_of_ray()" in inspect.getsource(cluster.connect)


