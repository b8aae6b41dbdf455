"""--resume unpickles only Ray state that tltune signed: planted, altered, truncated or
unsigned state files are refused with one line before anything is unpickled (a planted
pickle never runs), and a run tltune made resumes as before, wherever it was copied."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import ROOT
from test_fault_suite import interrupt_at
from tltune import trust
from tltune.cli import main
from tltune.experiments import FAMILIES

EXPERIMENT = "mnist-cnn"


class Planted:
    """A pickle that creates a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def resume(run_dir, **env):
    return subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "mnist.py"), "--resume", str(run_dir)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env},
    )  # fmt: skip


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, real_data_root):
    """A real sweep stopped by SIGINT part-way: resumable, with Tune's pickled state."""
    base = tmp_path_factory.mktemp("trust")
    argv = [sys.executable, str(ROOT / "sweeps" / "mnist.py"), "--quick", "--experiments", EXPERIMENT,
            "--num-samples", "3", "--max-epochs", "3", "--epochs-range", "3", "3", "--grace-period", "3",
            "--train-subset", "600", "--test-subset", "500", "--max-concurrent-trials", "1",
            "--data-root", str(real_data_root), "--storage-path", str(base), "--name", "run"]  # fmt: skip
    code, output = interrupt_at(argv, "epoch 1/", signal.SIGINT)
    assert code == 130, output[-3000:]
    exp_dir = base / "run" / EXPERIMENT
    names = os.listdir(exp_dir)
    assert "tuner.pkl" in names and any(n.startswith("experiment_state-") for n in names)
    assert any(n.startswith("searcher-state-") for n in names)
    return base / "run"


@pytest.fixture
def run_copy(interrupted_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(interrupted_run, copy)
    return copy


def only(exp_dir, prefix):
    (name,) = [n for n in os.listdir(exp_dir) if n.startswith(prefix)]
    return exp_dir / name


@pytest.fixture
def resume_here(capsys, monkeypatch):
    """``--resume`` in this process, as `sweeps/mnist.py` runs it: no interpreter (and torch
    import) per case; refusals happen before Ray starts."""

    def run(run_dir, **env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = main(FAMILIES["mnist"], "test", ["--resume", str(run_dir)])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run


def assert_refused(out, what):
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and what in error_lines[0], out.stderr
    assert "Traceback" not in out.stderr and "Unpickling" not in out.stderr
    assert "resuming" not in out.stdout  # refused before Ray started


def test_a_run_tltune_made_resumes_from_a_copy(run_copy, resume_here):
    out = resume_here(run_copy)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (run_copy / EXPERIMENT / "tltune_best.json").is_file()


def test_a_planted_searcher_pickle_never_runs(run_copy, resume_here, tmp_path):
    marker = tmp_path / "pwned"
    only(run_copy / EXPERIMENT, "searcher-state-").write_bytes(pickle.dumps(Planted(marker)))
    out = resume_here(run_copy)
    assert_refused(out, "searcher-state-")
    assert "tampered" in out.stderr and not marker.exists()


def test_a_planted_tuner_pickle_never_runs(run_copy, resume_here, tmp_path):
    marker = tmp_path / "pwned"
    (run_copy / EXPERIMENT / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))
    assert_refused(resume_here(run_copy), "tuner.pkl")
    assert not marker.exists()


def test_a_truncated_tuner_pickle_is_one_line(run_copy, resume_here):
    path = run_copy / EXPERIMENT / "tuner.pkl"
    path.write_bytes(path.read_bytes()[:100])
    assert_refused(resume_here(run_copy), "tuner.pkl")


def test_a_pickle_hidden_in_the_experiment_state_never_runs(run_copy, resume_here, tmp_path):
    marker = tmp_path / "pwned"
    path = only(run_copy / EXPERIMENT, "experiment_state-")
    state = json.loads(path.read_text())
    state["stats"]["planted"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(Planted(marker)).hex()}
    path.write_text(json.dumps(state))
    assert_refused(resume_here(run_copy), "experiment_state-")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["callback-states-2099-01-01_00-00-00.pkl", "basic-variant-state-2099-01-01_00-00-00.json"])
def test_an_added_state_file_is_refused(run_copy, resume_here, tmp_path, name):
    (run_copy / EXPERIMENT / name).write_bytes(pickle.dumps(Planted(tmp_path / "pwned")))
    assert_refused(resume_here(run_copy), name)
    assert not (tmp_path / "pwned").exists()


def test_signatures_made_without_the_key_do_not_count(run_copy, resume_here, tmp_path):
    payload = pickle.dumps(Planted(tmp_path / "pwned"))
    only(run_copy / EXPERIMENT, "searcher-state-").write_bytes(payload)
    forged = {"file": "searcher-state.pkl", "hmac": trust.signature(payload, b"a guess at the key" * 4)}
    with open(run_copy / EXPERIMENT / trust.SIGNATURES_FILE, "a") as f:
        f.write(json.dumps(forged) + "\n")
    assert_refused(resume_here(run_copy), "searcher-state-")


def test_a_run_without_signatures_is_refused(run_copy, resume_here):
    (run_copy / EXPERIMENT / trust.SIGNATURES_FILE).unlink()
    assert_refused(resume_here(run_copy), "is not a file tltune wrote")


def test_another_accounts_run_is_refused(run_copy, resume_here, tmp_path):
    out = resume_here(run_copy, TLTUNE_KEY_FILE=str(tmp_path / "no-key-here"))
    assert_refused(out, "not created by tltune under this account")
    assert not (tmp_path / "no-key-here").exists(), "checking must not create a key"


def test_another_key_is_refused(run_copy, resume_here, tmp_path):
    other = tmp_path / "other.key"
    other.write_text("0" * 64)
    assert_refused(resume_here(run_copy, TLTUNE_KEY_FILE=str(other)), "is not a file tltune wrote")


def test_a_damaged_key_is_one_line(run_copy, resume_here, tmp_path):
    damaged = tmp_path / "damaged.key"
    damaged.write_text("x")
    assert_refused(resume_here(run_copy, TLTUNE_KEY_FILE=str(damaged)), "is damaged")


@pytest.mark.slow  # a whole experiment again
def test_killed_before_tune_saved_state_starts_the_experiment_anew(interrupted_run, tmp_path):
    """tuner.pkl is written (and then signed) before Tune saves any state: a run killed in
    between has nothing to resume, and runs the experiment from the start."""
    copy = tmp_path / "early"
    shutil.copytree(interrupted_run, copy, ignore=lambda d, names: [n for n in names if os.path.isdir(os.path.join(d, n)) and d != str(interrupted_run)])
    exp_dir = copy / EXPERIMENT
    for name in os.listdir(exp_dir):
        if name not in ("tuner.pkl", "tltune_experiment.json"):
            os.remove(exp_dir / name)
    out = resume(copy)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming" not in out.stdout and (exp_dir / "tltune_best.json").is_file()


def test_the_key_is_private_and_made_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TLTUNE_KEY_FILE", str(tmp_path / "k" / "run-signing.key"))
    key = trust.signing_key()
    assert trust.signing_key() == key and len(key) == 64
    assert (tmp_path / "k" / "run-signing.key").stat().st_mode & 0o777 == 0o600


def test_what_ray_never_loads_is_not_checked():
    """Hidden partial copies a kill leaves mid-upload, and tltune's own JSON records."""
    assert trust.is_pickled_state("searcher-state-2026-11-27_04-18-26.pkl")
    assert trust.is_pickled_state("experiment_state-2026-11-27_04-18-26.json") and trust.is_pickled_state("tuner.pkl")
    assert not trust.is_pickled_state(".30964698-0044-484f-a2ec-3c37246b0fef-tmp-searcher-state-2026-11-27_04-18-26.pkl")
    assert not trust.is_pickled_state("tltune_best.json") and not trust.is_pickled_state("runs.jsonl")
