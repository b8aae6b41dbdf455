"""kill -9 of a sweep's driver, then --resume: finished trials keep their results, unfinished
ones go on from their checkpoints, every trial appears once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from ray.tune.utils.serialization import TuneFunctionDecoder

from conftest import ROOT, write_slow_spec


def trial_rows(exp_dir):
    rows = {}
    for result in exp_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        rows[result.parent.name] = lines
    return rows


def state_checkpoints(exp_dir) -> dict[str, int]:
    """The epoch of each trial's newest checkpoint as the newest saved experiment state records
    it (trials without one are left out): where a resume goes on from. Tune copies its state and
    the results to storage file by file (10 s apart or more), so the results seen may be newer
    than the state, and file times do not tell (a CI run once killed there). Within the state,
    the last result may already name a checkpoint the checkpoint manager has not registered yet
    (Tune saves it in a later step): the manager's is the one a resume restores."""
    states = sorted(exp_dir.glob("experiment_state-*.json"))  # named by the time they were saved
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError):  # being copied
        return {}
    named = {}
    for trial_json, runtime_json in trials:
        manager = TuneFunctionDecoder(allow_cloudpickle=True).decode(runtime_json)["checkpoint_manager"]  # this test's own run
        if manager.latest_checkpoint_result is not None:
            named[json.loads(trial_json)["relative_logdir"]] = manager.latest_checkpoint_result.metrics["training_iteration"]
    return named


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path, real_data_root, command):
    """Its model sleeps in each training step (4 s an epoch, 16 s a trial, 3 rounds of 2 trials),
    so the sweep is still running when Tune's saved state (10 s apart or more) shows one trial
    finished and another part-way, however fast the machine (a faster machine once finished the
    built-in sweep before the kill). The resume runs in this process."""
    spec = write_slow_spec(tmp_path / "project", "killed", epochs=4, num_samples=6, seconds_per_batch=0.4)
    argv = [sys.executable, "-m", "tltune", "sweep", str(spec), "--train-subset", "600", "--test-subset", "200", "--grace-period", "4",
            "--max-concurrent-trials", "2", "--checkpoint-every", "1", "--data-root", str(real_data_root), "--storage-path", str(tmp_path),
            "--name", "killed"]  # fmt: skip
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    exp_dir = tmp_path / "killed" / "killed"
    deadline = time.time() + 300
    while time.time() < deadline:  # until the saved state names one trial finished and another's checkpoint 2 or 3 epochs in
        epochs = state_checkpoints(exp_dir).values() if exp_dir.exists() else ()
        if 4 in epochs and any(2 <= epoch < 4 for epoch in epochs):
            break
        assert driver.poll() is None, "the sweep ended before it got part-way"
        time.sleep(0.2)
    else:
        raise AssertionError("the sweep never got part-way")
    time.sleep(1)  # the copy in progress, if any, is whole
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(2)  # let Ray's reaper take down what the driver started
    named = state_checkpoints(exp_dir)
    # storage lost a part-way trial's results after its first epoch (a driver killed mid-upload):
    # the resume rebuilds them from the checkpoint it goes on from
    lost = max((t for t, epoch in named.items() if 2 <= epoch < 4), key=named.get)
    result = exp_dir / lost / "result.json"
    result.write_text(result.read_text().splitlines(keepends=True)[0])
    before = trial_rows(exp_dir)
    assert not (exp_dir / "tltune_best.json").exists()

    code, out, err = command("sweep", "--resume", str(tmp_path / "killed"))
    assert code == 0, out[-3000:] + err[-3000:]
    assert "resuming" in out
    after = trial_rows(exp_dir)
    assert len(after) == 6, "every trial exactly once"
    for trial, rows in after.items():
        epochs = [r["training_iteration"] for r in rows]
        assert epochs == [1, 2, 3, 4], f"{trial}: each epoch once, none repeated after the resume: {epochs}"
        if named.get(trial) == 4:
            assert rows == before[trial], "a finished trial keeps its results untouched"
    rebuilt = [r["training_iteration"] for r in after[lost] if r.get("rebuilt_from_checkpoint")]
    print(f"lost the results of {lost} after epoch 1; rebuilt: {rebuilt}; the state named the checkpoints of epochs {named}")
    assert rebuilt == list(range(2, named[lost] + 1)), "the epochs between what storage kept and the checkpoint the state names"
    part_way = {t: epoch for t, epoch in named.items() if 1 <= epoch < 4}
    kept = lambda t: min(part_way[t], len(before[t]))  # noqa: E731  (the lost trial's rows 2.. were rebuilt)
    # results newer than the state's checkpoint are trained again: only those up to it are kept
    assert part_way and all(after[t][: kept(t)] == before[t][: kept(t)] for t in part_way), "unfinished trials continue from their checkpoints"
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
