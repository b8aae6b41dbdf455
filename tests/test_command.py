"""The ``tltune`` command: sweep, list, best, report; every mistake one line and exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tltune.command import main
from tltune.experiments import EXPERIMENTS


def tltune(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "tltune", *argv], capture_output=True, text=True, timeout=600, **kwargs)


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "tltune"
    if not script.exists():
        pytest.skip("the package was installed before [project.scripts] existed: pip install -e . again")
    out = subprocess.run([str(script), "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "cifar10-cnn-search" in out.stdout


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS) and "88.93%" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "usage"),
        (["nope"], "unknown command 'nope'"),
        (["sweep"], "families: cifar10, mnist, svhn, mnist_to_svhn, cifar10_plus, all"),
        (["sweep", "cifar"], "unknown family or experiment 'cifar'"),
        (["sweep", "mnist", "--experiments", "cifar10-cnn-search"], "unknown experiment(s) cifar10-cnn-search here"),
        (["best", "/nonexistent/run"], "does not exist"),
        (["report", "/nonexistent/run"], "does not exist"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(argv, message):
    out = tltune(*argv)
    assert out.returncode == 2 and message in out.stdout + out.stderr and "Traceback" not in out.stderr


def test_sweep_help_lists_the_experiments_without_repeated_defaults():
    out = tltune("sweep", "cifar10", "--help")
    assert out.returncode == 0
    assert "cifar10-alexnet-finetune, cifar10-alexnet-feature_extract, cifar10-cnn-search" in " ".join(out.stdout.split())
    assert "(default: None)" not in out.stdout and "(default: 64)" not in out.stdout and "(default: False)" not in out.stdout


def test_sweep_best_and_report(tmp_path, real_data_root):
    out = tltune("sweep", "mnist", "--quick", "--experiments", "mnist-cnn", "--num-samples", "3", "--train-subset", "600",
                 "--test-subset", "500", "--max-epochs", "2", "--data-root", str(real_data_root), "--storage-path", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("mnist-cnn-"), "named after the experiment, not the interpreter"
    assert "mnist-cnn: 0 running, 0 pending, 3 finished" in out.stdout, "the live view ends with every trial finished"
    best = tltune("best", str(run_dir), "--trials", "--csv")
    assert best.returncode == 0 and len(best.stdout.splitlines()) == 4 and "stop_reason" in best.stdout
    report = tltune("report", str(run_dir), "--out", str(tmp_path / "report"), env={**os.environ, "MPLBACKEND": "Agg"})
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "mnist-cnn-optimization_history.png").is_file(), "Optuna's plots from the kept study"
