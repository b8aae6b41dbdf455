"""tltune.storage on local disk and on a real S3-compatible server (moto on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from s3server import free_port, s3, s3_server  # noqa: F401  (fixtures)
from tltune import storage
from tltune.errors import UserError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh directory: a local path, or a prefix in the moto bucket."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3").root


def one_line_error(path: str) -> str:
    with pytest.raises(UserError) as info:
        storage.check_writable(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- paths ------------------------------------------------------------------------------


def test_is_uri_and_join():
    assert storage.is_uri("s3://b/p") and storage.is_uri("gs://b") and storage.is_uri("file:///tmp")
    assert not storage.is_uri("results/x") and not storage.is_uri("/abs") and not storage.is_uri("C:\\runs")
    assert storage.join("s3://b/p/", "/run/", "exp") == "s3://b/p/run/exp"
    assert storage.join("s3://b", "run") == "s3://b/run"
    assert storage.join("s3://b/p?endpoint_override=http://h:1&scheme=http", "run") == "s3://b/p/run?endpoint_override=http://h:1&scheme=http"
    assert storage.join("/tmp/x/", "a", "", "b/") == "/tmp/x/a/b"
    assert storage.join("rel", "a") == "rel/a" and storage.join("/", "a") == "/a"
    assert storage.join("s3://b/p") == "s3://b/p"


def test_absolute_and_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.absolute("~/runs") == str(tmp_path / "runs")
    assert storage.absolute("s3://b/p") == "s3://b/p"
    fs, path = storage.resolve("~/runs")
    assert fs.type_name == "local" and path == str(tmp_path / "runs")
    fs, path = storage.resolve(f"file://{tmp_path}/x")
    assert fs.type_name == "local" and path == f"{tmp_path}/x"


def test_unknown_scheme_is_a_user_error():
    with pytest.raises(UserError, match="foo://"):
        storage.resolve("foo://x/y")
    assert "foo://" in one_line_error("foo://x/y")


def test_bad_uri_option_is_a_user_error(s3):  # s3: pyarrow's S3 set-up may otherwise ask EC2 metadata for a region
    with pytest.raises(UserError, match="bogus"):
        storage.resolve(f"s3://{s3.bucket}/x?bogus=1")


# -- file operations, local and S3 -----------------------------------------------------


def test_write_read_list_exists(root, tmp_path):
    run = storage.join(root, "run")
    assert not storage.exists(run) and storage.list_dir(run) == []
    storage.write_text(storage.join(run, "exp", "a.json"), '{"a": 1}')
    storage.write_text(storage.join(run, "exp", "a.json"), '{"a": 2}')  # replaced whole
    storage.write_text(storage.join(run, "top.txt"), "héllo\n")
    assert storage.read_text(storage.join(run, "exp", "a.json")) == '{"a": 2}'
    assert storage.read_text(storage.join(run, "top.txt")) == "héllo\n"
    assert storage.list_dir(run) == ["exp", "top.txt"]
    assert storage.list_dir(storage.join(run, "exp")) == ["a.json"]  # no temporary files left
    assert storage.exists(run) and storage.is_dir(run) and not storage.is_file(run)
    assert storage.is_file(storage.join(run, "top.txt")) and not storage.is_dir(storage.join(run, "top.txt"))
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(run, "missing.txt"))
    now = time.time()
    assert abs(storage.mtime(storage.join(run, "top.txt")) - now) < 60
    assert abs(storage.mtime(storage.join(run, "exp")) - now) < 60
    with pytest.raises(FileNotFoundError):
        storage.mtime(storage.join(run, "missing.txt"))


def test_append_line(root):
    runs = storage.join(root, "run", "runs.jsonl")
    storage.append_line(runs, '{"n": 1}')
    storage.append_line(runs, '{"n": 2}\n')
    assert storage.read_text(runs) == '{"n": 1}\n{"n": 2}\n'


def test_download_and_move(root, tmp_path):
    ckpt = storage.join(root, "exp", "checkpoint_000001")
    storage.write_text(storage.join(ckpt, "model.pt"), "weights")
    storage.write_text(storage.join(ckpt, "sub", "state.json"), "{}")
    local = storage.download(ckpt, tmp_path / "dl")
    assert (local / "model.pt").read_text() == "weights" and (local / "sub" / "state.json").read_text() == "{}"
    if not storage.is_uri(root):
        assert local == Path(ckpt)  # local: no copy
    one = storage.download(storage.join(ckpt, "model.pt"), tmp_path / "dl-file")
    assert one.name == "model.pt" and one.read_text() == "weights"
    with pytest.raises(FileNotFoundError):
        storage.download(storage.join(root, "nothing"), tmp_path / "dl-none")

    aside = storage.join(root, "exp.interrupted")
    storage.move(storage.join(root, "exp"), aside)
    assert not storage.exists(storage.join(root, "exp"))
    assert storage.read_text(storage.join(aside, "checkpoint_000001", "sub", "state.json")) == "{}"
    storage.move(storage.join(aside, "checkpoint_000001", "model.pt"), storage.join(root, "model.pt"))
    assert storage.read_text(storage.join(root, "model.pt")) == "weights"
    with pytest.raises(FileExistsError):
        storage.move(aside, storage.join(root, "model.pt"))


def test_s3_uri_query_form_without_env(s3, monkeypatch):
    """The endpoint in the URI itself (pyarrow's query options) instead of AWS_ENDPOINT_URL."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    uri = f"s3://{s3.bucket}/{s3.root.rsplit('/', 1)[1]}?endpoint_override={s3.endpoint}&scheme=http"
    storage.check_writable(uri)
    storage.write_text(storage.join(uri, "a.txt"), "via query")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert storage.read_text(storage.join(s3.root, "a.txt")) == "via query"


# -- check_writable --------------------------------------------------------------------


def test_check_writable_passes_and_leaves_nothing(root):
    run = storage.join(root, "new", "run")
    storage.check_writable(run)
    assert not storage.exists(run)
    storage.write_text(storage.join(run, "x"), "1")
    storage.check_writable(run)
    assert storage.list_dir(run) == ["x"]


def test_check_writable_local_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert "is a file" in one_line_error(str(tmp_path / "file"))
    assert "is a file" in one_line_error(str(tmp_path / "file" / "run"))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_check_writable_local_cannot_create():
    assert "not writable" in one_line_error("/proc/tltune-nowhere/run")  # even root cannot mkdir there


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes anywhere")
def test_check_writable_local_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert "not writable" in one_line_error(str(ro / "run"))


def test_missing_bucket(s3):
    message = one_line_error("s3://nosuchbucket/x")
    assert "bucket 'nosuchbucket' does not exist" in message and s3.endpoint in message


def test_missing_credentials(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    # moto accepts unsigned requests: were the check to go ahead without keys, it would pass
    started = time.monotonic()
    assert "no AWS credentials" in one_line_error(s3.root)
    assert time.monotonic() - started < 2


def test_wrong_credentials(s3, monkeypatch):
    with s3.server.require_auth() as (key_id, secret):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        storage.check_writable(s3.root)  # the server checks signatures: right keys pass
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + secret)
        assert "access denied" in one_line_error(s3.root)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
        assert "access denied" in one_line_error(s3.root)


def test_endpoint_closed_port(s3, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    started = time.monotonic()
    message = one_line_error(s3.root)
    assert "cannot reach" in message and endpoint in message
    assert time.monotonic() - started < 3


def test_endpoint_that_never_answers(s3, monkeypatch):
    """Accepts connections, never replies: the probe's request timeout ends it."""
    monkeypatch.setattr(storage, "_PROBE_REQUEST_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        assert "cannot reach" in one_line_error(s3.root)
        assert time.monotonic() - started < 5


def test_deadline_for_any_scheme(monkeypatch):
    """Whatever the filesystem, the whole check gives up after the deadline."""
    monkeypatch.setattr(storage, "_PROBE_DEADLINE_S", 0.5)
    monkeypatch.setattr(storage, "_resolve_for_probe", lambda path: time.sleep(5))
    started = time.monotonic()
    assert "no answer within" in one_line_error("gs://bucket/x")
    assert time.monotonic() - started < 2


def test_cli_prints_one_line(s3, tmp_path):
    """check_writable's error, through a fresh interpreter, is one line on stderr."""
    code = ("import sys\nfrom tltune import storage\nfrom tltune.errors import UserError\n"
            "try:\n    storage.check_writable(sys.argv[1])\nexcept UserError as e:\n    print(f'error: {e}', file=sys.stderr); sys.exit(2)\n")
    out = subprocess.run([sys.executable, "-c", code, "s3://nosuchbucket/x"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "does not exist" in out.stderr


# -- Ray Tune writes to the same place -------------------------------------------------


@pytest.mark.slow  # a Ray of its own; the slow suite also sweeps to S3 (tests/test_s3_storage_sweep.py)
def test_ray_tune_writes_to_s3(s3):
    """Ray is handed the same storage_path string and reaches the moto server through the
    same environment (its local workers inherit it)."""
    ray = pytest.importorskip("ray")
    from ray import tune

    storage.check_writable(s3.root)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            lambda config: tune.report({"x": 1}),
            run_config=tune.RunConfig(storage_path=s3.root, name="t"),
        )
        results = tuner.fit()
        assert results.errors == [] and results[0].metrics["x"] == 1
    finally:
        ray.shutdown()
    entries = storage.list_dir(storage.join(s3.root, "t"))
    assert any(e.startswith("experiment_state") for e in entries), entries
    assert "tuner.pkl" in entries, entries
    trials = [e for e in entries if storage.is_dir(storage.join(s3.root, "t", e))]
    assert trials and storage.is_file(storage.join(s3.root, "t", trials[0], "result.json")), entries


# -- reading runs ----------------------------------------------------------------------


def write_run(run_dir: str, experiment: str = "mnist-cnn") -> None:
    """A finished run in the layout a sweep writes: record, summary, two trials, a checkpoint."""
    import io
    import json

    import torch

    exp_dir = storage.join(run_dir, experiment)
    record = {"name": experiment, "dataset": "mnist", "model": "cnn", "mode": "scratch", "label": "CNN", "reference_accuracy": 98.0}
    storage.write_text(storage.join(exp_dir, "tltune_experiment.json"), json.dumps(record))
    for trial, lr, acc in (("t1", 1e-3, 0.9), ("t2", 1e-2, 0.5)):
        config = {"lr": lr, "epochs": 1, "activation": "tanh", "optimizer": "adam"}
        storage.write_text(storage.join(exp_dir, trial, "params.json"), json.dumps(config))
        storage.write_text(storage.join(exp_dir, trial, "result.json"), json.dumps({"training_iteration": 1, "val_acc": acc}) + "\n")
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "optimizer": {}, "epoch": 1}, buffer)
    fs, path = storage.resolve(storage.join(exp_dir, "t1", "checkpoint_000000", "model.pt"))
    if storage.is_uri(run_dir):
        with fs.open_output_stream(path) as f:
            f.write(buffer.getvalue())
    else:
        Path(path).parent.mkdir(parents=True)
        Path(path).write_bytes(buffer.getvalue())


def test_runs_are_read_where_they_are(root):
    """What --warm-start, --source-run and the analysis read, from a local folder or a bucket."""
    from tltune.report import collect
    from tltune.results import best_checkpoint, load_run, table_rows, top_configs
    from tltune.train import load_model_state

    run_dir = storage.join(root, "run")
    write_run(run_dir)
    [experiment] = load_run(run_dir)
    assert [t.name for t in experiment.trials] == ["t1", "t2"] and table_rows([experiment])[0]["val_acc"] == 90.0
    assert [c["lr"] for c in top_configs(run_dir, "mnist-cnn")] == [1e-3, 1e-2]
    config, checkpoint = best_checkpoint(run_dir, "mnist-cnn")
    assert config["lr"] == 1e-3 and isinstance(checkpoint, Path) and checkpoint.is_dir(), "a local directory, downloaded if need be"
    assert load_model_state(checkpoint)["w"].tolist() == [1.0, 1.0]
    assert set(collect([root])) == {"mnist-cnn"}


# -- paths derived from a URI keep its query; credentials stay out of URIs (issue 20, item 3) --


def test_parent_name_and_walk_keep_a_uris_query(root):
    q = "?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.parent(f"s3://b/run/exp{q}") == f"s3://b/run{q}" and storage.name(f"s3://b/run/exp{q}") == "exp"
    assert storage.parent("s3://b/run/exp/") == "s3://b/run" and storage.parent("s3://b") == "s3://b"
    assert storage.parent("s3://b/r?endpoint_override=http://h:1/&scheme=http") == "s3://b?endpoint_override=http://h:1/&scheme=http"
    assert storage.parent("/tmp/x/y") == "/tmp/x" and storage.parent("file:///tmp/x") == "file:///tmp"
    assert storage.split_query(f"s3://b/x{q}") == ("s3://b/x", q) and storage.split_query("/a?b") == ("/a?b", "")
    storage.write_text(storage.join(root, "run", "exp", "t1", "error.pkl"), "x")
    storage.write_text(storage.join(root, "run", "exp", "tuner.pkl"), "x")
    assert storage.walk(storage.join(root, "run")) == ["exp/t1/error.pkl", "exp/tuner.pkl"]
    assert storage.walk(storage.join(root, "missing")) == []


def test_runs_are_read_from_a_bucket_named_by_query_options(s3, monkeypatch, tmp_path):
    """Only the URI's query names the server (no AWS_ENDPOINT_URL): every read after the sweep
    (the run's experiments, their trials, checkpoints, the report's collection) goes there too."""
    from tltune.report import collect_runs
    from tltune.results import best_checkpoint, load_run, top_configs

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    root = f"{s3.root}?endpoint_override={s3.endpoint.removeprefix('http://')}&scheme=http"
    run_dir = storage.join(root, "run")
    write_run(run_dir)
    [experiment] = load_run(run_dir)
    assert experiment.path == storage.join(run_dir, "mnist-cnn") and [t.name for t in experiment.trials] == ["t1", "t2"]
    assert [c["lr"] for c in top_configs(run_dir, "mnist-cnn")] == [1e-3, 1e-2]
    config, checkpoint = best_checkpoint(run_dir, "mnist-cnn")
    assert config["lr"] == 1e-3 and checkpoint.is_dir()
    runs = collect_runs([root])
    assert list(runs) == [run_dir] and set(runs[run_dir]) == {"mnist-cnn"}


@pytest.mark.parametrize("uri", ["s3://AKIAEXAMPLE:not-a-real-secret@bucket/runs", "s3://AKIAEXAMPLE@bucket/runs?region=us-east-1"])
def test_credentials_in_a_uri_are_refused(uri):
    message = one_line_error(uri)
    assert "credentials in the URI are refused" in message and "not-a-real-secret" not in message and "AKIAEXAMPLE" not in message
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message
    for call in (storage.absolute, storage.resolve, storage.list_dir):
        with pytest.raises(UserError, match="credentials in the URI are refused"):
            call(uri)


def test_keep_credentials_out_of_ray():
    from ray.tune.execution import class_cache

    storage.keep_credentials_out_of_ray()
    assert not storage.SECRET_ENV_VARS & class_cache.ENV_VARS_TO_PROPAGATE
    assert "RAY_CHDIR_TO_TRIAL_DIR" in class_cache.ENV_VARS_TO_PROPAGATE, "what is no secret is still propagated"
