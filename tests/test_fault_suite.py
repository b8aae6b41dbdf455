"""kill -9, SIGINT and SIGTERM at several moments of a real two-experiment sweep, each followed
by --resume (which the next stop interrupts in turn): the interrupted run never looks finished,
the command says how to resume and exits 128 + signal, what ran is kept, and after the last
resume every trial appears once with every epoch once. After the first stop the run is moved
elsewhere, and resumes from there."""

import json
import os
import shutil
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
            "--grace-period", str(EPOCHS), "--max-concurrent-trials", "1", "--train-subset", "600", "--test-subset", "3000",
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
    if signum == signal.SIGKILL:  # Ray's reaper takes down what the killed driver started (its two agents
        time.sleep(2)  # notice within about 90 s); a signal the sweep handles leaves no Ray process at all:
        return code, "".join(lines)
    deadline = time.time() + 30  # Ray's workers may outlive their raylet by seconds on a busy machine
    while (left := subprocess.run(["pgrep", "-s", str(driver.pid)], capture_output=True, text=True).stdout.split()):
        if time.time() > deadline:
            break
        time.sleep(1)
    assert not left, f"{signal.Signals(signum).name}: Ray processes left behind after 30 s: {left}"
    return code, "".join(lines)


def trials(run_dir) -> dict[str, dict[str, list[int]]]:
    found = {}
    for experiment in EXPERIMENTS:
        found[experiment] = {}
        for result in (run_dir / experiment).glob("*/result.json"):
            rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
            found[experiment][result.parent.name] = [r["training_iteration"] for r in rows]
    return found


def assert_stopped(code: int, output: str, signum: int) -> None:
    """The command ended as a signal says: 128 + signal and one last line saying so (none for kill -9)."""
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
        return
    assert code == 128 + signum, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("interrupted (") and "Traceback" not in output and "SIGTERM received" not in output, output[-3000:]


# One run stopped at each moment in turn, each time by another signal, resumed after each stop:
# the first experiment's trials, its test, the second experiment starting (twice: as the first
# finishes, and as a resume starts it), then the second experiment's test. Each moment meets a
# graceful signal, and kill -9 where a kill can leave half-written state; every signal a sweep
# handles is used (SIGHUP: the terminal closed). No Ray process outlives a stop. (One chain, not
# two, and five stops, not six, each run costing a Ray start and its trial workers' imports: the
# second experiment's trials are not stopped part-way here, as the first's are; tests/test_s3_storage_sweep.py
# kills a sweep whose trials are part-way, and tests/test_cluster.py a node under one.)
STOPS = [("trial", signal.SIGINT), ("test", signal.SIGKILL), ("between", signal.SIGTERM), ("between", signal.SIGKILL),
         ("test", signal.SIGHUP)]  # fmt: skip


def test_a_sweep_stopped_again_and_again_resumes_to_every_trial_once(tmp_path, real_data_root, command):
    run_dir = tmp_path / "run"
    argv = sweep(tmp_path, real_data_root)
    before = {e: {} for e in EXPERIMENTS}
    for number, (moment, signum) in enumerate(STOPS):
        code, output = interrupt_at(argv, MOMENTS[moment], signum)
        assert_stopped(code, output, signum)
        assert f"--resume {run_dir}" in output or signum == signal.SIGKILL
        unfinished = [e for e in EXPERIMENTS if not (run_dir / e / "tltune_best.json").exists()]
        # the interrupted experiment is not marked finished, and the stops from the third on hit the second one
        assert unfinished == (EXPERIMENTS[1:] if number >= 2 else EXPERIMENTS), f"stop {number + 1}, at {moment}: {unfinished} unfinished"
        now = trials(run_dir)
        for experiment in EXPERIMENTS:  # what ran before this stop is kept as it was
            for trial, epochs in before[experiment].items():
                assert now[experiment][trial][: len(epochs)] == epochs, f"{trial}: {epochs} became {now[experiment][trial]}"
        before = now
        if number == 0:  # the run moves: a run tltune made (its signed state) resumes wherever it is copied
            moved = tmp_path / "moved" / "run"
            shutil.copytree(run_dir, moved)
            shutil.rmtree(run_dir)
            run_dir = moved
        argv = [sys.executable, str(ROOT / "sweeps" / "mnist.py"), "--resume", str(run_dir)]

    code, out, err = command("sweep", "--resume", str(run_dir))  # the last resume, unstopped, in this process
    assert code == 0, out[-3000:] + err[-3000:]
    after = trials(run_dir)
    for experiment in EXPERIMENTS:
        summary = json.loads((run_dir / experiment / "tltune_best.json").read_text())
        assert summary["trials"] == SAMPLES and "test_acc" in summary, experiment
        assert len(after[experiment]) == SAMPLES, f"{experiment}: every trial exactly once"
        for trial, epochs in after[experiment].items():
            assert epochs == list(range(1, len(epochs) + 1)), f"{trial}: no epoch reported twice or skipped: {epochs}"
            assert epochs[: len(before[experiment].get(trial, []))] == before[experiment].get(trial, [])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda v: v.name)
def test_a_sweep_stopped_while_its_data_loads_writes_nothing(tmp_path, real_data_root, signum):
    code, output = interrupt_at(sweep(tmp_path, real_data_root), MOMENTS["data"], signum)
    assert_stopped(code, output, signum)
    assert not (tmp_path / "run").exists() and "nothing was written" in output
