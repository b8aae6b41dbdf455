"""--resume: what a restored trial's results hold (a driver killed while Tune uploaded them).
The real kill -9 and resume: tests/test_s3_storage_sweep.py (from a bucket) and
tests/test_fault_suite.py (from a folder)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def test_resume_of_a_directory_that_is_not_a_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--resume", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "is not a tltune run directory" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("logger, name", [("JsonResults", "result.json"), ("CsvResults", "progress.csv")])
def test_a_restored_trial_takes_its_results_back_only_up_to_its_checkpoint(tmp_path, logger, name):
    """Killed after the trial's results (epochs 1, 2 and a line cut short) reached storage but
    before the state recording its epoch-2 checkpoint did: it goes on from epoch 1's, and its
    restored results end at epoch 1, so epoch 2 is not there twice."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from tltune.raytune import callbacks

    remote, local = tmp_path / "bucket" / "trial", tmp_path / "staging" / "trial"
    remote.mkdir(parents=True)
    if name == "result.json":
        rows = [json.dumps({"training_iteration": i, "val_acc": i / 10}) + "\n" for i in (1, 2)]
        (remote / name).write_text("".join(rows) + '{"training_iteration": 3, "val')
    else:
        rows = ["training_iteration,val_acc\n", "1,0.1\n", "2,0.2\n"]
        (remote / name).write_text("".join(rows) + "3,0.")
    trial = SimpleNamespace(
        local_path=str(local), init_local_path=lambda: local.mkdir(parents=True, exist_ok=True), checkpoint=object(),
        latest_checkpoint_result=SimpleNamespace(metrics={"training_iteration": 1}),
        storage=SimpleNamespace(trial_fs_path=str(remote), storage_filesystem=pafs.LocalFileSystem()),
    )  # fmt: skip
    local.mkdir(parents=True)
    getattr(callbacks, logger)()._restore_from_remote(name, trial)
    assert (local / name).read_text() == "".join(rows[: 2 if name == "progress.csv" else 1])


@pytest.mark.parametrize("name", ["result.json", "progress.csv"])
def test_a_restored_trial_whose_results_storage_lost_rebuilds_them_from_its_checkpoint(tmp_path, name):
    """Killed after the state naming the trial's epoch-3 checkpoint reached storage but before
    its results of epochs 2 and 3 did (the driver uploads file by file): the restored results
    hold epochs 1 to 3 again, 2 and 3 rebuilt from the reports the checkpoint keeps, so that the
    resumed trial's epoch 4 follows them (CI saw ``[3, 4]``)."""
    from types import SimpleNamespace

    import pyarrow.fs as pafs
    from ray import tune

    from tltune.raytune import callbacks
    from tltune.raytune.trainable import read_reported, write_reported

    remote, local, saved = tmp_path / "bucket" / "trial", tmp_path / "staging" / "trial", tmp_path / "checkpoint"
    for directory in (remote, local, saved):
        directory.mkdir(parents=True)
    reported = [{"epoch": i, "val_acc": i / 10} for i in (1, 2, 3)]
    write_reported(str(saved), reported)
    assert read_reported(str(saved)) == reported
    if name == "result.json":
        (remote / name).write_text(json.dumps({"training_iteration": 1, "epoch": 1, "val_acc": 0.1, "trial_id": "t1"}) + "\n")
    else:
        (remote / name).write_text("epoch,val_acc,training_iteration,trial_id\n1,0.1,1,t1\n")
    trial = SimpleNamespace(
        local_path=str(local), trial_id="t1", checkpoint=object(),
        latest_checkpoint_result=SimpleNamespace(
            metrics={**reported[2], "training_iteration": 3, "trial_id": "t1", "config": {"lr": 0.1}},
            checkpoint=tune.Checkpoint.from_directory(str(saved)),
        ),
        storage=SimpleNamespace(trial_fs_path=str(remote), storage_filesystem=pafs.LocalFileSystem()),
    )  # fmt: skip
    logger = callbacks.JsonResults() if name == "result.json" else callbacks.CsvResults()
    logger._restore_from_remote(name, trial)
    text = (local / name).read_text()
    if name == "result.json":
        rows = [json.loads(line) for line in text.splitlines()]
        assert [(r["training_iteration"], r["epoch"], r["val_acc"]) for r in rows] == [(1, 1, 0.1), (2, 2, 0.2), (3, 3, 0.3)]
        assert [r.get("rebuilt_from_checkpoint", False) for r in rows] == [False, True, True]
    else:
        assert text == "epoch,val_acc,training_iteration,trial_id\n1,0.1,1,t1\n2,0.2,2,t1\n3,0.3,3,t1\n"
