"""A trial that fails in every retry fails its experiment: no summary that looks finished, a
failure record with the cause, and a non-zero exit. Inputs that would make every trial fail
are refused before Ray starts."""

import json

import numpy as np
import pytest
import ray

from tltune.cli import main
from tltune.data import ImageArrays, Splits
from tltune.experiments import FAMILIES
from tltune.results import FAILED_FILE, SUMMARY_FILE


def tiny_splits(n=40):
    rng = np.random.default_rng(0)

    def arrays(count):
        return ImageArrays(rng.integers(0, 255, (count, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, count).astype(np.int64))

    return Splits(name="tiny", classes=["a", "b"], train=arrays(n), val=arrays(n // 4), test=arrays(n // 4), mean=(0.5,), std=(0.25,))


@pytest.mark.slow  # reads the session's failed sweep (conftest's failed_run)
def test_a_deterministic_error_in_every_trial_fails_the_experiment(failed_run):
    """Inside the trial the CNN refuses a 2-pixel input (the CLI refuses it earlier): each
    retry fails the same way, and the experiment is recorded as failed with that cause."""
    message = failed_run.failure
    assert "mnist-cnn: 1 of 1 trials failed" in message and "must be at least 4" in message and "\n" not in message
    assert not (failed_run.exp_dir / SUMMARY_FILE).exists(), "a failed experiment never looks finished"
    assert "must be at least 4" in json.loads((failed_run.exp_dir / FAILED_FILE).read_text())["reason"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "2"], "at least 4 for the CNN"),
        (["--gpus-per-trial", "nan"], "--gpus-per-trial must be a number >= 0"),
        (["--cpus-per-trial", "nan"], "--cpus-per-trial must be a number >= 0"),
        (["--seed", "-1"], "--seed must be between 0"),
        (["--val-fraction", "0"], "--val-fraction must be between 0 and 1"),
        (["--train-subset", "0"], "--train-subset must be at least 1"),
    ],
)
def test_inputs_every_trial_would_fail_on_are_refused_before_ray(tmp_path, real_data_root, extra, message, capsys):
    argv = ["--quick", "--experiments", "mnist-cnn", "--train-subset", "300",
            "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "bad", *extra]  # fmt: skip
    assert main(FAMILIES["mnist"], "test", argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists() and not ray.is_initialized()
