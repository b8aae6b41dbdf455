"""--resume and ``result_grid`` unpickle only Ray files that tltune signed: planted, altered,
truncated or unsigned files Ray would unpickle, at any depth of the experiment folder, are
refused with one line before anything is unpickled (a planted pickle never runs), and a run
tltune made resumes as before, wherever it was copied (tests/test_fault_suite.py moves its run
part-way). `tltune best` and `report` unpickle nothing at all."""

import json
import os
import pickle
import shutil
import signal
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


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, real_data_root):
    """A real sweep stopped by SIGINT part-way: resumable, with Tune's pickled state."""
    base = tmp_path_factory.mktemp("trust")
    argv = [sys.executable, str(ROOT / "sweeps" / "mnist.py"), "--quick", "--experiments", EXPERIMENT,
            "--num-samples", "2", "--max-epochs", "2", "--epochs-range", "2", "2", "--grace-period", "2",
            "--train-subset", "600", "--test-subset", "500", "--max-concurrent-trials", "1",
            "--data-root", str(real_data_root), "--storage-path", str(base), "--name", "run"]  # fmt: skip
    code, output = interrupt_at(argv, "epoch 1/", signal.SIGINT)
    assert code == 130, output[-3000:]
    exp_dir = base / "run" / EXPERIMENT
    names = os.listdir(exp_dir)
    assert "tuner.pkl" in names and any(n.startswith("experiment_state-") for n in names)
    assert any(n.startswith("searcher-state-") for n in names)
    return base / "run"


@pytest.fixture(scope="module")
def unfinished_run(mnist_run, tmp_path_factory):
    """The session's MNIST run with its CNN experiment made unfinished (its summary removed):
    Tune's signed state at every depth (repeats/ included), and --resume's checks, without a
    sweep of this module's own (the interrupted one above starts anew in the slow suite)."""
    copy = tmp_path_factory.mktemp("unfinished") / "run"
    shutil.copytree(mnist_run.run_dir, copy)
    (copy / EXPERIMENT / "tltune_best.json").unlink()
    return copy


@pytest.fixture
def run_copy(unfinished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(unfinished_run, copy)
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
def test_killed_before_tune_saved_state_starts_the_experiment_anew(interrupted_run, tmp_path, resume_here):
    """tuner.pkl is written (and then signed) before Tune saves any state: a run killed in
    between has nothing to resume, and runs the experiment from the start."""
    copy = tmp_path / "early"
    shutil.copytree(interrupted_run, copy, ignore=lambda d, names: [n for n in names if os.path.isdir(os.path.join(d, n)) and d != str(interrupted_run)])
    exp_dir = copy / EXPERIMENT
    for name in os.listdir(exp_dir):
        if name not in ("tuner.pkl", "tltune_experiment.json"):
            os.remove(exp_dir / name)
    out = resume_here(copy)
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


# -- every place Ray reads a pickle, at any depth (issue 20, item 1) ----------------------


def a_trial(exp_dir):
    return next(p for p in sorted(exp_dir.iterdir()) if p.is_dir() and (p / "params.json").is_file())


def plant(run_copy, place, payload):
    """Put ``payload`` where Ray would unpickle it; the path planted, relative to the experiment."""
    exp_dir = run_copy / EXPERIMENT
    trial = a_trial(exp_dir)
    if place == "search generator state":
        path = only(exp_dir, "search_gen_state-")
    elif place == "trial error.pkl":
        path = trial / "error.pkl"
    elif place == "checkpoint _dict_checkpoint.pkl":
        path = next(trial.glob("checkpoint_*")) / "_dict_checkpoint.pkl"
    elif place == "trial_metadata.json":
        path = trial / "trial_metadata.json"
    elif place == "repeats tuner.pkl":
        (exp_dir / "repeats").mkdir(exist_ok=True)
        (exp_dir / "repeats" / "experiment_state-2099-01-01_00-00-00.json").write_text("{}")
        path = exp_dir / "repeats" / "tuner.pkl"
    elif place == "repeats trial error.pkl":
        path = exp_dir / "repeats" / "0000-trial" / "error.pkl"
        path.parent.mkdir(parents=True)
    else:
        raise ValueError(place)
    path.write_bytes(payload)
    return path.relative_to(exp_dir).as_posix()


DEEP_PLACES = ["search generator state", "trial error.pkl", "checkpoint _dict_checkpoint.pkl", "trial_metadata.json",
               "repeats tuner.pkl", "repeats trial error.pkl"]  # fmt: skip


@pytest.mark.parametrize("place", DEEP_PLACES)
def test_a_pickle_planted_at_any_depth_never_runs_on_resume(run_copy, resume_here, tmp_path, place):
    marker = tmp_path / "pwned"
    planted = plant(run_copy, place, pickle.dumps(Planted(marker)))
    out = resume_here(run_copy)
    # refused at the first unsigned file: for the nested experiment, maybe the state planted with its tuner.pkl
    assert_refused(out, "repeats/" if place == "repeats tuner.pkl" else planted)
    assert not marker.exists()


@pytest.mark.parametrize("place", ["tuner.pkl", "searcher state", "experiment state", *DEEP_PLACES])
def test_a_pickle_planted_anywhere_never_runs_in_result_grid(run_copy, tmp_path, place):
    import tltune
    from tltune.errors import UserError

    marker = tmp_path / "pwned"
    payload = pickle.dumps(Planted(marker))
    exp_dir = run_copy / EXPERIMENT
    if place == "tuner.pkl":
        (exp_dir / "tuner.pkl").write_bytes(payload)
    elif place == "searcher state":
        only(exp_dir, "searcher-state-").write_bytes(payload)
    elif place == "experiment state":
        path = only(exp_dir, "experiment_state-")
        state = json.loads(path.read_text())
        state["stats"]["planted"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": payload.hex()}
        path.write_text(json.dumps(state))
    else:
        plant(run_copy, place, payload)
    experiment = tltune.load(run_copy)[EXPERIMENT]
    with pytest.raises(UserError) as refused:
        experiment.result_grid()
    assert str(refused.value).startswith("refusing to read ") and "\n" not in str(refused.value)
    assert not marker.exists()


def test_result_grid_of_a_run_tltune_made(run_copy):
    import tltune

    grid = tltune.load(run_copy)[EXPERIMENT].result_grid()
    assert len(grid) >= 1 and grid.num_errors == 0


def test_another_accounts_run_is_not_read_into_a_result_grid(run_copy, tmp_path, monkeypatch):
    import tltune
    from tltune.errors import UserError

    monkeypatch.setenv("TLTUNE_KEY_FILE", str(tmp_path / "no-key-here"))
    with pytest.raises(UserError, match="not created by tltune under this account"):
        tltune.load(run_copy)[EXPERIMENT].result_grid()


def test_best_and_report_unpickle_nothing(run_copy, tmp_path, capsys):
    """Pickles planted at every place at once: `tltune best` and `tltune report` read JSON only."""
    from tltune.command import main as tltune_main

    marker = tmp_path / "pwned"
    payload = pickle.dumps(Planted(marker))
    exp_dir = run_copy / EXPERIMENT
    (exp_dir / "tuner.pkl").write_bytes(payload)
    only(exp_dir, "searcher-state-").write_bytes(payload)
    for place in ["search generator state", "trial error.pkl", "checkpoint _dict_checkpoint.pkl", "trial_metadata.json"]:
        plant(run_copy, place, payload)
    for trial in exp_dir.iterdir():
        if (trial / "params.pkl").is_file():
            (trial / "params.pkl").write_bytes(payload)
    assert tltune_main(["best", str(run_copy)]) == 0
    assert tltune_main(["report", str(run_copy), "--out", str(tmp_path / "report")]) == 0
    assert not marker.exists()


def test_where_ray_may_unpickle():
    """Below the top: every pickle Ray reads back (a trial's error.pkl...), and JSON that may
    embed one; not the params.pkl Ray only writes, not hidden partial copies, not tltune's records."""
    assert trust.may_unpickle("t1/error.pkl") and trust.may_unpickle("t1/checkpoint_000001/_dict_checkpoint.pkl")
    assert trust.may_unpickle("t1/trial_metadata.json") and trust.may_unpickle("t1/search_gen_state-x.json")
    assert trust.may_unpickle("repeats/tuner.pkl") and trust.may_unpickle("repeats/basic-variant-state-x.json", {"", "repeats"})
    assert not trust.may_unpickle("t1/params.pkl") and not trust.may_unpickle("t1/params.json")
    assert not trust.may_unpickle("t1/result.json") and not trust.may_unpickle("t1/.abc-tmp-error.pkl")
    assert not trust.may_unpickle("repeats/tltune_signatures.jsonl") and not trust.may_unpickle("tltune_best.json")
