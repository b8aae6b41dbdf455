"""The ``tltune`` command: sweep, list, best, report; every mistake one line and exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MNIST_RUN_EXPERIMENTS, MNIST_RUN_SAMPLES
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


def test_sweep_best_and_report(mnist_run, tmp_path):
    """The session's MNIST run (tltune.run printing what `tltune sweep` prints): read it with `tltune best` and `tltune report`."""
    run_dir = mnist_run.run_dir
    assert run_dir.name.startswith("mnist-2"), "named after the experiments' common name and the time"
    for name in MNIST_RUN_EXPERIMENTS:
        assert f"{name}: 0 running, 0 pending, {MNIST_RUN_SAMPLES} finished" in mnist_run.stdout, "the live view ends with every trial finished"
    best = tltune("best", str(run_dir), "--trials", "--csv")
    assert best.returncode == 0 and len(best.stdout.splitlines()) == 1 + len(MNIST_RUN_EXPERIMENTS) * MNIST_RUN_SAMPLES and "stop_reason" in best.stdout
    report = tltune("report", str(run_dir), "--out", str(tmp_path / "report"), env={**os.environ, "MPLBACKEND": "Agg"})
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "mnist-cnn-optimization_history.png").is_file(), "Optuna's plots from the kept study"
