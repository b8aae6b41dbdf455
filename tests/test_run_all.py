"""sweeps/all.py's mode: one run directory, finished experiments skipped, missing data skipped."""

import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = """
import sys

import pytest
from tltune.cli import main
sys.exit(main(["mnist-cnn", "svhn-cnn"], "all", sys.argv[1:], run_all=True))
"""


@pytest.mark.slow  # a real sweep of its own (README test command: 5 minutes)
def test_all_skips_missing_data_and_finished_experiments(tmp_path, real_data_root):
    data = tmp_path / "data"
    data.mkdir()
    (data / "MNIST").symlink_to(real_data_root / "MNIST")  # no SVHN here, and no network
    argv = [sys.executable, "-c", SCRIPT, "--quick", "--num-samples", "1", "--max-epochs", "1", "--train-subset", "300",
            "--test-subset", "100", "--data-root", str(data), "--storage-path", str(tmp_path / "results")]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "warning: skipping the svhn experiments" in first.stderr
    run_dir = tmp_path / "results" / "all"
    assert (run_dir / "mnist-cnn" / "tltune_best.json").is_file() and not (run_dir / "svhn-cnn").exists()
    (run_dir / "svhn-cnn").mkdir()  # an interrupted experiment is set aside, never deleted
    (run_dir / "svhn-cnn" / "tltune_experiment.json").write_text("{}")
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "mnist-cnn: finished in" in second.stdout and "nothing to run" in second.stdout
    assert "Best configuration of each experiment" in second.stdout and "| MNIST | vanilla CNN" in second.stdout, second.stdout
    assert list(run_dir.glob("svhn-cnn.interrupted-*/tltune_experiment.json"))
    assert len((run_dir / "runs.jsonl").read_text().splitlines()) == 1, "only invocations that ran something write"
