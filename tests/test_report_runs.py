"""`tltune report RUN_A RUN_B`: the same experiments side by side, a column per run and the
best-over-time curves of each run on one plot; names read from records never become paths
outside --out."""

import json
import shutil
import subprocess
import sys

import pytest

from tltune.report import safe_name


@pytest.fixture(scope="module")
def two_runs(mnist_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-runs")
    second = tmp / "mnist-again"
    shutil.copytree(mnist_run.run_dir, second)
    return mnist_run.run_dir, second, tmp


def test_runs_side_by_side(two_runs):
    first, second, tmp = two_runs
    out = subprocess.run([sys.executable, "-m", "tltune", "report", str(first), str(second), "--out", str(tmp / "report")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp / "report" / "report.md").read_text()
    assert "## Runs side by side" in report
    header = next(line for line in report.splitlines() if line.startswith("| Experiment | "))
    assert f"`{first.name}`" in header and "`mnist-again`" in header
    row = next(line for line in report.splitlines() if line.startswith("| mnist-cnn | "))
    assert row.count("%") >= 2, row
    assert (tmp / "report" / "mnist-cnn-runs-best_over_time.png").stat().st_size > 0


def test_a_record_name_never_becomes_a_path(two_runs):
    _, second, tmp = two_runs
    record = second / "mnist-cnn" / "tltune_experiment.json"
    data = json.loads(record.read_text())
    data["name"] = str(tmp / "outside" / "owned")
    record.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, "-m", "tltune", "report", str(second), "--out", str(tmp / "report2")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp / "outside").exists()
    assert all(p.parent == tmp / "report2" for p in (tmp / "report2").rglob("*") if p.is_file())
    assert safe_name("../../etc/passwd") == "_.._etc_passwd" and safe_name("...") == "experiment"
