"""sweeps/all.py's mode: one run directory, finished experiments skipped, missing data skipped."""

import urllib.request

import pytest

from tltune.cli import main


@pytest.mark.slow  # a real sweep of its own (README test command: 5 minutes)
def test_all_skips_missing_data_and_finished_experiments(tmp_path, real_data_root, capsys, monkeypatch):
    """sweeps/all.py's call, in this process, twice; a download would meet a closed port."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "MNIST").symlink_to(real_data_root / "MNIST")  # no SVHN here, and no network
    # (not HOME: this process's Ray keeps its token under the HOME it started with, ~/.ray/auth_token,
    # and a Ray started under another one finds none; conftest keeps tltune's files out of HOME)
    for name, value in {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    # urlopen's shared opener keeps the proxies it was built under: later tests of this process get a fresh one
    monkeypatch.setattr(urllib.request, "_opener", None)
    argv = ["--quick", "--num-samples", "1", "--max-epochs", "1", "--train-subset", "300", "--test-subset", "100",
            "--data-root", str(data), "--storage-path", str(tmp_path / "results")]  # fmt: skip

    def run_all():
        code = main(["mnist-cnn", "svhn-cnn"], "all", argv, run_all=True)
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = run_all()
    assert code == 0, out[-2000:] + err[-2000:]
    assert "warning: skipping the svhn experiments" in err
    run_dir = tmp_path / "results" / "all"
    assert (run_dir / "mnist-cnn" / "tltune_best.json").is_file() and not (run_dir / "svhn-cnn").exists()
    (run_dir / "svhn-cnn").mkdir()  # an interrupted experiment is set aside, never deleted
    (run_dir / "svhn-cnn" / "tltune_experiment.json").write_text("{}")
    code, out, err = run_all()
    assert code == 0, err[-2000:]
    assert "mnist-cnn: finished in" in out and "nothing to run" in out
    assert "Best configuration of each experiment" in out and "| MNIST | vanilla CNN" in out, out
    assert list(run_dir.glob("svhn-cnn.interrupted-*/tltune_experiment.json"))
    assert len((run_dir / "runs.jsonl").read_text().splitlines()) == 1, "only invocations that ran something write"
