"""One run directory, one writer: a second process is refused, and --resume keeps the run's
own settings instead of silently ignoring new ones."""

import json
import subprocess
import sys

from conftest import ROOT
from tltune import storage
from tltune.cli import build_parser
from tltune.data import cache_dir


def sweep(*argv):
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / "mnist.py"), *argv], capture_output=True, text=True, timeout=120)


def test_a_run_being_written_is_refused_to_a_second_process(tmp_path, real_data_root):
    run_dir = tmp_path / "busy"
    with storage.run_lock(str(run_dir), cache_dir() / "locks"):
        out = sweep("--quick", "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "busy")
    assert out.returncode == 2 and "is being written by tltune process" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not run_dir.exists()


def test_resume_refuses_flags_that_change_the_run(tmp_path):
    saved = vars(build_parser("x").parse_args(["--quick", "--lr", "0.01", "--data-root", str(tmp_path / "no-data")]))
    (tmp_path / "runs.jsonl").write_text(json.dumps({"args": saved}) + "\n")
    out = sweep("--resume", str(tmp_path), "--lr", "0.5", "--epochs", "3")
    assert out.returncode == 2 and "drop --lr, --epochs (only --address may change)" in out.stderr, out.stderr
    same = sweep("--resume", str(tmp_path), "--quick", "--lr", "0.01")
    assert "drop" not in same.stderr and "no-data does not exist" in same.stderr, "flags equal to the run's own are accepted"
