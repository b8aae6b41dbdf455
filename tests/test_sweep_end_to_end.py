"""A real sweep on a local Ray: real CIFAR-10 images, OptunaSearch + ASHA, checkpoints,
TensorBoard event files, and the analysis script reading the result."""

import json
import re
import subprocess
import sys

import pytest
import torch
import torchvision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT


# The main job (README's first command) end to end: CIFAR-10 decoded and a sweep with AlexNet rows, about a
# minute, so it runs with the slow suite; `tltune sweep` itself is smoke-tested by the session's MNIST run.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, real_data_root):
    tmp = tmp_path_factory.mktemp("sweep")
    weights = tmp / "alexnet.pth"  # stands in for the ImageNet weights, through the same --weights path
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    argv = [
        sys.executable, str(ROOT / "sweeps" / "cifar10.py"), "--quick",
        "--experiments", "cifar10-alexnet-feature_extract", "cifar10-cnn-search",
        "--num-samples", "5", "--train-subset", "2000", "--test-subset", "1000", "--max-epochs", "3", "--max-concurrent-trials", "1",
        "--data-root", str(real_data_root), "--weights", str(weights),
        "--storage-path", str(tmp / "results"), "--name", "e2e",
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp / "results" / "e2e", out.stdout, argv


def test_every_trial_reports_each_epoch_with_a_checkpoint(sweep):
    run_dir, _, _ = sweep
    trial_dirs = [p.parent for p in (run_dir / "cifar10-cnn-search").glob("*/params.json")]
    assert len(trial_dirs) == 5
    first = [d for d in trial_dirs if json.loads((d / "params.json").read_text())["lr"] == 1e-4]
    assert first, "the reference settings (Adam, Tanh, lr 1e-4) are always the first point evaluated"
    stopped_early = 0
    for trial_dir in trial_dirs:
        config = json.loads((trial_dir / "params.json").read_text())
        rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
        assert 1 <= len(rows) <= config["epochs"] <= 3
        stopped_early += len(rows) < config["epochs"]
        assert all(0 <= r["val_acc"] <= 1 and r["train_loss"] > 0 for r in rows)
        assert len(list(trial_dir.glob("checkpoint_*/model.pt"))) == 1, "a finished experiment keeps each trial's latest checkpoint"
    assert stopped_early >= 1, "ASHA stopped a trial early"
    reference_rows = (first[0] / "result.json").read_text().splitlines()
    assert len(reference_rows) == json.loads((first[0] / "params.json").read_text())["epochs"], "ASHA never stops the reference"


def test_tensorboard_event_files_hold_per_epoch_scalars(sweep):
    run_dir, stdout, _ = sweep
    event_dirs = {p.parent for p in run_dir.glob("*/*/events.out.tfevents.*")}
    trial_dirs = {p.parent for p in run_dir.glob("*/*/params.json")}
    assert event_dirs == trial_dirs and len(trial_dirs) == 10  # 5 trials in each experiment
    for trial_dir in trial_dirs:
        rows = (trial_dir / "result.json").read_text().splitlines()
        events = EventAccumulator(str(trial_dir)).Reload()
        assert {"loss/train", "loss/val", "accuracy/train", "accuracy/val"} <= set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("accuracy/val")] == list(range(1, len(rows) + 1))
        assert "hparams/val_acc" in events.Tags()["scalars"]
        hparams = events.PluginTagToContent("hparams")
        assert {"_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hparams) and "_hparams_/experiment" not in hparams
        assert b"optimizer" in hparams["_hparams_/session_start_info"] and b"lr" in hparams["_hparams_/session_start_info"]
    assert f"tensorboard --logdir {run_dir}" in stdout


def test_best_configs_table_with_test_accuracy(sweep):
    run_dir, stdout, _ = sweep
    summary = json.loads((run_dir / "cifar10-cnn-search" / "tltune_best.json").read_text())
    assert summary["trials"] == 5 and summary["test_images"] == 1000
    assert 0.2 < summary["test_acc"] <= 1, "a small CNN learns CIFAR-10 well above chance (10%)"
    table = re.search(r"\| Dataset \|.*?(?=\n\n)", stdout, re.S).group(0)
    assert "| CIFAR-10 | small CNN, best of the search |" in table
    assert "| CIFAR-10 | AlexNet (ImageNet) feature extraction |" in table
    analysis = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "best_configs.py"), str(run_dir)], capture_output=True, text=True, check=True
    )
    assert table in analysis.stdout, "the analysis script prints the same table as the sweep"
    as_json = json.loads(
        subprocess.run([sys.executable, str(ROOT / "analysis" / "best_configs.py"), str(run_dir), "--json"],
                       capture_output=True, text=True, check=True).stdout  # fmt: skip
    )
    cnn = next(r for r in as_json if r["experiment"] == "cifar10-cnn-search")
    assert cnn["Accuracy"] == pytest.approx(100 * summary["test_acc"]) and cnn["reference"] == 53.0


def test_a_second_run_with_the_same_name_refuses(sweep):
    run_dir, _, argv = sweep
    before = sorted(p.name for p in run_dir.rglob("*"))
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=run_dir.parent.parent)
    assert out.returncode == 2 and "already exists" in out.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_report_from_the_result_directory(sweep, tmp_path):
    run_dir, _, _ = sweep
    out = subprocess.run(
        [sys.executable, str(ROOT / "analysis" / "report.py"), str(run_dir.parent), "--out", str(tmp_path / "report")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = (tmp_path / "report" / "report.md").read_text()
    summary = json.loads((run_dir / "cifar10-cnn-search" / "tltune_best.json").read_text())
    row = next(line for line in report.splitlines() if line.startswith("| CIFAR-10 | small CNN, best of the search"))
    assert f"{100 * summary['test_acc']:.2f}%" in row and "53.00%" in row
    assert f"{100 * summary['test_acc'] - 53.0:+.2f}" in row
    assert "| MNIST | vanilla CNN | 0.001 | 5 | 98.00% |  | not run |" in report, "no made-up numbers for what did not run"
    assert "### cifar10-cnn-search" in report and "wrote" in out.stdout
    for png in ("learning_curves.png", "accuracy_vs_lr.png", "finetune_vs_feature_extraction.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in report
