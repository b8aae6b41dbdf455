"""Sweeps whose --storage-path is a bucket on a real S3-compatible server (moto, 127.0.0.1):
every file lands in the bucket, the analysis reads it there, and a killed sweep resumes from it.
A bad storage URI is one line and exit 2 before anything runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from s3server import s3, s3_server  # noqa: F401

from conftest import ROOT, write_slow_spec
from tltune import storage

EXPERIMENT = "cifar10-cnn-search"


def sweep_argv(data_root, storage_path, name, *extra):
    return [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--quick", "--experiments", EXPERIMENT,
            "--data-root", str(data_root), "--storage-path", storage_path, "--name", name, *extra]  # fmt: skip


def trial_rows(exp_dir: str) -> dict[str, list[dict]]:
    rows = {}
    for path in storage.find(exp_dir, "result.json"):
        trial = path.rsplit("/", 2)[-2]
        rows[trial] = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    return rows


def state_came_with_results(exp_dir: str) -> bool:
    """The bucket's newest experiment state came in the upload that brought the newest results.
    Tune uploads both, file by file, at its state saves (10 s apart or more). A kill between the
    results and the state of one upload would leave a state that names none of their checkpoints,
    and the trials would start again."""
    try:
        states = [storage.mtime(storage.join(exp_dir, n)) for n in storage.list_dir(exp_dir) if n.startswith("experiment_state-")]
        results = [storage.mtime(path) for path in storage.find(exp_dir, "result.json")]
    except FileNotFoundError:  # replaced while listed
        return False
    return bool(states and results) and max(states) >= max(results) - 5


@pytest.mark.slow
def test_sweep_to_a_bucket_survives_kill_9_and_is_analysed_there(s3, real_data_root, tmp_path, command):
    """Its model sleeps in each training step (4 s an epoch, 4 trials of 4 epochs, one at a time:
    one trial worker importing torch per run), so the sweep still runs when the bucket shows a
    trial part-way, however fast the machine."""
    run_dir = storage.join(s3.root, "run")
    exp_dir = storage.join(run_dir, "bucketed")
    spec = write_slow_spec(tmp_path / "project", "bucketed", epochs=4, num_samples=4, seconds_per_batch=0.4)
    argv = [sys.executable, "-m", "tltune", "sweep", str(spec), "--train-subset", "600", "--test-subset", "200", "--grace-period", "4",
            "--max-concurrent-trials", "1", "--checkpoint-every", "1", "--data-root", str(real_data_root), "--storage-path", s3.root,
            "--name", "run"]  # fmt: skip
    # A checkpoint every epoch: by default a trial saves to a bucket only while a save costs at
    # most a tenth of its training since the last one, and redoes the epochs after its last.
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # what the bucket holds (Ray uploads every few seconds): a trial part-way
        rows = trial_rows(exp_dir)
        if any(1 <= len(r) < 4 for r in rows.values()) and state_came_with_results(exp_dir):
            break
        assert driver.poll() is None, "the sweep ended before it could be killed"
        time.sleep(1)
    else:
        raise AssertionError("the bucket never showed a sweep part-way")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)
    before = trial_rows(exp_dir)
    assert not storage.exists(storage.join(exp_dir, "tltune_best.json"))

    code, out, err = command("sweep", "--resume", run_dir)  # in this process, as the analysis below
    assert code == 0, out[-3000:] + err[-3000:]
    assert "resuming" in out
    after = trial_rows(exp_dir)
    assert len(after) == 4, "every trial exactly once"
    for trial, rows in after.items():
        assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4], f"{trial}: each epoch once"
        held = before.get(trial, [])
        # the experiment state naming a trial's newest checkpoint may reach the bucket after its
        # results did (Ray uploads it every few seconds): that last epoch is then trained again
        assert rows[: len(held)] == held or rows[: len(held) - 1] == held[:-1], "what the bucket held is kept"
    summary = json.loads(storage.read_text(storage.join(exp_dir, "tltune_best.json")))
    assert summary["trials"] == 4 and "test_acc" in summary
    assert storage.is_file(storage.join(run_dir, "runs.jsonl"))
    assert storage.is_file(storage.join(exp_dir, "tltune_experiment.json"))
    events = [n for trial in after for n in storage.list_dir(storage.join(exp_dir, trial)) if n.startswith("events.out.tfevents")]
    assert len(events) >= 4, "TensorBoard event files of every trial are in the bucket"

    # the analysis in this process (analysis/*.py are these commands; test_sweep_end_to_end runs the scripts)
    code, out, err = command("best", run_dir)
    assert code == 0 and "| MNIST | slownet:build scratch" in out, err
    code, _, err = command("report", s3.root, "--out", str(tmp_path / "report"))
    assert code == 0, err[-3000:]
    assert "bucketed" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize(
    "storage_path, unset, message",
    [
        ("s3://no-such-bucket/runs", (), "bucket 'no-such-bucket' does not exist"),
        ("nosuchfs://bucket/runs", (), "no filesystem for 'nosuchfs://'"),
        ("s3://{bucket}/runs", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), "no AWS credentials"),
    ],
)
def test_a_bad_storage_uri_is_one_line_before_anything_runs(s3, real_data_root, storage_path, unset, message, command, monkeypatch):
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    code, out, err = command(*command_argv(real_data_root, storage_path.format(bucket=s3.bucket), "bad"))
    assert code == 2, out + err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "results:" not in out


def test_an_unreachable_endpoint_is_one_line(s3, real_data_root, command, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    code, _, err = command(*command_argv(real_data_root, f"s3://{s3.bucket}/runs", "x"))
    assert code == 2 and "cannot reach" in err and "Traceback" not in err, err


def command_argv(data_root, storage_path, name):
    """``sweep_argv``'s sweep as ``tltune`` arguments, for a check that ends before Ray (in this process)."""
    return ["sweep", "cifar10", *sweep_argv(data_root, storage_path, name)[2:]]


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
