"""bench/gpu_memory.py and bench/first_gpu_run.py on the CPU (--smoke): the wiring of the first
GPU run, and the arithmetic of how many trials fit on a card."""

import contextlib
import io
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from tltune.specs import builtin_experiments

sys.path.insert(0, str(ROOT / "bench"))
import first_gpu_run  # bench/ is no package
import gpu_memory

GIB = 2**30
# Stands in for nvidia-smi: the sampler's readings every 0.1 s, and gpu.py's driver version.
FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *-lms*) while true; do echo "2026/01/01 00:00:00.000, 37, 1234, 16384, 70.5"; sleep 0.1; done ;;
  *driver_version*) echo "999.99" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The smoke runs: first_gpu_run.py's (whose part 2 is gpu_memory.py's smoke run) and
    first_gpu_run.py without --smoke on a machine without CUDA, at once as interpreters of their
    own (each is mostly a single-threaded import); gpu_memory.py's --estimate --smoke and
    gpu_memory.py without --smoke on a machine without CUDA in this process, while they run:
    {name: (completed process, its folder)}."""
    tmp = tmp_path_factory.mktemp("first-gpu-run")
    fake = tmp / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (fake / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # the CPU, even on a GPU machine; the runs share it
    env.pop("TLTUNE_DATA_ROOT", None)  # bench/gpu.py's smoke part on synthetic images of CIFAR-10's shape
    (tmp / "cache").mkdir()
    smoke_env = {**env, "PATH": f"{fake}{os.pathsep}{env['PATH']}", "TLTUNE_CACHE_DIR": str(tmp / "cache")}
    runs = {
        "first_gpu_run": (["first_gpu_run.py", "--smoke", "--out", str(tmp / "out")], smoke_env),
        "no_cuda": (["first_gpu_run.py", "--out", str(tmp / "no-cuda")], env),
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / argv[0]), *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env
        )
        for name, (argv, run_env) in runs.items()
    }
    done = {
        "gpu_memory_no_cuda": (in_this_process(gpu_memory.main, ["gpu_memory.py", "--out", str(tmp / "no-cuda.md")]), tmp),
        "gpu_memory_estimate": (in_this_process(gpu_memory.main, ["gpu_memory.py", "--estimate", "--smoke", "--out", str(tmp / "estimate.md")]), tmp),
    }
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), tmp)
    return done


def in_this_process(main, argv: list[str]) -> subprocess.CompletedProcess:
    """A bench script's ``main()`` run here as ``python ARGV`` would run it on a machine without CUDA."""
    import torch

    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.setattr(sys, "argv", argv)
        patch.setattr(torch.cuda, "is_available", lambda: False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 for the runs beside it
        try:
            code = main()
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def table_rows(text: str) -> list[str]:
    """The data rows of gpu_memory.py's markdown table (the first table after its heading)."""
    lines = text[text.index("### GPU memory per trial") :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| experiment(s) |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


def check_table(text: str) -> None:
    """Every built-in experiment has a row, and none is measured on the CPU."""
    rows = table_rows(text)
    listed = {name for row in rows for name in row.split(" | ")[0].removeprefix("| ").split(", ")}
    assert listed == set(builtin_experiments()[0]), listed
    assert all(row.count(gpu_memory.NOT_MEASURED) == 2 for row in rows), rows
    assert "feature-cache build" in text and "trial on cached alexnet features (4,096 float16 per image)" in text


@pytest.mark.slow  # first_gpu_run.py twice and its three parts, about a minute on 2 cores
def test_gpu_memory_smoke_runs_every_row_and_writes_the_table(smoke_runs):
    out, tmp = smoke_runs["first_gpu_run"]  # its part 2 is `gpu_memory.py --smoke --out FILE`
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    part = out.stdout[out.stdout.index("## GPU memory per trial") :]
    assert "FAILED" not in part
    check_table(part)
    (written,) = [path.read_text() for path in (tmp / "out").glob("*-gpu-memory.md")]
    assert written.startswith("### GPU memory per trial: CPU smoke run") and written.strip() in out.stdout
    check_table(written)


@pytest.mark.slow  # first_gpu_run.py twice and its three parts, about a minute on 2 cores
def test_first_gpu_run_smoke_writes_everything_to_one_file(smoke_runs):
    out, tmp = smoke_runs["first_gpu_run"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (path,) = (tmp / "out").glob("*.txt")
    assert path.name.startswith("first-gpu-run-cpu-smoke-") and path.suffix == ".txt"
    assert out.stdout.strip().splitlines()[-1] == f"written to {path.resolve()}"
    text = path.read_text()
    assert text.startswith(out.stdout.rstrip("\n").rsplit("\n", 1)[0].splitlines()[0])  # the first line printed heads the file
    assert "driver 999.99" in text  # the machine first, through bench/gpu.py's environment()
    check_table(text)
    assert "SMOKE  feature-cache build" in text  # bench/gpu.py --smoke ran
    summary = text[text.index("## summary") :]
    for part in ("machine", "GPU memory per trial", "GPU benchmark, CPU smoke"):
        assert f"| {part} | passed |" in summary, summary
    assert "| 1234 | 37 / 37 |" in summary, summary  # the sampler's peak memory.used, mean / max utilization.gpu
    assert "## nvidia-smi samples" in text and "every part ran and passed: exit code 0" in text


@pytest.mark.slow  # first_gpu_run.py twice and its three parts, about a minute on 2 cores
def test_gpu_bench_smoke_runs_on_the_cpu(smoke_runs):
    """bench/gpu.py --smoke, every part of it, as first_gpu_run.py's last part runs it."""
    out, tmp = smoke_runs["first_gpu_run"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    part = out.stdout[out.stdout.index("## GPU benchmark, CPU smoke: python bench/gpu.py --smoke (") :]
    lines = part.splitlines()[1:]
    assert lines[0].startswith("driver ") and "torch" in lines[0] and "CUDA" in lines[0], "the machine first"
    assert lines[1].startswith("torch's CUDA architectures: ")
    assert any(line.startswith("INFO  AlexNet-64 train") and "true fp32 (TF32 off)" in line for line in lines), part
    for name in ("AlexNet-64 train", "feature-cache build", "small-CNN aggregate throughput, 2 concurrent trials / 1"):
        assert any(line.startswith("SMOKE  " + name) for line in lines), (name, part)
    assert any(line.startswith(("PASS  bench wall time", "FAIL  bench wall time")) for line in lines), part  # timing: a verdict, not a test
    assert not any(line.startswith("FAIL") and "wall time" not in line for line in lines), part
    assert list((tmp / "cache").iterdir()) == [], "the bench builds its feature cache in a temporary folder"


@pytest.mark.slow  # first_gpu_run.py twice and its three parts, about a minute on 2 cores
@pytest.mark.parametrize("run", ["no_cuda", "gpu_memory_no_cuda"])
def test_without_cuda_one_line_and_exit_code_2(smoke_runs, run):
    out, tmp = smoke_runs[run]
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: no CUDA GPU is visible"), out.stderr
    assert not (tmp / "no-cuda").exists() and not (tmp / "no-cuda.md").exists()


def test_a_part_over_its_cap_is_stopped_and_the_others_are_told(tmp_path):
    log = first_gpu_run.Log()
    log.open(tmp_path / "run.txt")
    argv = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    part = first_gpu_run.Part("sleeper", argv, 2, dict(os.environ))
    part.run(log, hard_end=time.monotonic() + 20)
    assert part.over_cap and part.result() == (False, "stopped at its 2s cap")
    assert part.returncode != 0 and "started" in (tmp_path / "run.txt").read_text()


def test_skipped_gpu_tests_are_not_a_pass():
    part = first_gpu_run.Part("GPU tests", [], 60, {})
    part.returncode, part.lines = 0, ["SKIPPED [2] tests/test_gpu.py:22: real datasets not available", "==== 5 passed, 2 skipped in 80.1s ===="]
    assert part.result() == (False, "exit code 0 but 2 test(s) skipped (the reasons are above)")
    part.lines = ["==== 7 passed in 80.1s ===="]
    assert part.result() == (True, "passed")


def test_trials_that_fit_on_a_card_leave_ten_percent_free():
    # 16 GB less 10% is 14.4 GiB: four 3.2 GiB trials (12.8), not five (16), at 0.25 GPU each
    assert gpu_memory.fit_on_card(3.2 * GIB, 16) == (4, 0.25)
    assert gpu_memory.fit_on_card(7 * GIB, 16) == (2, 0.5)
    assert gpu_memory.fit_on_card(15 * GIB, 16) == (0, None)
    assert gpu_memory.fit_on_card(15 * GIB, 24) == (1, 1.0)
    assert gpu_memory.fit_on_card(0.5 * GIB, 80) == (144, 0.0069)
    assert gpu_memory.card_cell(3.2 * GIB, 16) == "4 at 0.25" and gpu_memory.card_cell(20 * GIB, 16) == "does not fit"


def test_the_fraction_packs_exactly_the_trials_that_fit():
    assert [gpu_memory.safe_fraction(n) for n in (1, 2, 3, 4, 6, 8, 13)] == [1.0, 0.5, 0.33, 0.25, 0.16, 0.125, 0.076]
    for trials in range(1, 1000):
        fraction = gpu_memory.safe_fraction(trials)
        packed = gpu_memory.trials_per_gpu(fraction)
        assert packed == trials if trials <= 100 else packed <= trials, (trials, packed)  # over 100, 1/10000ths cannot say every count
        assert gpu_memory.trials_per_gpu(fraction - 1 / gpu_memory.RESOURCE_UNITS) > trials or packed == trials, trials  # the most it can


def test_the_table_of_measured_rows():
    row = {
        "experiments": ["cifar10-cnn-search", "other"], "task": "trial", "trains": "all", "dataset": "cifar10", "model": "cnn", "size": 32,
        "channels": 3, "splits": {"train": 45000, "val": 5000, "test": 10000},
        "config": {"width": 1, "depth": 2, "batch_norm": False, "augmentation": "none", "batch_size": 64, "optimizer": "adam"},
    }  # fmt: skip
    measured = {"allocated": 1 * GIB, "reserved": 1.5 * GIB, "reserved_now": 1.25 * GIB, "gpu_used_now": 9 * GIB, "nvidia_smi_mib": 3 * 1024}
    # whole process: nvidia-smi's 3 GiB now, plus the 0.25 GiB reserved at the peak and given back since
    assert gpu_memory.process_bytes(measured, used_before=5 * GIB) == (3.25 * GIB, "nvidia-smi")
    # where nvidia-smi does not see the process: the GPU's used memory around it
    assert gpu_memory.process_bytes({**measured, "nvidia_smi_mib": None}, used_before=5 * GIB) == (4.25 * GIB, "mem_get_info")
    measured["process"], measured["source"] = gpu_memory.process_bytes(measured, 5 * GIB)
    failed = {"error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    text = gpu_memory.table([row, row], [measured, failed], "NVIDIA H200, 2026-01-01", smoke=False)
    assert text.startswith("### GPU memory per trial: NVIDIA H200, 2026-01-01\n")
    lines = text.splitlines()
    assert lines[-2] == (
        "| cifar10-cnn-search, other | trial: cnn at 32 px x 3, width 1, depth 2, every layer trains, batch 64, adam; cifar10: "
        "45,000 train + 5,000 val images on the device | 3.25 (nvidia-smi) | 1.00 / 1.50 | 4 at 0.25 | 6 at 0.16 | 11 at 0.09 | 22 at 0.045 |"
    )
    assert lines[-1].endswith("| failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB | - | - | - | - | - |")


def test_the_estimate_adds_the_allowance_to_the_larger_batch():
    mib = 2**20
    trial = {
        "model": 100 * mib, "grads": 100 * mib, "optimizer": 200 * mib, "data": 150 * mib, "batch": 40 * mib,
        "activations": {"fp32": 200 * mib, "bf16": 260 * mib}, "eval": 60 * mib,
    }  # fmt: skip
    # the fixed 550 MiB, and bf16's 260 saved for backward beside its 40 MiB batch (more than fp32's, more than evaluation's 60)
    assert gpu_memory.estimated_tensors(trial) == 850 * mib and gpu_memory.estimated_tensors(trial, "fp32") == 790 * mib
    assert gpu_memory.estimated_tensors({**trial, "eval": 500 * mib}) == 1050 * mib
    assert gpu_memory.estimated_bytes(trial) == 850 * mib * 1.1 + 0.6 * GIB
    # a feature-cache build: both copies of the features at the end, or the features beside a batch's forward
    build = {"model": 200 * mib, "batch": 150 * mib, "eval": 400 * mib, "features": 500 * mib}
    assert gpu_memory.estimated_tensors(build) == 1250 * mib
    assert gpu_memory.estimated_tensors({**build, "features": 600 * mib}) == 1400 * mib


def check_estimate(text: str, experiments: set[str]) -> None:
    """gpu_memory.py --estimate --smoke's table: a row per experiment, the caption says what it is."""
    assert text.startswith("### GPU memory per trial: estimated on the CPU from tensor sizes, not measured on a GPU (")
    assert "--smoke: tiny sizes, not the real figures" in text.splitlines()[0]
    caption = text.splitlines()[2]
    assert "0.6 GiB per trial for the CUDA context and cuDNN's and cuBLAS's workspaces, plus 10% of the tensors" in caption
    assert "`python bench/gpu_memory.py --estimate`" in caption
    rows = table_rows(text)
    listed = {name for row in rows for name in row.split(" | ")[0].removeprefix("| ").split(", ")}
    assert listed == experiments, listed
    for row in rows:
        cells = row.removesuffix(" |").split(" | ")
        trial_gib = float(cells[2])
        assert trial_gib >= 0.6, row  # the allowance at least
        # the cards' columns as for a measurement, of the figure before it was rounded to 0.01 GiB
        near = [[gpu_memory.card_cell((trial_gib + d) * GIB, gb) for gb in gpu_memory.CARDS_GB] for d in (-0.005, 0, 0.005)]
        assert cells[4:] in near, row


def test_the_estimate_on_the_cpu_says_it_is_not_measured(tmp_path, capsys, monkeypatch):
    # --estimate --smoke in this process, on CIFAR-10's rows (every kind: AlexNet trained whole, its feature-cache
    # build and the trial on its features, the CNN, and the CNN with BatchNorm, AdamW and flip + crop); the
    # slow test below runs every row
    every_row = gpu_memory.plan_rows()
    assert {name for row in every_row for name in row["experiments"]} == set(builtin_experiments()[0])
    rows = [row for row in every_row if row["dataset"] == "cifar10"]
    monkeypatch.setattr(gpu_memory, "plan_rows", lambda: rows)
    assert gpu_memory.estimate(smoke=True, out=str(tmp_path / "estimate.md")) == 0
    printed = capsys.readouterr().out
    assert "FAILED" not in printed
    text = (tmp_path / "estimate.md").read_text()
    assert text in printed
    check_estimate(text, {name for row in rows for name in row["experiments"]})
    assert len(table_rows(text)) == 5
    # AlexNet as it is, whatever the image size: 57M parameters in fp32, as many gradients, Adam's two states
    (finetune,) = [row for row in table_rows(text) if row.startswith("| cifar10-alexnet-finetune |")]
    assert "| 218 + 218 + 435; " in finetune, finetune
    assert "trial on cached alexnet features (4,096 float16 per image)" in text
    assert "the float16 features of 45,000 images held on the device" in text and "twice at the end" in text  # the build
    assert "width 2, depth 3, BatchNorm, every layer trains, batch 256, adamw, flip_crop" in text


@pytest.mark.slow  # first_gpu_run.py twice and its three parts, about a minute on 2 cores
def test_the_estimate_smoke_runs_every_row(smoke_runs):
    out, tmp = smoke_runs["gpu_memory_estimate"]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAILED" not in out.stdout
    text = (tmp / "estimate.md").read_text()
    assert text in out.stdout
    check_estimate(text, set(builtin_experiments()[0]))
    assert len(table_rows(text)) == len(gpu_memory.plan_rows())
