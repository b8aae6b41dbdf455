"""Red-team findings, the smaller classes (issue 20 items 6 and 7): no hangs, no orphans, and
one line instead of a traceback or a wrong word."""

import csv
import http.server
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, write_slow_spec
from tltune import command, trust
from tltune.cli import main
from tltune.errors import UserError
from tltune.raytune.address import check_reachable
from tltune.results import reference_cap_note


def test_an_address_where_a_non_ray_server_listens_is_one_line_at_once():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(UserError, match="but not a Ray cluster"):
        check_reachable(f"127.0.0.1:{server.server_port}")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    with pytest.raises(UserError, match="but not a Ray cluster"):
        check_reachable(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1)
    assert time.monotonic() - started < 30
    server.shutdown()


def test_a_fifo_named_like_a_result_file_is_skipped_not_waited_on(tmp_path):
    exp = tmp_path / "run" / "mnist-cnn"
    exp.mkdir(parents=True)
    (tmp_path / "run" / "runs.jsonl").write_text("{}\n")
    (exp / "tltune_experiment.json").write_text(json.dumps({"name": "mnist-cnn", "dataset": "mnist"}))
    os.mkfifo(exp / "tltune_best.json")
    trial = exp / "t1"
    trial.mkdir()
    os.mkfifo(trial / "params.json")
    out = subprocess.run([sys.executable, "-m", "tltune", "best", str(tmp_path / "run")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "not a regular file" in out.stderr


def test_a_key_file_that_is_a_directory_is_one_line_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLTUNE_KEY_FILE", str(tmp_path))
    code = main(["mnist-cnn"], "test", ["--storage-path", str(tmp_path / "results"), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is a directory" in err
    assert not (tmp_path / "results").exists()


def test_a_key_others_can_read_is_made_private(tmp_path, monkeypatch, capsys):
    key = tmp_path / "key"
    key.write_text("a" * 64)
    key.chmod(0o644)
    monkeypatch.setenv("TLTUNE_KEY_FILE", str(key))
    assert trust.signing_key() == b"a" * 64
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "it is now 600" in capsys.readouterr().err


def test_a_read_only_cache_is_one_line(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    monkeypatch.setenv("TLTUNE_CACHE_DIR", str(cache))
    if os.access(cache, os.W_OK):  # root writes anywhere: a file where the folder should be instead
        cache.chmod(0o700)
        monkeypatch.setenv("TLTUNE_CACHE_DIR", str(tmp_path / "file"))
        (tmp_path / "file").write_text("")
    code = main(["mnist-cnn"], "test", ["--storage-path", str(tmp_path / "results"), "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is not writable" in err and "TLTUNE_CACHE_DIR" in err and err.count("\n") == 1


def test_ctrl_c_in_report_is_exit_130_with_one_line(monkeypatch, capsys, tmp_path):
    import tltune.report

    def interrupted(paths, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(tltune.report, "write_report", interrupted)
    assert command.main(["report", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: tltune report stopped") and "\n" not in err


def test_the_reference_column_says_what_actually_ran():
    record = SimpleNamespace(reference={"optimizer": "adam", "lr": 0.001, "epochs": 5},
                             settings={"reference": {"optimizer": "adam", "lr": 1e-30, "epochs": 2}})  # fmt: skip
    note = reference_cap_note(SimpleNamespace(record=record))
    assert note == " (2 of 5 epochs: --max-epochs; lr=1e-30, not 0.001)"


@pytest.mark.slow
def test_tltune_run_after_the_callers_own_ray_init_uses_it(real_data_root, tmp_path, capsys):
    """A user model's code needs Ray to ship it: without it in that Ray's runtime environment, one
    line before anything runs (its trials could not import it). The sweep that runs on the
    caller's Ray is one whose trials all diverge: each stops with its reason, and the sweep and
    the analysis go on."""
    spec = write_slow_spec(tmp_path / "project", "mine", epochs=1, num_samples=1, seconds_per_batch=0)
    script = f"""
import os, ray, tltune
ray.init(address="local", include_dashboard=False)
run = tltune.run("mnist-cnn", quick=True, optimizer="sgd", activation="relu", lr=1e12, epochs=3, num_samples=2, max_concurrent_trials=1,
                 train_subset=300, test_subset=100, data_root={str(real_data_root)!r}, storage_path={str(tmp_path / "runs")!r}, name="nan")
assert run["mnist-cnn"].status == "all trials diverged", run["mnist-cnn"].status
assert ray.is_initialized(), "the caller's Ray is still there"
import sys  # and, while this driver ran a sweep: Tune's usage count of callback classes imported no tracker
assert not {{"mlflow", "wandb"}} & set(sys.modules), sorted(m for m in sys.modules if m.startswith(("mlflow", "wandb")))[:5]
try:
    tltune.run({str(spec)!r}, data_root={str(real_data_root)!r}, storage_path={str(tmp_path / "runs")!r})
    raise AssertionError("a user model on a Ray that does not ship it ran")
except tltune.UserError as exc:
    print(exc)
    assert "ray.init(runtime_env={{'py_modules': [" in str(exc) and "slownet.py" in str(exc), exc
assert len(os.listdir({str(tmp_path / "runs")!r})) == 1, "nothing written for the refused run"
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert_every_trial_diverged_and_the_analysis_says_so(tmp_path / "runs", tmp_path / "report", capsys)


def assert_every_trial_diverged_and_the_analysis_says_so(storage: Path, report_dir: Path, capsys) -> None:
    """The sweep above (lr 1e12, 2 trials of up to 3 epochs): each trial stopped at its first
    epoch with its reason, and the analysis scripts' own code (each script is one call of it)
    presents no diverged trial as the best."""
    exp_dir = storage / "nan" / "mnist-cnn"
    results = sorted(exp_dir.glob("*/result.json"))
    assert len(results) == 2, f"one result.json per trial (num_samples 2), found {[str(r) for r in results]}"
    for result in results:
        last = json.loads(result.read_text().splitlines()[-1])
        assert last["diverged"] is True and "learning rate is probably too high" in last["stop_reason"]
        assert last["training_iteration"] == 1, "a diverged trial stops at once instead of training on NaNs"
    capsys.readouterr()
    assert command.report_main([str(storage), "--out", str(report_dir)]) == 0, capsys.readouterr().err
    report_md = (report_dir / "report.md").read_text()
    assert "diverged: training loss became" in report_md
    assert "| all trials diverged |" in report_md, "no diverged trial is presented as the best"
    capsys.readouterr()
    assert command.best_main([str(storage / "nan")]) == 0
    assert "| MNIST | vanilla CNN | - | - | all diverged |" in capsys.readouterr().out
    assert command.best_main([str(storage / "nan"), "--trials", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 2
    assert all(row["stop_reason"] == "diverged" and row["epochs_run"] == "1" and row["last_val_acc"] == "" for row in rows), rows
