"""MNIST -> SVHN end to end on a local Ray: real MNIST, and SVHN files in the real .mat format."""

import contextlib
import io
import json
import sys

import pytest
import ray

from conftest import ROOT, write_svhn_mat
from tltune.cli import main
from tltune.experiments import FAMILIES
from tltune.config import TrialConfig
from tltune.train import load_checkpoint_config

pytestmark = pytest.mark.slow  # three experiments end to end (README's test command: 5 minutes)


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, real_data_root):
    tmp = tmp_path_factory.mktemp("transfer")
    data = tmp / "data"
    data.mkdir()
    (data / "MNIST").symlink_to(real_data_root / "MNIST")
    write_svhn_mat(data / "svhn" / "train_32x32.mat", 600)
    write_svhn_mat(data / "svhn" / "test_32x32.mat", 200, seed=1)
    argv = [
        sys.executable, str(ROOT / "sweeps" / "mnist_to_svhn.py"), "--quick", "--num-samples", "2",
        "--max-epochs", "1", "--train-subset", "500", "--test-subset", "200", "--max-concurrent-trials", "1",
        "--data-root", str(data), "--storage-path", str(tmp / "results"), "--name", "chain",
    ]  # fmt: skip
    # what the script runs, in this process (its own interpreter is test_cli's --help smoke test)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(FAMILIES["mnist_to_svhn"], "sweeps/mnist_to_svhn.py", argv[2:])
    assert code == 0, stdout.getvalue()[-3000:] + stderr.getvalue()[-3000:]
    return tmp / "results" / "chain", stdout.getvalue(), argv


def test_every_stage_of_the_chain_finishes_with_a_test_accuracy(transfer_run):
    run_dir, stdout, _ = transfer_run
    for name in ("mnist_to_svhn-source", "mnist_to_svhn-finetune", "mnist_to_svhn-feature_extract", "mnist_to_svhn-scratch"):
        summary = json.loads((run_dir / name / "tltune_best.json").read_text())
        assert summary["trials"] == 2 and 0 <= summary["test_acc"] <= 1
        assert summary["config"]["channels"] == 3 and summary["config"]["image_size"] == 32
    source = json.loads((run_dir / "mnist_to_svhn-source" / "tltune_best.json").read_text())
    assert source["test_acc"] > 0.5, "the CNN learns MNIST (as 3x32x32) even in one short epoch"
    assert "| SVHN | vanilla CNN pretrained on MNIST, fine-tuned |" in stdout


def test_targets_take_the_source_architecture_and_weights(transfer_run):
    run_dir, _, _ = transfer_run
    source = json.loads((run_dir / "mnist_to_svhn-source" / "tltune_best.json").read_text())
    for name in ("mnist_to_svhn-finetune", "mnist_to_svhn-feature_extract", "mnist_to_svhn-scratch"):
        record = json.loads((run_dir / name / "tltune_experiment.json").read_text())
        assert record["settings"]["pretrained"].startswith(str(run_dir / "mnist_to_svhn-source" / source["best_trial"]))
        for params in (run_dir / name).glob("*/params.json"):
            assert json.loads(params.read_text())["activation"] == source["config"]["activation"]


def test_checkpoints_carry_their_trial_config(transfer_run):
    run_dir, _, _ = transfer_run
    checkpoints = list(run_dir.glob("mnist_to_svhn-*/*/checkpoint_*"))
    assert checkpoints
    for checkpoint in checkpoints:
        params = json.loads((checkpoint.parent / "params.json").read_text())
        assert load_checkpoint_config(checkpoint) == TrialConfig.from_dict(params)


def test_transfer_without_a_source_fails_before_ray(transfer_run, tmp_path, capsys):
    _, _, argv = transfer_run
    flags = argv[2:-4] + ["--experiments", "mnist_to_svhn-finetune", "--storage-path", str(tmp_path), "--name", "x"]
    assert main(FAMILIES["mnist_to_svhn"], "test", flags) == 2
    err = capsys.readouterr().err
    assert "--source-run" in err and "Traceback" not in err and not ray.is_initialized()


def test_transfer_from_another_runs_source(transfer_run, tmp_path, command):
    run_dir, _, argv = transfer_run  # the script's sweep, in this process: `tltune sweep mnist_to_svhn`
    with_source = ["sweep", "mnist_to_svhn", "--experiments", "mnist_to_svhn-finetune", *argv[2:-4], "--storage-path", str(tmp_path), "--name", "y"]
    code, out, err = command(*with_source, "--source-run", str(run_dir))
    assert code == 0, out[-3000:] + err[-3000:]
