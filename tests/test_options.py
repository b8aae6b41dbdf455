"""One typed options object under both faces: the command line's flags are generated from
SweepOptions, tltune.run takes it as keywords, runs.jsonl records it, and the light faces
import neither Ray nor torch."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tltune.errors import UserError
from tltune.options import SweepOptions, build_parser, flag, parse


def test_every_field_is_a_flag_and_every_flag_a_field():
    parser = build_parser("test")
    dests = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(SweepOptions)}
    assert all(f.metadata["help"] for f in dataclasses.fields(SweepOptions))
    assert parse([]) == SweepOptions()


def test_flags_and_keywords_make_the_same_options():
    argv = ["--quick", "--lr-range", "1e-4", "1e-2", "--experiments", "a", "b", "--cpus-per-trial", "1", "--seed", "3", "--precision", "fp32"]
    from_flags = parse(argv)
    from_keywords = SweepOptions.from_keywords(quick=True, lr_range=[1e-4, 0.01], experiments=["a", "b"], cpus_per_trial=1, seed=3, precision="fp32")
    assert from_flags == from_keywords
    assert from_flags.lr_range == (1e-4, 1e-2) and isinstance(from_flags.cpus_per_trial, float)
    assert from_flags.changed() == {"quick": True, "lr_range": (1e-4, 1e-2), "experiments": ("a", "b"), "cpus_per_trial": 1.0, "seed": 3, "precision": "fp32"}


def test_the_record_reads_back_as_the_same_options():
    options = parse(["--quick", "--epochs-range", "2", "4", "--storage-path", "s3://bucket/runs", "--compile"])
    record = json.loads(json.dumps(options.record()))
    assert SweepOptions.from_record(record) == options
    assert SweepOptions.from_record({**record, "an_option_of_a_later_version": 1}) == options


@pytest.mark.parametrize(
    "record, message",
    [
        ({"lr": "fast"}, "lr must be a float, got 'fast'"),
        ({"experiments": "mnist-cnn"}, "experiments must be a list of str"),
        ({"epochs_range": [1, 2, 3]}, "epochs_range must hold 2 value(s)"),
        ({"num_samples": 2.5}, "num_samples must be an int"),
        ({"quick": "yes"}, "quick must be a bool"),
        ({"storage_path": None}, "storage_path must not be None"),
        ({"seed": -2}, "--seed must be between 0"),
        ({"gpus_per_trial": float("nan")}, "--gpus-per-trial must be a number >= 0"),
        ({"precision": "fp8"}, "precision: invalid choice 'fp8'"),
    ],
)
def test_a_wrong_recorded_or_given_value_is_one_user_error(record, message):
    with pytest.raises(UserError) as caught:
        SweepOptions.from_record(record)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_resume_of_a_record_with_wrong_types_is_one_line(tmp_path):
    record = {"started": "x", "argv": [], "options": {**SweepOptions().record(), "num_samples": "m,n,i,s"}}
    (tmp_path / "runs.jsonl").write_text(json.dumps(record) + "\n")
    out = subprocess.run([sys.executable, "-m", "tltune", "sweep", "mnist", "--resume", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "recorded options are not valid (num_samples must be an int, got 'm,n,i,s')" in out.stderr


def test_flag_names():
    assert flag("cpus_per_trial") == "--cpus-per-trial"


LIGHT = """
import sys
import tltune.cli
from tltune.command import main
codes = [main(argv) for argv in {argvs!r}]
heavy = [m for m in ("ray", "torch", "torchvision", "optuna") if m in sys.modules]
print(codes, heavy)
"""


def test_the_faces_import_neither_ray_nor_torch():
    """--help, a flag error, a bad value, tltune list and tltune --version stay light."""
    argvs = [["sweep", "cifar10", "--lr", "-1"], ["sweep", "cifar10", "--num-samples", "0"], ["list"], ["--version"], ["--help"]]
    out = subprocess.run([sys.executable, "-c", LIGHT.format(argvs=argvs)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[2, 2, 0, 0, 0] []", out.stdout
    for argv in (["sweep", "cifar10", "--help"], ["sweep", "cifar10", "--optimizer", "lbfgs"]):
        out = subprocess.run([sys.executable, "-c", "import sys\nfrom tltune.command import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
                              "print([m for m in ('ray', 'torch') if m in sys.modules])" % argv], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.stdout.strip().splitlines()[-1] == "[]", (argv, out.stdout, out.stderr)


def test_python_dash_m_names_itself_tltune():
    out = subprocess.run([sys.executable, "-m", "tltune", "sweep", "cifar10", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: tltune sweep cifar10 ") and "__main__" not in out.stdout
    version = subprocess.run([sys.executable, "-m", "tltune", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("tltune ")


def test_more_than_one_gpu_per_trial_is_refused():
    with pytest.raises(UserError, match=r"--gpus-per-trial 2: a trial trains on one GPU"):
        SweepOptions(gpus_per_trial=2)
    assert SweepOptions(gpus_per_trial=1).gpus_per_trial == 1.0 and SweepOptions(gpus_per_trial=0.25).gpus_per_trial == 0.25


def test_a_run_records_its_local_paths_absolute(tmp_path, monkeypatch):
    """So that a resume from another folder finds the same data, weights and runs."""
    from tltune.options import SweepOptions
    from tltune.plan import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TLTUNE_DATA_ROOT", raising=False)
    (tmp_path / "w.pt").write_bytes(b"weights")
    (tmp_path / "pets").mkdir()
    local = with_absolute_paths(SweepOptions(weights="w.pt", dataset="./pets", source_run="runs/a", warm_start="~/b"))
    assert (local.data_root, local.weights, local.dataset) == (str(tmp_path / "data"), str(tmp_path / "w.pt"), str(tmp_path / "pets"))
    assert (local.source_run, local.warm_start, local.storage_path) == (str(tmp_path / "runs" / "a"), str(Path.home() / "b"), str(tmp_path / "results"))
    names = with_absolute_paths(SweepOptions(weights="imagenet", dataset="mnist", storage_path="s3://bucket/x"))
    assert (names.weights, names.dataset, names.storage_path) == ("imagenet", "mnist", "s3://bucket/x")
    monkeypatch.setenv("TLTUNE_DATA_ROOT", str(tmp_path / "elsewhere"))
    assert with_absolute_paths(SweepOptions()).data_root == str(tmp_path / "elsewhere")
