"""One run directory, one writer: a second process is refused, and --resume keeps the run's
own settings instead of silently ignoring new ones."""

import json
from pathlib import Path
from types import SimpleNamespace
import subprocess
import sys

import pytest

from conftest import ROOT
from tltune import storage, trust
from tltune.records import RunRecord
from tltune.options import parse
from tltune.data import cache_dir


@pytest.fixture
def sweep(command):
    """``sweeps/mnist.py ARGV`` (``tltune sweep mnist``) in this process: its stderr and exit code."""
    return lambda *argv: SimpleNamespace(**dict(zip(("returncode", "stdout", "stderr"), command("sweep", "mnist", *argv))))


def test_a_run_being_written_is_refused_to_a_second_process(tmp_path, real_data_root):
    run_dir = tmp_path / "busy"
    with storage.run_lock(str(run_dir), cache_dir() / "locks"):
        out = subprocess.run([sys.executable, str(ROOT / "sweeps" / "mnist.py"), "--quick", "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "busy"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "is being written by tltune process" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not run_dir.exists()


# runs.jsonl's first line as tltune wrote it before SweepOptions: argparse's namespace as "args"
OLD_RECORD = {
    "started": "2026-11-30 10:00:00", "argv": ["sweeps/mnist.py", "--quick", "--lr", "0.01", "--data-root", "NO_DATA"],
    "args": {"quick": True, "experiments": None, "data_root": "NO_DATA", "dataset": None, "train_subset": None, "test_subset": None,
             "val_fraction": 0.1, "image_size": None, "weights": None, "optimizer": None, "activation": None, "lr": 0.01, "epochs": None,
             "lr_range": None, "epochs_range": None, "max_epochs": None, "batch_size": None, "no_feature_cache": False, "precision": "auto",
             "compile": False, "seed": 0, "num_samples": None, "max_concurrent_trials": None, "cpus_per_trial": None, "gpus_per_trial": None,
             "repeats": None, "grace_period": None, "source_run": None, "resume": None, "warm_start": None, "address": None,
             "storage_path": "results", "name": None},
}  # fmt: skip


@pytest.mark.parametrize("made_by", ["tltune 0.1 before SweepOptions", "SweepOptions"])
def test_resume_refuses_flags_that_change_the_run(tmp_path, made_by, sweep):
    no_data = str(tmp_path / "no-data")
    if made_by == "SweepOptions":  # signed, as a sweep writes it
        options = parse(["--quick", "--lr", "0.01", "--data-root", no_data]).record()
        record = trust.sign_record(RunRecord(started="2026-12-01 10:00:00", options=options).to_dict())
    else:
        record = json.loads(json.dumps(OLD_RECORD).replace("NO_DATA", no_data))
    (tmp_path / "runs.jsonl").write_text(json.dumps(record) + "\n")
    out = sweep("--resume", str(tmp_path), "--lr", "0.5", "--epochs", "3")
    assert out.returncode == 2 and "drop --lr, --epochs (only --address, --quiet, --log-to, --time-budget, --checkpoint-every may change)" in out.stderr, out.stderr
    same = sweep("--resume", str(tmp_path), "--quick", "--lr", "0.01")
    assert "drop" not in same.stderr and "no-data does not exist" in same.stderr, "flags equal to the run's own are accepted"


def signed_run(tmp_path, **changes) -> Path:
    """A run directory whose runs.jsonl holds a record tltune signed (then ``changes``, as an
    attacker who can write the folder would make them)."""
    tmp_path.mkdir(exist_ok=True)
    options = parse(["--quick", "--data-root", str(tmp_path / "no-data")]).record()
    record = trust.sign_record(RunRecord(started="2026-12-01 10:00:00", argv=["tltune"], options=options).to_dict())
    for key, value in changes.items():
        if value is None:
            record.pop(key)
        else:
            record["options"][key] = value
    (tmp_path / "runs.jsonl").write_text(json.dumps(record) + "\n")
    return tmp_path


@pytest.mark.parametrize("change", [{"address": "10.0.0.9:6379"}, {"data_root": "/elsewhere"}, {"weights": "/tmp/planted.pth"}, {"hmac": None}],
                         ids=["address", "data root", "weights", "signature removed"])  # fmt: skip
def test_resume_follows_only_a_run_record_tltune_signed(tmp_path, change, sweep):
    out = sweep("--resume", str(signed_run(tmp_path, **change)))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"refusing to resume {tmp_path}: runs.jsonl is not a file tltune wrote" in out.stderr and "may have been tampered with" in out.stderr


def test_a_signed_run_record_resumes_and_an_old_unsigned_one_says_where_it_points(tmp_path, sweep):
    signed = sweep("--resume", str(signed_run(tmp_path / "signed")))
    assert "no-data does not exist" in signed.stderr and "warning" not in signed.stderr and "refusing" not in signed.stderr, signed.stderr
    old = tmp_path / "old"
    old.mkdir()
    (old / "runs.jsonl").write_text(json.dumps(OLD_RECORD).replace("NO_DATA", str(old / "no-data")) + "\n")
    out = sweep("--resume", str(old))
    assert f"written before tltune signed it: resuming with its recorded settings, checked like flags; --data-root {old / 'no-data'}" in out.stderr
    assert "no-data does not exist" in out.stderr, out.stderr


def test_a_record_is_signed_as_json_holds_it():
    """Values JSON has no type for (a path, a tuple) are signed as the line holds them."""
    record = trust.sign_record({"started": "x", "options": {"data_root": Path("/data"), "lr_range": (0.1, 0.2)}})
    line = json.loads(json.dumps(record))
    assert line["options"] == {"data_root": "/data", "lr_range": [0.1, 0.2]} and trust.check_record(line, "runs.jsonl") is True
