"""The quick sweeps end to end on a CUDA GPU, and bench/gpu.py there. Skipped without a GPU;
on one GPU the whole module takes at most 8 minutes:

    python -m pytest -m gpu tests/test_gpu.py

1. The small-CNN search with --gpus-per-trial 0.25: several trials train on one GPU at the
   same time, in bf16 (--precision auto) on a GPU of compute capability 8.0+, else fp16.
2. AlexNet fine-tuning and feature extraction at 224 px, one GPU per trial (the default where
   the machine has a GPU), the feature cache built by a task holding that GPU.
3. bench/gpu.py on the GPU (its AlexNet, feature-cache and concurrent-trials parts; --compile,
   the least predictable, is left to the full `python bench/gpu.py`): it runs, exit code 0.

Every sweep runs as a user runs it (`python -m tltune sweep cifar10 --quick ...`, a local Ray)
on the real CIFAR-10 (conftest's ``real_data_root``), and is read back from its run directory.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from conftest import ROOT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (python -m pytest -m gpu tests/test_gpu.py on a GPU machine)"),
]

# The module's wall-time budget: 8 minutes, less pytest's own start. Each command gets what is
# left of it (at most its own cap), so an overrun fails here instead of running on.
# $TLTUNE_GPU_TEST_BUDGET_S overrides it (bench/first_gpu_run.py gives the module what is left of its 8 minutes).
BUDGET_S = int(os.environ.get("TLTUNE_GPU_TEST_BUDGET_S", "465"))
_clock: dict[str, float] = {}


def seconds_left(cap: float) -> float:
    started = _clock.setdefault("started", time.monotonic())
    left = BUDGET_S - (time.monotonic() - started)
    if left < 30:
        pytest.fail(f"the module's {BUDGET_S}s budget is spent ({left:.0f}s left)")
    return min(cap, left)


def run(argv: list[str], cap: float, cwd: Path) -> tuple[str, float]:
    """Run a command to its end within the budget; (stdout, seconds). A command over its time
    gets SIGTERM first (a sweep then stops its trials and Ray), SIGKILL 30 s later."""
    timeout = seconds_left(cap)
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)  # a local Ray, started and stopped by the command
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(argv[1:4])}... ran over {timeout:.0f}s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    seconds = time.monotonic() - started
    print(f"{' '.join(map(str, argv[1:]))}\n  -> exit code {process.returncode} in {seconds:.0f}s")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout, seconds


def sweep(tmp: Path, name: str, data_root: Path, *flags: str, cap: float) -> tuple[Path, str]:
    """``tltune sweep cifar10 --quick`` with these flags; (its run directory, its stdout)."""
    argv = [
        sys.executable, "-m", "tltune", "sweep", "cifar10", "--quick", *flags,
        "--data-root", str(data_root), "--storage-path", str(tmp / "results"), "--name", name,
    ]  # fmt: skip
    stdout, _ = run(argv, cap, tmp)
    return tmp / "results" / name, stdout


# ---------------------------------------------------------------------------- results


def record(run_dir: Path, experiment: str) -> dict:
    """The experiment's settings as the sweep recorded them (after sizing the trials)."""
    return json.loads((run_dir / experiment / "tltune_experiment.json").read_text())["settings"]


def summary(run_dir: Path, experiment: str) -> dict:
    return json.loads((run_dir / experiment / "tltune_best.json").read_text())


def trials(run_dir: Path, experiment: str) -> dict[str, list[dict]]:
    """Trial directory name -> its per-epoch results (Tune's result.json)."""
    found = {}
    for result in sorted((run_dir / experiment).glob("*/result.json")):
        found[result.parent.name] = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return found


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals that hold one instant in common."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])  # an end before a start at a tie
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def trained(rows: list[dict]) -> list[dict]:
    """The epochs a trial trained to the end (a diverged epoch reports only that it diverged)."""
    return [r for r in rows if not r.get("diverged")]


def trials_at_once_per_gpu(rows_of: dict[str, list[dict]]) -> dict[tuple[str, str], int]:
    """(node, GPU ids) -> the most trials that trained there at one time, each trial from its
    start to its last report."""
    intervals: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rows in filter(None, map(trained, rows_of.values())):
        where = (rows[0]["node_id"], rows[0]["gpu_ids"])
        intervals.setdefault(where, []).append((min(r["started_at"] for r in rows), max(r["reported_at"] for r in rows)))
    return {where: most_at_once(spans) for where, spans in intervals.items()}


def expected_auto_precision() -> str:
    """What --precision auto becomes on this machine's GPU: bf16 from compute capability 8.0 on."""
    return "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"


def check_trained_on_a_gpu(rows_of: dict[str, list[dict]], count: int) -> None:
    """``count`` trials, each reporting every epoch; every epoch trained on a GPU Ray gave the
    trial, in the precision --precision auto means there."""
    assert len(rows_of) == count, sorted(rows_of)
    precision = expected_auto_precision()
    for name, rows in rows_of.items():
        assert rows and [r["epoch"] for r in rows] == list(range(1, len(rows) + 1)), name
        assert all(0 <= r["val_acc"] <= 1 for r in rows), name
        for r in trained(rows):
            assert r["gpu_ids"], f"{name} had no GPU from Ray (epoch {r['epoch']})"
            assert r["precision_used"] == precision, (name, r["epoch"], r["precision_used"])
    assert sum(map(len, map(trained, rows_of.values()))) >= count, "most epochs trained (few diverged)"


# ---------------------------------------------------------------------------- 1. small CNN, 4 trials per GPU


@pytest.fixture(scope="module")
def cnn_search(tmp_path_factory, real_data_root):
    tmp = tmp_path_factory.mktemp("gpu-cnn")
    flags = ["--experiments", "cifar10-cnn-search", "--gpus-per-trial", "0.25", "--precision", "auto"]
    return sweep(tmp, "cnn", real_data_root, *flags, cap=150)


def test_fractional_gpu_trials_share_the_gpu_at_the_same_time(cnn_search):
    run_dir, _ = cnn_search
    settings = record(run_dir, "cifar10-cnn-search")
    assert settings["gpus_per_trial"] == 0.25 and settings["max_concurrent_trials"] >= 2, settings
    rows_of = trials(run_dir, "cifar10-cnn-search")
    check_trained_on_a_gpu(rows_of, settings["num_samples"])
    at_once = trials_at_once_per_gpu(rows_of)
    print(f"most trials training at once per (node, GPU): {at_once}")
    assert max(at_once.values()) >= 2, f"no two trials trained on one GPU at the same time: {at_once}"


def test_auto_precision_on_the_gpu_is_bf16_from_compute_capability_8(cnn_search):
    run_dir, _ = cnn_search
    rows_of = trials(run_dir, "cifar10-cnn-search")
    used = {r["precision_used"] for rows in rows_of.values() for r in trained(rows)}
    assert {r["config"]["precision"] for rows in rows_of.values() for r in rows} == {"auto"}
    if torch.cuda.get_device_capability(0) >= (8, 0):
        assert used == {"bf16"}, used
    else:
        assert used == {"fp16"}, used  # no bf16 before Ampere: fp16 with loss scaling


def test_the_search_learns_and_is_tested(cnn_search):
    run_dir, _ = cnn_search
    best = summary(run_dir, "cifar10-cnn-search")
    assert best["trials"] == record(run_dir, "cifar10-cnn-search")["num_samples"] and best["errored_trials"] == 0
    assert best["test_images"] == 2000  # --quick's test subset
    assert 0.2 < best["test_acc"] <= 1, "a small CNN learns CIFAR-10 well above chance (10%)"


# ---------------------------------------------------------------------------- 2. AlexNet at 224 px


@pytest.fixture(scope="module")
def alexnet(tmp_path_factory, real_data_root):
    tmp = tmp_path_factory.mktemp("gpu-alexnet")
    weights = tmp / "alexnet.pth"  # no ImageNet weights offline: random ones, through the same --weights path
    torch.save(torchvision.models.alexnet().state_dict(), weights)
    features = Path(os.environ["TLTUNE_CACHE_DIR"]) / "features"  # conftest's empty cache of this session
    before = set(features.glob("*.npz"))
    flags = [
        "--experiments", "cifar10-alexnet-finetune", "cifar10-alexnet-feature_extract",
        "--image-size", "224", "--weights", str(weights), "--num-samples", "3", "--max-epochs", "2",
    ]  # fmt: skip
    run_dir, stdout = sweep(tmp, "alexnet", real_data_root, *flags, cap=210)
    return run_dir, stdout, sorted(set(features.glob("*.npz")) - before)


@pytest.mark.parametrize("experiment", ["cifar10-alexnet-finetune", "cifar10-alexnet-feature_extract"])
def test_alexnet_trains_at_224_px_one_gpu_per_trial(alexnet, experiment):
    run_dir, _, _ = alexnet
    settings = record(run_dir, experiment)
    assert settings["image_size"] == 224
    assert settings["gpus_per_trial"] == 1, "where the machine has a GPU, a trial gets one by default"
    rows_of = trials(run_dir, experiment)
    check_trained_on_a_gpu(rows_of, 3)
    assert {rows[0]["config"]["image_size"] for rows in rows_of.values()} == {224}
    best = summary(run_dir, experiment)
    assert best["test_images"] == 2000 and 0 <= best["test_acc"] <= 1


def test_the_feature_cache_is_built_on_the_gpu_at_224_px(alexnet):
    run_dir, stdout, new_caches = alexnet
    settings = record(run_dir, "cifar10-alexnet-feature_extract")
    # The cache is built by one Ray task with a trial's resources: this GPU (the trials above show Ray gives it).
    assert settings["cached_features"] and settings["gpus_per_trial"] == 1, settings
    assert "backbone features ready in" in stdout
    assert len(new_caches) == 1, new_caches  # built by this sweep, once, for the feature-extraction experiment
    with np.load(new_caches[0]) as cache:
        shapes = {name: cache[name].shape for name in ("train", "val", "test")}
        assert all(cache[name].dtype == np.float16 for name in shapes)
    assert shapes["test"][0] == 2000 and shapes["train"][0] > shapes["val"][0] > 0, shapes  # --quick's subsets
    assert len({width for _, width in shapes.values()}) == 1 and shapes["train"][1] > 1000, shapes  # AlexNet's backbone
    assert settings["reference"]["precision"] == "auto"


# ---------------------------------------------------------------------------- 3. bench/gpu.py


def test_gpu_bench_runs_on_the_gpu(tmp_path, request):
    try:
        data = ["--data-root", str(request.getfixturevalue("real_data_root"))]
    except pytest.skip.Exception:
        data = []  # the bench's synthetic images of CIFAR-10's shape
    argv = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--only", "alexnet", "features", "concurrency", *data]
    stdout, _ = run(argv, 300, tmp_path)
    lines = stdout.splitlines()
    print("\n".join(line for line in lines if line.startswith(("driver", "GPU ", "PASS", "FAIL", "INFO"))))
    assert lines[0].startswith("driver ") and "CUDA" in lines[0] and lines[1].startswith("torch's CUDA architectures: sm_")
    assert any(line.startswith("GPU 0: ") for line in lines), "the machine comes first: driver, architectures, each GPU"
    assert any(line.startswith("INFO  AlexNet-224 train, batch 256") and "true fp32" in line for line in lines), "the TF32-off row"
    for name in ("AlexNet-224 train, batch 256", "feature-cache build, 60000 images at 224 px", "small-CNN aggregate throughput, 8 concurrent trials / 1"):
        assert any(line.startswith(("PASS  " + name, "FAIL  " + name)) for line in lines), (name, stdout[-3000:])
    assert not any("crashed" in line for line in lines), stdout[-3000:]
