"""A trial whose loss diverges stops with its reason; the sweep and the analysis go on."""

import csv
import io
import json

import pytest

from tltune.cli import main
from tltune.command import best_main, report_main
from tltune.experiments import FAMILIES


@pytest.mark.slow  # a real sweep of its own
def test_a_diverging_trial_stops_with_its_reason(tmp_path, real_data_root, capsys):
    argv = ["--quick", "--experiments", "mnist-cnn",
            "--optimizer", "sgd", "--activation", "relu", "--lr", "1e12", "--epochs", "3", "--num-samples", "2", "--max-concurrent-trials", "1", "--train-subset", "300",
            "--test-subset", "100", "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "nan"]  # fmt: skip
    code = main(FAMILIES["mnist"], "sweeps/mnist.py", argv)  # what sweeps/mnist.py runs, in this process
    assert code == 0, capsys.readouterr().err[-2000:]
    exp_dir = tmp_path / "nan" / "mnist-cnn"
    results = sorted(exp_dir.glob("*/result.json"))
    assert len(results) == 2, f"one result.json per trial (--num-samples 2), found {[str(r) for r in results]}"
    for result in results:
        last = json.loads(result.read_text().splitlines()[-1])
        assert last["diverged"] is True and "learning rate is probably too high" in last["stop_reason"]
        assert last["training_iteration"] == 1, "a diverged trial stops at once instead of training on NaNs"
    # the analysis scripts' own code, in this process (each script is one call of it)
    assert report_main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0, capsys.readouterr().err
    report_md = (tmp_path / "r" / "report.md").read_text()
    assert "diverged: training loss became" in report_md
    assert "| all trials diverged |" in report_md, "no diverged trial is presented as the best"
    capsys.readouterr()
    assert best_main([str(tmp_path / "nan")]) == 0
    assert "| MNIST | vanilla CNN | - | - | all diverged |" in capsys.readouterr().out
    assert best_main([str(tmp_path / "nan"), "--trials", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 2
    assert all(row["stop_reason"] == "diverged" and row["epochs_run"] == "1" and row["last_val_acc"] == "" for row in rows), rows
