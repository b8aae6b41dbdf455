"""Accuracy per compute: every trial's CPU- and GPU-seconds in trials.csv, the Pareto front
(`tltune best --pareto`) and the cheapest configuration within a point of the best."""

import csv
import io
import subprocess
import sys

from tltune.results import pareto_front


def row(trial, acc, cpu_s, gpu_s=0.0):
    return {"trial": trial, "last_val_acc": acc, "cpu_s": cpu_s, "gpu_s": gpu_s}


def test_the_front_holds_what_nothing_beats_in_both():
    rows = [row("a", 0.90, 100), row("b", 0.95, 400), row("c", 0.89, 300), row("d", 0.945, 150), row("e", None, 10)]
    found = pareto_front(rows)
    assert found["unit"] == "cpu_s"
    assert [r["trial"] for r in found["front"]] == ["a", "d", "b"]  # c costs more than a for less
    assert found["best"]["trial"] == "b"
    assert found["cheapest_near_best"]["trial"] == "d", "within 1 point of 95%, for 150 instead of 400"


def test_gpu_seconds_count_where_trials_held_gpus():
    found = pareto_front([row("a", 0.9, 400, 100), row("b", 0.8, 100, 50)])
    assert found["unit"] == "gpu_s" and [r["trial"] for r in found["front"]] == ["b", "a"]


def test_trials_csv_carries_the_compute_each_trial_held(mnist_run):
    out = subprocess.run([sys.executable, "-m", "tltune", "best", str(mnist_run.run_dir), "--trials"], capture_output=True, text=True, timeout=120)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert rows and all(float(r["cpu_s"]) > 0 and float(r["gpu_s"]) == 0 for r in rows)
    shares = {round(float(r["cpu_s"]) / float(r["wall_s"]), 1) for r in rows}
    assert len(shares) == 1 and shares.pop() >= 0.5, "wall seconds times the CPUs each trial held (the same share for all)"


def test_best_pareto_prints_each_front(mnist_run):
    out = subprocess.run([sys.executable, "-m", "tltune", "best", str(mnist_run.run_dir), "--pareto"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "mnist-cnn: accuracy against compute (CPU-seconds)" in out.stdout
    assert "within 1 point of" in out.stdout
