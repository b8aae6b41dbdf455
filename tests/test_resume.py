"""kill -9 of a sweep's driver, then --resume: finished trials keep their results, unfinished
ones go on from their checkpoints, every trial appears once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def trial_rows(exp_dir):
    rows = {}
    for result in exp_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        rows[result.parent.name] = lines
    return rows


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path, real_data_root):
    argv = [
        sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--quick", "--experiments", "cifar10-cnn-search",
        "--num-samples", "6", "--train-subset", "1500", "--max-epochs", "4", "--epochs-range", "4", "4",
        "--grace-period", "4", "--max-concurrent-trials", "2",
        "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "killed",
    ]  # fmt: skip
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    exp_dir = tmp_path / "killed" / "cifar10-cnn-search"
    deadline = time.time() + 300
    while time.time() < deadline:  # until one trial has finished and another is part-way
        rows = trial_rows(exp_dir) if exp_dir.exists() else {}
        done = [t for t, r in rows.items() if len(r) == 4]
        partial = [t for t, r in rows.items() if 1 <= len(r) < 4 and list(exp_dir.glob(f"{t}/checkpoint_*"))]
        if done and partial:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the sweep never got part-way")
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)  # let Ray's reaper take down what the driver started
    before = trial_rows(exp_dir)
    assert not (exp_dir / "tltune_best.json").exists()

    resumed = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--quick", "--resume", str(tmp_path / "killed")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    after = trial_rows(exp_dir)
    assert len(after) == 6, "every trial exactly once"
    for trial, rows in after.items():
        epochs = [r["training_iteration"] for r in rows]
        assert epochs == [1, 2, 3, 4], f"{trial}: each epoch once, none repeated after the resume: {epochs}"
        if len(before.get(trial, [])) == 4:
            assert rows == before[trial], "a finished trial keeps its results untouched"
    part_way = [t for t, r in before.items() if 1 <= len(r) < 4]
    assert part_way and all(after[t][: len(before[t])] == before[t] for t in part_way), "unfinished trials continue"
    summary = json.loads((exp_dir / "tltune_best.json").read_text())
    assert summary["trials"] == 6 and "test_acc" in summary


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
