"""The session's real quick sweep (real MNIST, OptunaSearch + ASHA), then the report: a
``trials.csv`` row per trial whose stop reason agrees with its result.json, and Optuna's plots
from the study the sweep kept."""

import csv
import json
import re
import subprocess
import sys

import pytest

from conftest import MNIST_RUN_SAMPLES, ROOT
from tltune.results import OPTUNA_JOURNAL

@pytest.fixture(scope="module")
def report(mnist_run):
    out = mnist_run.tmp / "report"
    made = subprocess.run([sys.executable, str(ROOT / "analysis" / "report.py"), str(mnist_run.run_dir), "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 0 and "Traceback" not in made.stderr, made.stderr[-3000:]
    return mnist_run.run_dir / "mnist-cnn", out


def test_a_csv_row_per_trial_with_the_stop_reason_its_results_show(report):
    exp_dir, out = report
    trial_dirs = sorted(p.parent for p in exp_dir.glob("*/params.json"))
    assert len(trial_dirs) == MNIST_RUN_SAMPLES
    rows = {row["trial"]: row for row in csv.DictReader((out / "trials.csv").open()) if row["experiment"] == "mnist-cnn"}
    assert sorted(rows) == [d.name for d in trial_dirs]
    for trial_dir in trial_dirs:
        row, planned = rows[trial_dir.name], json.loads((trial_dir / "params.json").read_text())["epochs"]
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        assert int(row["epochs_run"]) == len(results) and row["config/epochs"] == str(planned)
        assert re.fullmatch(r"completed|stopped by ASHA at epoch [1-9]", row["stop_reason"]), row["stop_reason"]
        assert (row["stop_reason"] == "completed") == (len(results) == planned)
        assert float(row["last_val_acc"]) == results[-1]["val_acc"]
        assert 0 < float(row["wall_s"]) == pytest.approx(results[-1]["time_total_s"], abs=0.01)
        assert float(row["cpu_s"]) == pytest.approx(float(row["wall_s"]) * results[-1]["cpus_held"], abs=0.02)
    summary = json.loads((exp_dir / "tltune_best.json").read_text())
    tested = {summary["best_trial"], summary["reference_trial"]["trial"]}
    assert {name for name, row in rows.items() if row["test_acc"]} == tested, "the best and the reference trial are tested"
    assert float(rows[summary["best_trial"]]["test_acc"]) == summary["test_acc"]
    assert "[trials.csv](trials.csv)" in (out / "report.md").read_text()


def test_accuracy_against_compute_names_the_cheapest_near_the_best(report):
    _, out = report
    report_md = (out / "report.md").read_text()
    assert "## Accuracy per compute" in report_md and "- mnist-cnn: " in report_md and "CPU-seconds" in report_md
    assert (out / "accuracy_vs_compute.png").read_bytes()[:4] == b"\x89PNG"


def test_optuna_plots_from_the_study_the_sweep_kept(report):
    exp_dir, out = report
    if not (exp_dir / OPTUNA_JOURNAL).is_file():
        pytest.skip(f"the sweep kept no {OPTUNA_JOURNAL} (tltune/raytune/sweep.py does not persist the Optuna study yet)")
    report_md = (out / "report.md").read_text()
    completed = [row for row in csv.DictReader((out / "trials.csv").open()) if row["stop_reason"] == "completed" and row["experiment"] == "mnist-cnn"]
    kinds = ["optimization_history", "parallel_coordinate", "intermediate_values"]
    if len(completed) >= 2:  # Optuna ranks importances over completed trials; ASHA's stops are pruned
        kinds.append("param_importances")
    else:
        assert "_param importances: skipped (needs 2 completed trials" in report_md
    for kind in kinds:
        data = (out / f"mnist-cnn-{kind}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"](mnist-cnn-{kind}.png)" in report_md
    assert not list(exp_dir.glob("*.lock")), "the journal is read from a copy"
