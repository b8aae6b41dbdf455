"""kill -9, SIGINT and SIGTERM at several moments of a real two-experiment sweep, each followed
by --resume: the interrupted run never looks finished, the command says how to resume and
exits 128 + signal, and after the resume every trial appears once with every epoch once."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

EXPERIMENTS = ["mnist-cnn", "mnist-alexnet-feature_extract"]
SAMPLES, EPOCHS = 3, 2
MOMENTS = {  # a line of the sweep's output, and the moment it marks
    "data": "mnist: loading",  # decoding the dataset, before Ray starts
    "trial": "epoch 1/",  # trials part-way
    "test": "testing the best trial",  # the first experiment's best trial on the test split
    "between": "== mnist-alexnet-feature_extract",  # the second experiment starting (its backbone features)
}


def sweep(tmp_path, data_root, *extra):
    return [sys.executable, str(ROOT / "sweeps" / "mnist.py"), "--quick", "--experiments", *EXPERIMENTS, "--weights", "none",
            "--num-samples", str(SAMPLES), "--max-epochs", str(EPOCHS), "--epochs-range", str(EPOCHS), str(EPOCHS),
            "--grace-period", str(EPOCHS), "--train-subset", "600", "--test-subset", "3000",
            "--data-root", str(data_root), "--storage-path", str(tmp_path), "--name", "run", *extra]  # fmt: skip


def interrupt_at(argv, marker: str, signum: int) -> tuple[int, str]:
    """Run ``argv``, send ``signum`` to the driver when ``marker`` is printed; (exit code, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines, seen = [], threading.Event()

    def read():
        for line in driver.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    assert seen.wait(300), f"never printed {marker!r}:\n" + "".join(lines)[-3000:]
    os.kill(driver.pid, signum)
    code = driver.wait(timeout=300)
    if signum == signal.SIGKILL:
        time.sleep(2)  # Ray's reaper takes down what the killed driver started
    time.sleep(0.5)
    return code, "".join(lines)


def trials(run_dir) -> dict[str, dict[str, list[int]]]:
    found = {}
    for experiment in EXPERIMENTS:
        found[experiment] = {}
        for result in (run_dir / experiment).glob("*/result.json"):
            rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
            found[experiment][result.parent.name] = [r["training_iteration"] for r in rows]
    return found


@pytest.mark.parametrize(
    "moment, signum",
    [
        ("data", signal.SIGINT),
        ("data", signal.SIGTERM),
        ("trial", signal.SIGINT),
        ("trial", signal.SIGTERM),
        ("test", signal.SIGINT),
        ("test", signal.SIGKILL),
        ("between", signal.SIGTERM),
        ("between", signal.SIGKILL),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v,
)
def test_interrupted_sweep_resumes_to_every_trial_once(tmp_path, real_data_root, moment, signum):
    run_dir = tmp_path / "run"
    code, output = interrupt_at(sweep(tmp_path, real_data_root), MOMENTS[moment], signum)
    if signum != signal.SIGKILL:
        assert code == 128 + signum, output[-3000:]
        last = output.strip().splitlines()[-1]
        assert last.startswith("interrupted (") and "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]
    else:
        assert code == -signal.SIGKILL
    if moment == "data":  # nothing was written: there is nothing to resume
        assert not run_dir.exists() and "nothing was written" in output
        return
    assert f"--resume {run_dir}" in output or signum == signal.SIGKILL
    unfinished = [e for e in EXPERIMENTS if not (run_dir / e / "tltune_best.json").exists()]
    assert unfinished, "the interrupted experiment is not marked finished"
    before = trials(run_dir)

    resumed = subprocess.run([sys.executable, str(ROOT / "sweeps" / "mnist.py"), "--resume", str(run_dir)],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = trials(run_dir)
    for experiment in EXPERIMENTS:
        summary = json.loads((run_dir / experiment / "tltune_best.json").read_text())
        assert summary["trials"] == SAMPLES and "test_acc" in summary, experiment
        assert len(after[experiment]) == SAMPLES, f"{experiment}: every trial exactly once"
        for trial, epochs in after[experiment].items():
            assert epochs == list(range(1, len(epochs) + 1)), f"{trial}: no epoch reported twice or skipped: {epochs}"
            assert epochs[: len(before[experiment].get(trial, []))] == before[experiment].get(trial, [])
