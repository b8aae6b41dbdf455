"""A full disk loses nothing: the sweep stops with one line and a non-zero exit, every file in
the run directory is whole (Tune's state is the one tltune last signed), and once there is
space --resume finishes the run, every trial once. The real case runs on a 12 MB tmpfs
(slow, root); the pieces that make it so run here without Ray."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tltune import storage, trust
from tltune.errors import is_storage_full
from tltune.raytune.full_storage import FullStorageWatch, upload_whole


def enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_known_however_it_is_wrapped():
    class RayTaskError(Exception):  # Ray's task errors hold the trial's error as .cause
        def __init__(self, cause):
            super().__init__("ray::ImplicitFunc.train()")
            self.cause = cause

    assert is_storage_full(enospc()) and is_storage_full(RayTaskError(enospc()))
    assert is_storage_full(OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"))  # pyarrow's
    try:
        try:
            raise enospc()
        except OSError as exc:
            raise RuntimeError("saving failed") from exc
    except RuntimeError as wrapped:
        assert is_storage_full(wrapped)
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied")) and not is_storage_full(None)


def test_an_upload_that_hits_a_full_disk_leaves_the_last_whole_copy(tmp_path, monkeypatch):
    staging, run = tmp_path / "staging", tmp_path / "run"
    (staging / "trial").mkdir(parents=True)
    (staging / "experiment_state-1.json").write_text('{"version": 2}')
    (staging / "trial" / "result.json").write_text('{"epoch": 2}\n')
    watch = FullStorageWatch()
    upload_whole(str(staging), pafs.LocalFileSystem(), str(run), ray_upload=None, watch=watch)
    assert (run / "trial" / "result.json").read_text() == '{"epoch": 2}\n' and watch.first is None

    (staging / "experiment_state-1.json").write_text('{"version": 3, "trials": ["a long state that does not fit"]}')
    copy = shutil.copyfile

    def fills_the_disk(source, target):
        Path(target).write_bytes(Path(source).read_bytes()[:7])  # what a full disk leaves: a cut copy
        raise enospc()

    monkeypatch.setattr(shutil, "copyfile", fills_the_disk)
    upload_whole(str(staging), pafs.LocalFileSystem(), str(run), ray_upload=None, watch=watch)  # noted, not raised
    monkeypatch.setattr(shutil, "copyfile", copy)
    assert json.loads((run / "experiment_state-1.json").read_text()) == {"version": 2}, "the last whole copy stays"
    assert sorted(p.name for p in run.iterdir()) == ["experiment_state-1.json", "trial"], "no temporary file left"
    assert "No space left" in watch.first


def test_after_a_full_disk_rays_follow_up_warnings_stay_quiet():
    """The sweep ends with its one line: Tune's "Trials did not complete" and the analysis's
    "Failed to fetch metrics" for trials whose results never reached the disk are dropped."""
    import logging

    watch = FullStorageWatch()

    def record(name, message, exc=None):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, (type(exc), exc, None) if exc else None)

    analysis = record("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics for 2 trial(s)")
    assert watch.filter(analysis), "kept while storage has room"
    assert not watch.filter(record("ray.tune.execution.tune_controller", "Trial errored", enospc()))
    assert not watch.filter(analysis) and not watch.filter(record("ray.tune.tune", "Trials did not complete"))
    assert watch.filter(record("ray.tune.execution.tune_controller", "Trial errored", ValueError("nan")))


def test_a_line_after_a_cut_append_is_whole(tmp_path):
    """A signature appended after one a full disk cut short still counts (and so do the others)."""
    signatures = tmp_path / trust.SIGNATURES_FILE
    signatures.write_text('{"file": "a.json", "hmac": "aaa"}\n{"file": "b.json", "hm')
    storage.append_line(str(signatures), json.dumps({"file": "c.json", "hmac": "ccc"}))
    assert trust.known_signatures(str(tmp_path)) == {"aaa", "ccc"}


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB tmpfs (a CNN checkpoint with Adam's state is 5 MB), made larger by ``grow()``."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {mount.stderr.strip()}")
    try:
        yield disk, lambda: subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.slow
def test_a_sweep_on_a_full_disk_stops_with_one_line_and_resumes_when_there_is_space(small_disk, real_data_root, tmp_path, command):
    disk, grow = small_disk
    sweep = [sys.executable, "-m", "tltune", "sweep", "mnist"]
    first = subprocess.run(
        [*sweep, "--quick", "--experiments", "mnist-cnn", "--num-samples", "4", "--max-epochs", "3", "--epochs-range", "3", "3",
         "--grace-period", "3", "--max-concurrent-trials", "1", "--train-subset", "2000", "--data-root", str(real_data_root),
         "--storage-path", str(disk), "--name", "full"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    run, exp_dir = disk / "full", disk / "full" / "mnist-cnn"
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    errors = [line for line in first.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"error: no space left where the run is stored ({exp_dir}): the sweep stopped and kept the state it last saved whole; "
                      f"free some space, then continue with --resume {run}"], first.stderr[-4000:]  # fmt: skip
    for state in exp_dir.glob("experiment_state-*.json"):
        json.loads(state.read_text())  # whole
    trust.signed_state_files(str(exp_dir))  # and the one tltune signed: raises otherwise
    assert not (exp_dir / "tltune_best.json").exists(), "not finished"

    grow()
    code, out, err = command("sweep", "--resume", str(run))  # in this process: what it prints is not the point here
    assert code == 0, out[-3000:] + err[-3000:]
    epochs = {}
    for result in exp_dir.glob("*/result.json"):
        epochs[result.parent.name] = [json.loads(line)["training_iteration"] for line in result.read_text().splitlines() if line.strip()]
    assert len(epochs) == 4 and all(seen == [1, 2, 3] for seen in epochs.values()), epochs
    summary = json.loads((exp_dir / "tltune_best.json").read_text())
    assert summary["trials"] == 4 and summary["errored_trials"] == 0, summary
