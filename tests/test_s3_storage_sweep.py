"""Sweeps whose --storage-path is a bucket on a real S3-compatible server (moto, 127.0.0.1):
every file lands in the bucket, the analysis reads it there, and a killed sweep resumes from it.
A bad storage URI is one line and exit 2 before anything runs."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from ray.tune.utils.serialization import TuneFunctionDecoder
from s3server import s3, s3_server  # noqa: F401

from conftest import ROOT, write_slow_spec
from tltune import storage

EXPERIMENT = "cifar10-cnn-search"
EPOCHS = 5


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


def state_checkpoints(exp_dir: str) -> dict[str, int]:
    """The epoch of each trial's newest checkpoint as the bucket's newest experiment state records
    it (trials without one are left out): where a resume goes on from. Within the state, the last
    result may already name a checkpoint the checkpoint manager has not registered yet (Tune
    saves it in a later step): the manager's is the one a resume restores."""
    try:
        states = sorted(n for n in storage.list_dir(exp_dir) if n.startswith("experiment_state-"))  # named by the time they were saved
        trials = json.loads(storage.read_text(storage.join(exp_dir, states[-1])))["trial_data"] if states else []
    except (FileNotFoundError, ValueError):  # not there yet, or being replaced
        return {}
    named = {}
    for trial_json, runtime_json in trials:
        manager = TuneFunctionDecoder(allow_cloudpickle=True).decode(runtime_json)["checkpoint_manager"]  # this test's own run
        if manager.latest_checkpoint_result is not None:
            named[json.loads(trial_json)["relative_logdir"]] = manager.latest_checkpoint_result.metrics["training_iteration"]
    return named


def all_text_under(root: Path) -> str:
    chunks = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                chunks.append(path.read_bytes().decode("utf-8", "replace"))
            except OSError:  # removed meanwhile (Ray cleaning up its session)
                continue
    return "\n".join(chunks)


@pytest.mark.slow
def test_a_sweep_to_a_bucket_survives_kill_9_resumes_there_and_leaks_no_secret(s3, real_data_root, tmp_path, command, monkeypatch):
    """kill -9 of the driver while the bucket's saved state names one trial finished and another
    part-way, then --resume from the bucket: finished trials keep their results, unfinished ones
    go on from their checkpoints, every trial and epoch appears once, and results the bucket lost
    (a driver killed mid-upload) are rebuilt from the checkpoint the resume goes on from. Then
    `best`, `report` and ``tltune.load`` read the run there. The server is named only in the URI's
    query (no AWS_ENDPOINT_URL), the secret only in the environment, where it belongs: it is
    nowhere in the bucket, the output, or Ray's session logs.

    Its model sleeps in each training step (4 s an epoch, 4 trials of 5 epochs, one at a time: one
    trial worker importing torch per run), so the sweep still runs when the state shows a trial
    part-way, however fast the machine."""
    secret = f"tltune-secret-{uuid.uuid4().hex}"
    root = f"{s3.root}?endpoint_override={s3.endpoint.removeprefix('http://')}&scheme=http"
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # for this process and every command it starts: only the URI names the server
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    run_dir = storage.join(root, "run")
    exp_dir = storage.join(run_dir, "bucketed")
    spec = write_slow_spec(tmp_path / "project", "bucketed", epochs=EPOCHS, num_samples=4, seconds_per_batch=0.4)
    argv = [sys.executable, "-m", "tltune", "sweep", str(spec), "--train-subset", "600", "--test-subset", "200", "--grace-period", str(EPOCHS),
            "--max-concurrent-trials", "1", "--checkpoint-every", "1", "--data-root", str(real_data_root), "--storage-path", root,
            "--name", "run"]  # fmt: skip
    # A checkpoint every epoch: by default a trial saves to a bucket only while a save costs at
    # most a tenth of its training since the last one, and redoes the epochs after its last.
    killed_output = tmp_path / "killed.out"
    with killed_output.open("w") as out:
        driver = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # until the bucket's state names one trial finished and another's checkpoint part-way
        epochs = state_checkpoints(exp_dir).values()
        if EPOCHS in epochs and any(2 <= epoch < EPOCHS for epoch in epochs) and state_came_with_results(exp_dir):
            break
        assert driver.poll() is None, "the sweep ended before it got part-way"
        time.sleep(1)
    else:
        raise AssertionError("the bucket never showed a sweep part-way")
    time.sleep(2)  # the upload that brought this state, if still going, is whole (the next comes 10 s or more later)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)
    named = state_checkpoints(exp_dir)
    # the bucket lost a part-way trial's results after its first epoch: the resume rebuilds them
    lost = max((t for t, epoch in named.items() if 2 <= epoch < EPOCHS), key=named.get)
    result = storage.join(exp_dir, lost, "result.json")
    storage.write_text(result, storage.read_text(result).splitlines(keepends=True)[0])
    before = trial_rows(exp_dir)
    assert not storage.exists(storage.join(exp_dir, "tltune_best.json"))

    code, out, err = command("sweep", "--resume", run_dir)  # in this process, as the analysis below
    assert code == 0, out[-3000:] + err[-3000:]
    assert "resuming" in out
    printed = killed_output.read_text() + out + err
    after = trial_rows(exp_dir)
    assert len(after) == 4, "every trial exactly once"
    for trial, rows in after.items():
        epochs = [r["training_iteration"] for r in rows]
        assert epochs == list(range(1, EPOCHS + 1)), f"{trial}: each epoch once, none repeated after the resume: {epochs}"
        if named.get(trial) == EPOCHS:
            assert rows == before[trial], "a finished trial keeps its results untouched"
    rebuilt = [r["training_iteration"] for r in after[lost] if r.get("rebuilt_from_checkpoint")]
    print(f"lost the results of {lost} after epoch 1; rebuilt: {rebuilt}; the state named the checkpoints of epochs {named}")
    assert rebuilt == list(range(2, named[lost] + 1)), "the epochs between what the bucket kept and the checkpoint the state names"
    part_way = {t: epoch for t, epoch in named.items() if 1 <= epoch < EPOCHS}
    kept = lambda t: min(part_way[t], len(before[t]))  # noqa: E731  (the lost trial's rows 2.. were rebuilt)
    # results newer than the state's checkpoint are trained again: only those up to it are kept
    assert all(after[t][: kept(t)] == before[t][: kept(t)] for t in part_way), "unfinished trials continue from their checkpoints"
    summary = json.loads(storage.read_text(storage.join(exp_dir, "tltune_best.json")))
    assert summary["trials"] == 4 and "test_acc" in summary
    assert storage.is_file(storage.join(exp_dir, "tltune_experiment.json"))
    events = [n for trial in after for n in storage.list_dir(storage.join(exp_dir, trial)) if n.startswith("events.out.tfevents")]
    assert len(events) >= 4, "TensorBoard event files of every trial are in the bucket"

    # the analysis, as a user runs it (test_sweep_end_to_end runs analysis/*.py, which are these commands)
    best = subprocess.run([sys.executable, "-m", "tltune", "best", run_dir], capture_output=True, text=True, timeout=120)
    assert best.returncode == 0 and "damaged" not in best.stderr, best.stdout + best.stderr
    assert "| MNIST | slownet:build scratch" in best.stdout, best.stdout
    report = subprocess.run([sys.executable, "-m", "tltune", "report", root, "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert report.returncode == 0 and "damaged" not in report.stderr, report.stdout + report.stderr[-3000:]
    assert "bucketed" in (tmp_path / "report" / "report.md").read_text()
    printed += best.stdout + best.stderr + report.stdout + report.stderr
    import tltune

    experiment = tltune.load(run_dir)["bucketed"]
    assert experiment.status == "finished" and experiment.path == exp_dir

    files = storage.walk(root)
    assert any(f.endswith("runs.jsonl") for f in files) and any(f.endswith("tuner.pkl") for f in files)
    for rel in files:
        assert secret.encode() not in storage.read_bytes(storage.join(root, rel)), f"{rel} holds the secret"
    assert secret not in printed
    logs = all_text_under(Path(ray_tmp))
    assert "runtime_env" in logs, "Ray's session logs are where they were looked for"
    assert secret not in logs, "a Ray log holds AWS_SECRET_ACCESS_KEY"


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
