"""Bad input ends in one clear message and exit code 2, before Ray starts."""

import subprocess
import sys

import pytest
import ray
import torch
import torchvision

from conftest import ROOT
from tltune.cli import main
from tltune.errors import UserError
from tltune.experiments import EXPERIMENTS, Experiment, LogUniform, max_epochs, validate

# the MNIST rows: their data decodes in a second, ROWS-10 (60k JPEGs) in twenty
ROWS = ["mnist-alexnet-finetune", "mnist-alexnet-feature_extract", "mnist-cnn"]


def run(argv, capsys):
    code = main(ROWS, "test", argv)
    err = capsys.readouterr().err
    assert not ray.is_initialized(), "Ray is shut down after an error"
    return code, err


@pytest.fixture
def offline_root(tmp_path, monkeypatch):
    monkeypatch.delenv("TLTUNE_DATA_ROOT", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "0"], "learning rate must be > 0"),
        (["--lr", "-0.1"], "learning rate must be > 0"),
        (["--epochs", "0"], "epochs must be a whole number >= 1"),
        (["--batch-size", "0"], "batch_size must be a whole number >= 1"),
        (["--lr-range", "0.1", "0.001"], "need 0 < low < high"),
        (["--epochs-range", "5", "2"], "empty range"),
        (["--num-samples", "0"], "--num-samples must be at least 1"),
        (["--gpus-per-trial", "-1"], "--gpus-per-trial must be a number >= 0"),
        (["--experiments", "mnist-resnet"], "unknown experiment"),
        (["--dataset", "imagenet22k"], "unknown dataset 'imagenet22k'"),
        (["--weights", "/nonexistent/alexnet.pth"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_message(argv, message, capsys, real_data_root):
    code, err = run(["--data-root", str(real_data_root), "--storage-path", "/nonexistent-never-created"] + argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_wrong_architecture_weights_file(tmp_path, capsys, real_data_root):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    code, err = run(["--data-root", str(real_data_root), "--weights", str(path), "--storage-path", str(tmp_path)], capsys)
    assert code == 2 and "do not fit torchvision's AlexNet" in err


def test_unknown_choices_are_refused_by_the_parser(capsys):
    for argv in (["--optimizer", "lbfgs"], ["--activation", "swish"]):
        with pytest.raises(SystemExit) as exit_info:
            main(ROWS, "test", argv)
        assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_missing_dataset_offline_names_data_root(offline_root, capsys, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    code, err = run(["--data-root", str(offline_root), "--storage-path", str(offline_root)], capsys)
    assert code == 2 and "--data-root" in err and "mnist" in err


def test_existing_run_directory_is_never_overwritten(tmp_path, capsys, real_data_root):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.json").write_text("{}")
    argv = ["--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "mine", "--weights", "none",
            "--experiments", "mnist-cnn"]  # fmt: skip
    code, err = run(argv, capsys)
    assert code == 2 and "already exists" in err
    assert (tmp_path / "mine" / "precious.json").read_text() == "{}"


def test_every_declared_experiment_validates():
    seed_rows = {  # the seed's reference accuracies
        "cifar10-alexnet-finetune": 88.93, "cifar10-alexnet-feature_extract": 84.43, "cifar10-cnn-search": 53.0,
        "mnist-cnn": 98.0, "svhn-cnn": 87.0, "mnist-alexnet-finetune": 99.57, "mnist-alexnet-feature_extract": 97.52,
        "svhn-alexnet-finetune": 94.30, "svhn-alexnet-feature_extract": 46.56,
    }  # fmt: skip
    assert {name: EXPERIMENTS[name].reference_accuracy for name in seed_rows} == seed_rows
    for experiment in EXPERIMENTS.values():
        validate(experiment)
        assert max_epochs(experiment.reference, experiment.space) >= experiment.reference["epochs"]
    search = EXPERIMENTS["cifar10-cnn-search"]
    assert search.reference == {"optimizer": "adam", "activation": "tanh", "lr": 1e-4, "epochs": 3}
    assert search.space["lr"] == LogUniform(1e-5, 1e-1) and "tanh" in search.space["activation"].options


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "vgg"}, "unknown model"),
        ({"mode": "distill"}, "unknown mode"),
        ({"reference": {"optimizer": "lbfgs", "activation": "tanh", "lr": 0.1, "epochs": 1}}, "unknown optimizer"),
        ({"reference": {"optimizer": "adam", "lr": 0.1, "epochs": 1}}, "without a reference value"),
        ({"space": {"lr": LogUniform(0.1, 0.01)}}, "need 0 < low < high"),
    ],
)
def test_bad_declarations_are_rejected(change, message):
    base = EXPERIMENTS["cifar10-cnn-search"].__dict__
    with pytest.raises(UserError, match=message):
        validate(Experiment(**{**base, **change}))


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "sweeps").glob("*.py")))
def test_sweep_script_help_runs(script):
    out = subprocess.run([sys.executable, str(ROOT / "sweeps" / script), "--help"], capture_output=True, text=True, check=True)
    assert "--quick" in out.stdout and "--data-root" in out.stdout


def test_unreachable_address_fails_fast(capsys, real_data_root, tmp_path):
    import socket
    import time

    with socket.socket() as probe:  # a port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.time()
    code, err = run(["--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--weights", "none",
                     "--experiments", "mnist-cnn", "--address", f"127.0.0.1:{port}"], capsys)  # fmt: skip
    assert code == 2 and "no Ray cluster answers at" in err and time.time() - started < 60
    code, err = run(["--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--weights", "none",
                     "--experiments", "mnist-cnn", "--address", "nonsense"], capsys)  # fmt: skip
    assert code == 2 and "expected HOST:PORT" in err


@pytest.mark.slow  # starts Ray
def test_more_gpus_per_trial_than_any_node_has(capsys, real_data_root, tmp_path):
    code, err = run(["--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--weights", "none",
                     "--experiments", "mnist-cnn", "--gpus-per-trial", "1"], capsys)  # fmt: skip
    assert code == 2 and "trials would wait forever" in err and "1 GPUs" in err
    assert list(tmp_path.iterdir()) == [], "no run directory for a run that could not start"
