"""The first run on a GPU machine, in one command and at most 8 minutes, its figures in one file:

    python bench/first_gpu_run.py [--data-root DIR] [--out DIR]
    python bench/first_gpu_run.py --smoke [--out DIR]   # the parts' CPU versions, about a minute: the wiring works (tests run it)

On one GPU (the first of CUDA_VISIBLE_DEVICES, else GPU 0, numbered as nvidia-smi numbers
them), in this order, each part capped by what is left of the 480 s:

1. the machine: driver, torch, CUDA, cuDNN, the GPU (bench/gpu.py's environment());
2. python bench/gpu_memory.py: the GPU memory one trial of each built-in experiment needs, and
   how many trials fit on a 16, 24, 40 or 80 GB card (about 90 s); its table also goes to a file
   of its own beside the run's (the same name, ending in -gpu-memory.md), ready for the README;
3. python -m pytest -m gpu tests/test_gpu.py -s: the --quick sweeps on the GPU (the small CNN
   at --gpus-per-trial 0.25, AlexNet at 224 px with its feature cache built on the GPU) and
   bench/gpu.py (AlexNet's precisions, the feature-cache build, concurrent trials); the module
   gets what is left through $TLTUNE_GPU_TEST_BUDGET_S. Its sweeps read CIFAR-10 from
   --data-root (else $TLTUNE_DATA_ROOT, else ../shared/data); without it they are skipped,
   which this run counts as not passed.

nvidia-smi samples the GPU every second throughout (utilization.gpu, memory.used, power.draw;
skipped with a note where there is no nvidia-smi); the summary gives each part's peak
memory.used and mean and max utilization.gpu. A part over its cap is stopped (SIGTERM to its
process group, SIGKILL up to 30 s later) and marked so; the next parts still run. Everything
printed also goes to one file, first-gpu-run-<gpu>-<UTC time>.txt in --out (default: here),
with the raw samples at its end; its path is the last line printed.

--smoke runs the CPU versions instead: the machine, bench/gpu_memory.py --smoke and
bench/gpu.py --smoke (every part of it: the tests read its lines here rather than run it twice).

Exit code: 0 when every part ran and passed, 1 otherwise, 2 without a CUDA GPU (unless --smoke).
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TOTAL_S = 480
FINISH_S = 10  # kept for stopping the sampler and writing the summary
STOP_GRACE_S = 30  # after SIGTERM, before SIGKILL
PYTEST_START_S = 45  # pytest's start and the test module's own stop grace, out of the budget it is given
NO_CUDA = 3  # the machine part's exit code without a CUDA GPU
RUN_ON = "this run's GPU: "  # the machine part's last line
SAMPLED = "timestamp,utilization.gpu,memory.used,memory.total,power.draw"


class Log:
    """Prints lines and writes them to the run's one file, as they come (parts stream theirs)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.file = None

    def open(self, path: Path) -> None:
        self.file = path.open("w", encoding="utf-8")

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            self.file_only(text)

    def file_only(self, text: str) -> None:
        self.file.write(text + "\n")
        self.file.flush()


class Sampler:
    """nvidia-smi's readings of one GPU every second, each stamped with when it arrived."""

    def __init__(self, gpu: str):
        self.gpu = gpu
        self.samples: list[tuple[float, list[str]]] = []
        self.process = None
        self.thread = None

    def start(self) -> str:
        if not shutil.which("nvidia-smi"):
            return "no nvidia-smi here: the GPU's utilization and memory are not sampled"
        argv = ["nvidia-smi", f"--query-gpu={SAMPLED}", "--format=csv,noheader,nounits", "-lms", "1000"]
        argv += ["-i", self.gpu] if self.gpu else []
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()
        return f"nvidia-smi samples {f'GPU {self.gpu}' if self.gpu else 'the GPUs'} every second: {SAMPLED}"

    def read(self) -> None:
        for line in self.process.stdout:
            fields = [field.strip() for field in line.split(",")]
            if len(fields) == len(SAMPLED.split(",")):
                self.samples.append((time.monotonic(), fields))

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.thread.join(timeout=5)

    def summary(self, start: float, end: float) -> tuple[str, str]:
        """(peak memory.used in MiB, mean / max utilization.gpu in %) between two instants."""
        if self.process is None:
            return "not sampled", "not sampled"
        rows = [fields for stamp, fields in self.samples if start <= stamp <= end]
        memory = [number(f[2]) for f in rows if number(f[2]) is not None]
        busy = [number(f[1]) for f in rows if number(f[1]) is not None]
        peak = f"{max(memory):.0f}" if memory else "no samples"
        utilization = f"{sum(busy) / len(busy):.0f} / {max(busy):.0f}" if busy else "no samples"
        return peak, utilization


def number(text: str) -> float | None:
    """A reading as a number; None for nvidia-smi's [N/A] and the like."""
    try:
        return float(text)
    except ValueError:
        return None


class Part:
    """One command of the run, its output streamed to the log, stopped at its cap."""

    def __init__(self, name: str, argv: list[str], cap_s: float, env: dict):
        self.name, self.argv, self.cap_s, self.env = name, argv, cap_s, env
        self.returncode: int | None = None
        self.over_cap = False
        self.not_run = False  # no time was left for it
        self.lines: list[str] = []
        self.started = self.ended = 0.0

    def heading(self) -> str:
        shown = " ".join("python" if a == sys.executable else os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in self.argv)
        return f"\n## {self.name}: {shown} (cap {self.cap_s:.0f}s)"

    def run(self, log: Log | None, hard_end: float) -> None:
        """Run to the end or to the cap; ``log`` None: its lines are only kept."""
        if log:
            log(self.heading())
        self.started = time.monotonic()
        # Its own process group: a part over its cap is stopped with everything it started (a sweep's Ray).
        process = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        reader = threading.Thread(target=self.read, args=(process, log), daemon=True)
        reader.start()
        try:
            self.returncode = process.wait(timeout=self.cap_s)
        except subprocess.TimeoutExpired:
            self.over_cap = True
            self.lines.append(f"{self.name}: over its {self.cap_s:.0f}s cap: stopping it")
            if log:
                log(self.lines[-1])
            self.returncode = stop(process, max(5.0, min(STOP_GRACE_S, hard_end - time.monotonic())))
        except BaseException:  # Ctrl-C: its process group is not the terminal's, so stop it here
            stop(process, 5.0)
            raise
        reader.join(timeout=10)
        self.ended = time.monotonic()

    def read(self, process: subprocess.Popen, log: Log | None) -> None:
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))
            if log:
                log(self.lines[-1])

    def result(self) -> tuple[bool, str]:
        """(whether it ran and passed, in words)."""
        if self.not_run:
            return False, "not run: no time left"
        if self.over_cap:
            return False, f"stopped at its {self.cap_s:.0f}s cap"
        if self.returncode != 0:
            return False, f"failed (exit code {self.returncode})"
        skipped = next((m.group(1) for line in reversed(self.lines) if (m := re.search(r"(\d+) skipped", line)) and "==" in line), None)
        if skipped:
            return False, f"exit code 0 but {skipped} test(s) skipped (the reasons are above)"
        return True, "passed"


def stop(process: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM to the process's group, SIGKILL after ``grace_s``; its exit code."""
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            return process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return process.wait()


def print_machine(smoke: bool) -> int:
    """Part 1, in a process of its own (CUDA's context goes with it): the machine, through
    bench/gpu.py's environment(), then the GPU's name on a last line."""
    import torch

    if not smoke and not torch.cuda.is_available():
        return NO_CUDA
    import gpu  # bench/gpu.py, next to this file

    gpu.SMOKE = smoke
    gpu.environment()
    print(RUN_ON + ("cpu (smoke)" if smoke else torch.cuda.get_device_name(0)), flush=True)
    return 0


def chosen_gpu() -> str:
    """The GPU of this run, as nvidia-smi -i and CUDA_VISIBLE_DEVICES name it: the first visible
    one (none where CUDA_VISIBLE_DEVICES is set empty), else GPU 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "0" if visible is None else visible.split(",")[0].strip()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("TLTUNE_DATA_ROOT"), help="MNIST and CIFAR-10 for the GPU tests (default $TLTUNE_DATA_ROOT)")
    p.add_argument("--out", default=".", help="the folder of the run's one file (default: here)")
    p.add_argument("--smoke", action="store_true", help="the parts' CPU versions: that the wiring works, nothing measured")
    p.add_argument("--machine", action="store_true", help=argparse.SUPPRESS)  # internal: part 1
    args = p.parse_args()
    if args.machine:
        return print_machine(args.smoke)

    started, started_at = time.monotonic(), datetime.now(timezone.utc)
    deadline = started + TOTAL_S
    gpu = chosen_gpu()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not args.smoke:  # one GPU, numbered as nvidia-smi numbers it
        env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=gpu)
    if args.data_root:
        env["TLTUNE_DATA_ROOT"] = str(Path(args.data_root).expanduser().resolve())
    smoke = ["--smoke"] if args.smoke else []
    if args.smoke:
        last = Part("GPU benchmark, CPU smoke", [sys.executable, str(BENCH / "gpu.py"), "--smoke"], 240, env)
    else:
        tests = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-s", "-rs"]
        last = Part("GPU tests: the --quick sweeps and bench/gpu.py", tests, None, env)  # all that is left
    memory = Part("GPU memory per trial", [sys.executable, str(BENCH / "gpu_memory.py"), *smoke], 150, env)
    parts = [Part("machine", [sys.executable, __file__, "--machine", *smoke], 60, env), memory, last]

    sampler = Sampler(gpu)
    sampling = sampler.start()
    log = Log()
    try:
        parts[0].run(None, deadline)  # printed once the file is open: its name comes from the GPU's
        if parts[0].returncode == NO_CUDA:
            print("error: no CUDA GPU is visible: run this on a GPU machine, or with --smoke for the CPU check", file=sys.stderr)
            return 2
        name = next((line[len(RUN_ON) :] for line in parts[0].lines if line.startswith(RUN_ON)), "unknown GPU")
        path = Path(args.out) / f"first-gpu-run-{slug('cpu smoke' if args.smoke else name)}-{started_at:%Y%m%dT%H%M%SZ}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        log.open(path)
        log(f"# first GPU run{' (CPU smoke)' if args.smoke else ''}: {name}, {started_at:%Y-%m-%d %H:%M:%S} UTC")
        log(f"python bench/first_gpu_run.py {' '.join(sys.argv[1:])}".rstrip() + f"; at most {TOTAL_S}s in all")
        log(sampling)
        log(parts[0].heading())
        for line in parts[0].lines:
            log(line)
        for part in parts[1:]:
            left = deadline - FINISH_S - time.monotonic()
            part.cap_s = left if part.cap_s is None else min(part.cap_s, left)
            if part.cap_s < 20:
                log(f"\n## {part.name}: not run, {left:.0f}s left of {TOTAL_S}s")
                part.not_run = True
                continue
            if part is memory:  # it stops measuring in time to print its table
                table_path = path.with_name(path.stem + "-gpu-memory.md")
                part.argv = [*part.argv, "--max-seconds", f"{part.cap_s - 15:.0f}", "--out", str(table_path)]
            if part is last and not args.smoke:
                part.env = {**env, "TLTUNE_GPU_TEST_BUDGET_S": str(max(60, int(part.cap_s - PYTEST_START_S)))}
            part.run(log, deadline)
    finally:
        sampler.stop()

    log(f"\n## summary: {time.monotonic() - started:.0f}s of {TOTAL_S}s")
    log("| part | result | seconds (cap) | GPU memory.used, peak MiB | utilization.gpu, mean / max % |")
    log("|---|---|---|---|---|")
    passed = True
    for part in parts:
        ok, words = part.result()
        passed &= ok
        peak, utilization = sampler.summary(part.started, part.ended)
        log(f"| {part.name} | {words} | {part.ended - part.started:.0f} ({part.cap_s:.0f}) | {peak} | {utilization} |")
    log("every part ran and passed: exit code 0" if passed else "not every part ran and passed: exit code 1")
    if sampler.samples:
        log.file_only(f"\n## nvidia-smi samples ({SAMPLED}; %, MiB, W)")
        for _, fields in sampler.samples:
            log.file_only(", ".join(fields))
    log(f"\nwritten to {path.resolve()}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
