"""The GPU benchmark: mixed precision and channels_last, the feature-cache build, and many
small trials sharing one GPU. One script, PASS/FAIL lines, at most 8 minutes on one GPU.

    python bench/gpu.py [--data-root DIR]   # a GPU machine; CIFAR-10 from DIR, else synthetic images of its shape
    python bench/gpu.py --smoke             # tiny sizes on the CPU: the script works (CI runs it), no targets

First the machine: driver, CUDA, cuDNN, the GPU's name, compute capability and memory, and
the architectures torch was built for.

1. AlexNet at 224 px, training images/s through tltune's own loop (uint8 CIFAR-shaped
   batches resized to 224 on the device): true fp32 (TF32 off), fp32 as tltune trains it
   (torch's default: TF32 in cuDNN convolutions on Ampere and later), bf16, bf16 +
   channels_last. The target, bf16 + channels_last >= 2x fp32, compares with tltune's fp32
   (TF32 convolutions): what --precision auto buys over --precision fp32; the ratio to true
   fp32 is printed beside it. The fp32 and bf16 rows run contiguous (NCHW) end to end.
2. The feature cache of CIFAR-10 at 224 px (60,000 images through AlexNet's backbone), built
   as a sweep builds it: fingerprint, backbone, float16 file. CIFAR-10 from --data-root when
   it is there, else synthetic images of its shape (never a download).
3. Small-CNN trials as separate processes on one device, 1, 2, 4 and 8 at once (what Ray
   does with --gpus-per-trial 0.125): aggregate training images/s; target 8 >= 4x 1.
4. --compile on AlexNet-224: compile time and speed against eager (information, no target;
   left out of --smoke).
The exit code is 0 when every part ran (whatever its verdict), 1 when one crashed.
"""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from common import parser

import numpy as np
import torch
import torch.multiprocessing as mp
import torchvision

from tltune.config import ModelSpec
from tltune.data import BatchTransform, ImageArrays, Splits, dataset_on_disk, load_dataset, make_splits
from tltune.features import feature_splits
from tltune.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from tltune.train import Runtime, build_optimizer, gpu_has_bf16, resolve_precision, train_one_epoch

BUDGET_S = 480
# Per mode: AlexNet input size and (batch, images timed) pairs; feature-cache images and size;
# small-CNN process counts, seconds each, images per epoch.
SIZES = {
    "gpu": dict(alexnet_size=224, alexnet_runs=((64, 6400), (256, 12800)), feature_images=60000, feature_size=224,
                workers=(1, 2, 4, 8), worker_seconds=10.0, worker_images=4096),
    "smoke": dict(alexnet_size=64, alexnet_runs=((2, 2),), feature_images=120, feature_size=64,
                  workers=(1, 2), worker_seconds=1.0, worker_images=256),
}  # fmt: skip
SMOKE = False


def report(name: str, value: float, target: float, unit: str = "x", higher_is_better: bool = True, gpu_target: bool = True) -> None:
    """A PASS/FAIL line; in --smoke mode a SMOKE line for targets meant for a GPU at full size."""
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    smoke = SMOKE and gpu_target
    status = "SMOKE" if smoke else "PASS" if ok else "FAIL"
    print(f"{status}  {name}: {value:.3g}{unit} (target {sign} {target:g}{unit}{' on a GPU' if smoke else ''})", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def driver_version() -> str:
    """The NVIDIA driver's version, as nvidia-smi says it (else as CUDA reports it)."""
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    with contextlib.suppress(Exception):  # private: the CUDA driver API's version, e.g. 13000
        version = torch._C._cuda_getDriverVersion()
        return f"CUDA driver API {version // 1000}.{version % 1000 // 10}" if version else "none"
    return "none found"


def environment() -> None:
    """The machine, printed before anything else runs (a first run on a new GPU starts here)."""
    print(f"driver {driver_version()}, torch {torch.__version__} built for CUDA {torch.version.cuda}, "
          f"cuDNN {torch.backends.cudnn.version()}, {os.cpu_count()} CPUs, mode {'smoke (CPU, tiny sizes)' if SMOKE else 'full'}", flush=True)  # fmt: skip
    print(f"torch's CUDA architectures: {', '.join(torch.cuda.get_arch_list()) or 'none (a CPU-only build)'}", flush=True)
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        print(f"GPU {index}: {props.name}, compute capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
              f"bf16 {'native' if gpu_has_bf16(index) else 'emulated'}; TF32 in cuDNN convolutions (tltune's fp32): "
              f"{torch.backends.cudnn.allow_tf32}, float32 matmul precision: {torch.get_float32_matmul_precision()}", flush=True)  # fmt: skip
    if SMOKE:
        print(f"device: CPU ({torch.get_num_threads()} threads), auto precision here: {resolve_precision('auto', torch.device('cpu'))}")


@contextlib.contextmanager
def true_fp32():
    """TF32 off in cuDNN convolutions and matmuls: fp32 arithmetic end to end."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------- 1. AlexNet


def train_images_per_s(
    device, model_name: str, size: int, batch: int, images: int, precision: str, channels_last: bool, compile: bool = False
) -> tuple[float, float]:
    """(images/s, warm-up seconds) of tltune's training loop: uint8 CIFAR-shaped batches on
    the device, resized and normalised there, forward, backward, optimizer step. Without
    channels_last the batches are made NCHW-contiguous: a true NCHW baseline. The warm-up
    (cuDNN autotuning, the allocator's first blocks, compiling) is timed apart."""
    torch.manual_seed(0)
    model = build_model(model_name, "scratch", 10, 3, size)
    transform = BatchTransform(3, size, IMAGENET_MEAN, IMAGENET_STD)
    runtime = Runtime(device, precision, channels_last=channels_last, compile=compile)
    runtime.prepare(model, transform)
    if not channels_last:
        transform.memory_format = torch.contiguous_format
    optimizer = build_optimizer("sgd" if model_name == "alexnet" else "adam", model, 1e-3)
    x = torch.randint(0, 256, (images, 32, 32, 3), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (images,), device=device)
    warm = min(images, 3 * batch)
    started = time.perf_counter()
    train_one_epoch(model, optimizer, x[:warm], y[:warm], transform, batch, runtime=runtime)
    synchronize(device)
    warm_s = time.perf_counter() - started
    started = time.perf_counter()
    train_one_epoch(model, optimizer, x, y, transform, batch, runtime=runtime)  # ends in .item(): synchronised
    return images / (time.perf_counter() - started), warm_s


def bench_alexnet(device, sizes: dict) -> None:
    low = "bf16" if device.type == "cpu" or gpu_has_bf16(device) else "fp16"  # a GPU without bf16 tries fp16
    fast = f"{low}+channels_last"
    # label -> (precision, channels_last, TF32 off)
    rows = {"true fp32": ("fp32", False, True), "fp32": ("fp32", False, False), low: (low, False, False), fast: (low, True, False)}
    size = sizes["alexnet_size"]
    for batch, images in sizes["alexnet_runs"]:
        speeds = {}
        for label, (precision, channels_last, no_tf32) in rows.items():
            with true_fp32() if no_tf32 else contextlib.nullcontext():
                speeds[label] = train_images_per_s(device, "alexnet", size, batch, images, precision, channels_last)[0]
        print(f"AlexNet-{size} training, batch {batch}: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in speeds.items()), flush=True)
        print(f"INFO  AlexNet-{size} train, batch {batch}, {fast} / true fp32 (TF32 off): {speeds[fast] / speeds['true fp32']:.3g}x", flush=True)
        report(f"AlexNet-{size} train, batch {batch}, {fast} / fp32 (TF32 convolutions, as --precision fp32 trains)", speeds[fast] / speeds["fp32"], 2.0)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- 2. feature cache


def cifar_splits(data_root: str | None, n: int) -> Splits:
    """CIFAR-10 (45,000 / 5,000 / 10,000) from ``data_root``, else uint8 noise of its shape."""
    if data_root:
        subsets = {} if n >= 60000 else {"train_subset": n * 3 // 4, "test_subset": n // 6}
        return make_splits(load_dataset("cifar10", data_root), **subsets)
    rng = np.random.default_rng(0)

    def split(count: int) -> ImageArrays:
        return ImageArrays(rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, count).astype(np.int64))

    train, val, test = (split(max(1, round(n * share))) for share in (0.75, 1 / 12, 1 / 6))
    return Splits("cifar10-synthetic", [str(c) for c in range(10)], train, val, test, (0.5,) * 3, (0.25,) * 3)


def bench_feature_cache(device, sizes: dict, data_root: str | None) -> None:
    if data_root and not dataset_on_disk("cifar10", data_root):  # a benchmark never downloads
        print(f"no CIFAR-10 under {data_root}: the feature cache is built from synthetic images of its shape", flush=True)
        data_root = None
    splits = cifar_splits(data_root, sizes["feature_images"])
    total = len(splits.train) + len(splits.val) + len(splits.test)
    state = torchvision.models.alexnet().state_dict()  # random weights: the time does not depend on them
    spec = ModelSpec("alexnet", image_size=sizes["feature_size"])
    previous = os.environ.get("TLTUNE_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TLTUNE_CACHE_DIR"] = cache  # an empty cache: this is the build
        try:
            started = time.perf_counter()
            features = feature_splits(splits, spec, state, device)
            build_s = time.perf_counter() - started
        finally:
            if previous is None:
                del os.environ["TLTUNE_CACHE_DIR"]
            else:
                os.environ["TLTUNE_CACHE_DIR"] = previous
    source = "CIFAR-10 from --data-root" if data_root else "synthetic uint8 images of CIFAR-10's shape"
    print(f"feature cache, {total} images ({source}) at {sizes['feature_size']} px: built in {build_s:.1f}s "
          f"({total / build_s:.0f} img/s; fingerprint, backbone in fp32 and the float16 file included), "
          f"features {features.train.images.shape[1]} wide", flush=True)  # fmt: skip
    # Not a target from the issue: a sanity bound, 1,000 images/s over the full CIFAR-10.
    report(f"feature-cache build, {total} images at {sizes['feature_size']} px", build_s, 60.0 * total / 60000, unit="s", higher_is_better=False)


# ---------------------------------------------------------------------------- 3. concurrent trials


def cnn_worker(device: str, precision: str, batch: int, images: int, seconds: float, barrier, queue) -> None:
    """One small-CNN 'trial' in its own process, as Ray runs a trial: one CPU thread, its own
    CUDA context. Trains whole epochs until ``seconds`` have passed after the common start."""
    try:
        torch.set_num_threads(1)
        device = torch.device(device)
        torch.manual_seed(0)
        model = build_model("cnn", "scratch", 10, 3, 32, "relu")
        transform = BatchTransform(3, 32, (0.5,) * 3, (0.25,) * 3)
        runtime = Runtime(device, precision, channels_last=True)
        runtime.prepare(model, transform)
        optimizer = build_optimizer("adam", model, 1e-3)
        x = torch.randint(0, 256, (images, 32, 32, 3), dtype=torch.uint8, device=device)
        y = torch.randint(0, 10, (images,), device=device)
        train_one_epoch(model, optimizer, x[: 8 * batch], y[: 8 * batch], transform, batch, runtime=runtime)  # warm-up
        synchronize(device)
        barrier.wait(timeout=300)
        started, done = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            train_one_epoch(model, optimizer, x, y, transform, batch, runtime=runtime)  # ends in .item(): synchronised
            done += images
        queue.put((started, time.monotonic(), done, None))
    except BaseException as exc:  # the parent reports it; the others must not wait at the barrier
        barrier.abort()
        queue.put((0.0, 0.0, 0, f"{type(exc).__name__}: {exc}"))


def concurrent_images_per_s(device, workers: int, sizes: dict, precision: str, batch: int = 64) -> float:
    """Aggregate images/s of ``workers`` processes training at once on ``device``."""
    # CUDA cannot be used in a forked child; on the CPU (--smoke) a fork spares each worker the imports
    ctx = mp.get_context("spawn" if device.type == "cuda" else "fork")
    barrier, queue = ctx.Barrier(workers + 1), ctx.Queue()
    args = (str(device), precision, batch, sizes["worker_images"], sizes["worker_seconds"], barrier, queue)
    processes = [ctx.Process(target=cnn_worker, args=args, daemon=True) for _ in range(workers)]
    for process in processes:
        process.start()
    try:
        try:
            barrier.wait(timeout=300)  # every worker is warm: start together
        except threading.BrokenBarrierError:
            pass  # a worker failed: its error comes through the queue
        results = [queue.get(timeout=300) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    errors = [error for *_, error in results if error]
    if errors:
        raise RuntimeError(f"a worker failed: {errors[0]}")
    start, end = min(r[0] for r in results), max(r[1] for r in results)
    return sum(r[2] for r in results) / (end - start)


def bench_concurrency(device, sizes: dict) -> None:
    precision = resolve_precision("auto", device)
    speeds = {}
    for workers in sizes["workers"]:
        speeds[workers] = concurrent_images_per_s(device, workers, sizes, precision)
        print(f"small CNN, {workers} trial process(es) on one {device.type}, {precision}+channels_last, batch 64: "
              f"{speeds[workers]:.0f} img/s in all ({speeds[workers] / speeds[sizes['workers'][0]]:.2f}x one)", flush=True)  # fmt: skip
    most = sizes["workers"][-1]
    report(f"small-CNN aggregate throughput, {most} concurrent trials / 1", speeds[most] / speeds[1], 4.0)


# ---------------------------------------------------------------------------- 4. --compile


def bench_compile(device, sizes: dict) -> None:
    """--compile on AlexNet: its compile time against what it saves per epoch (no target)."""
    precision = resolve_precision("auto", device)
    size, (batch, images) = sizes["alexnet_size"], sizes["alexnet_runs"][-1]
    eager, eager_warm_s = train_images_per_s(device, "alexnet", size, batch, images, precision, True)
    compiled, compile_s = train_images_per_s(device, "alexnet", size, batch, images, precision, True, compile=True)
    per_epoch = 45000 / eager - 45000 / compiled  # seconds saved per CIFAR-10 training epoch
    pays = f"pays after {(compile_s - eager_warm_s) / per_epoch:.0f} CIFAR-10 epochs" if per_epoch > 0 else "never pays"
    print(f"INFO  --compile, AlexNet-{size} train, batch {batch}, {precision}+channels_last: {compiled:.0f} img/s compiled "
          f"vs {eager:.0f} eager ({compiled / eager:.2f}x), warm-up {compile_s:.0f}s vs {eager_warm_s:.1f}s: {pays}", flush=True)  # fmt: skip


def main() -> int:
    global SMOKE
    p = parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, no targets: checks that the script works")
    p.add_argument("--only", nargs="+", choices=("alexnet", "features", "concurrency", "compile"), help="run only these parts")
    args = p.parse_args()
    SMOKE = args.smoke
    started = time.perf_counter()
    environment()
    if not SMOKE and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible: run this on a GPU machine, or with --smoke for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if SMOKE else "cuda")
    sizes = SIZES["smoke" if SMOKE else "gpu"]
    parts = {
        "alexnet": lambda: bench_alexnet(device, sizes),
        "features": lambda: bench_feature_cache(device, sizes, args.data_root),
        "concurrency": lambda: bench_concurrency(device, sizes),
        "compile": lambda: bench_compile(device, sizes),  # last: its compile time is the least predictable
    }
    crashed = []
    for name, run in parts.items():
        if (args.only and name not in args.only) or (SMOKE and name == "compile"):  # tests/test_precision.py compiles on CPU
            continue
        try:
            run()
        except Exception:
            crashed.append(name)
            print(f"FAIL  {name}: crashed\n{traceback.format_exc()}", flush=True)
    wall_s = time.perf_counter() - started
    report("bench wall time", wall_s, 60 if SMOKE else BUDGET_S, unit="s", higher_is_better=False, gpu_target=False)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
