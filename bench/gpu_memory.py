"""The GPU memory one trial of each built-in experiment needs, measured on a CUDA GPU, and how
many such trials fit on a 16, 24, 40 or 80 GB card (with the --gpus-per-trial that packs them).

    python bench/gpu_memory.py [--out FILE]   # a GPU machine: a markdown table, in about 90 s
    python bench/gpu_memory.py --smoke        # tiny sizes on the CPU: the same code path, nothing measured (tests run it)

Experiments that put the same things on the device share a row: the dataset (its real split
sizes), the model, what trains (every layer, or the head), the input size and channels, the
batch size, and the heavy end of what the experiment searches: the optimizer holding the most
state per parameter (Adam and AdamW two tensors, SGD with momentum, RMSprop and Adagrad one),
the largest CNN width, depth and batch size, BatchNorm if searched, the heaviest augmentation.
The rest are the sweep's defaults without flags (tltune.plan.experiment_settings).

Each row runs in a fresh process (its own CUDA context and peak counters; an out-of-memory in
one row fails that row only) and does what a trial does (tltune.raytune.trainable._train):
builds the model and moves it to the GPU, builds the optimizer, moves the whole train and
validation splits (uint8 images of the dataset's real sizes, synthetic) to the GPU, trains a
few steps and evaluates one batch: in fp32, then at --precision auto (bf16 from Ampere on, else
fp16), so the figure covers both. A feature-extraction experiment on cached features has two
rows: the task that builds the cache before its trials (the frozen backbone at the model's
input size, batch 256, every feature of a split kept on the device until the split is done, as
tltune.features.compute_features does) and the trial on the float16 features (N x D on the
device, the head trains). Test scoring, after the trials, holds less than a trial (no optimizer).

Per row: torch's peak allocated and reserved memory, and the whole process at its peak:
nvidia-smi's used_memory for the process's pid (else the GPU's used memory measured around the
process with torch.cuda.mem_get_info), plus the peak reserved memory above what is reserved at
the end. cuDNN autotunes as in a trial; on a large card it may try algorithms with large
workspaces and keep their blocks cached, so the whole-process figure errs high (torch's peak
allocated shows the tensors' own). A card keeps 10% free; Ray packs floor(1/f) trials on a GPU
at --gpus-per-trial f.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tltune.catalog import AUGMENTATION_NAMES, DATASET_SHAPES, OPTIMIZER_NAMES, check_table
from tltune.experiments import Choice, IntRange
from tltune.raytune.cluster import RESOURCE_UNITS, fits

GIB = 2**30
CARDS_GB = (16, 24, 40, 80)  # nominal sizes; a "16 GB" T4 shows 15 GiB, which the headroom covers
HEADROOM = 0.10  # of a card kept free: the driver's share, fragmentation, a trial's last odd batch
# Tensors of state per trained parameter, as tltune.train.OPTIMIZERS builds them (SGD with momentum 0.9)
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1, "rmsprop": 1, "adagrad": 1}
check_table(OPTIMIZER_NAMES, OPTIMIZER_STATES, "optimizer states")
# (train, test) images of the datasets tltune knows; the validation split comes out of train
DATASET_IMAGES = {"cifar10": (50000, 10000), "mnist": (60000, 10000), "svhn": (73257, 26032)}
FEATURE_BATCH = 256  # tltune.features.compute_features' batch
# Per mode: training steps (and feature-cache batches) per row; smoke: images per split, input size and batch at most
SIZES = {
    "gpu": {"steps": 3, "train_images": None, "val_images": None, "max_image_size": None, "max_batch": None, "worker_timeout_s": 60},
    "smoke": {"steps": 1, "train_images": 8, "val_images": 4, "max_image_size": 64, "max_batch": 4, "worker_timeout_s": 240},
}
NOT_MEASURED = "not measured (CPU smoke)"
RESULT = "RESULT "  # a worker's line of results, JSON after it


# ---------------------------------------------------------------------------- the rows


def values(settings, key: str, default) -> tuple:
    """Every value ``key`` takes in the experiment's trials: a searched domain's options (an
    int range's ends), else the fixed value."""
    domain = settings.space.get(key)
    if isinstance(domain, Choice):
        return domain.options
    if isinstance(domain, IntRange):
        return (domain.low, domain.high)
    return (settings.reference.get(key, default),)


def split_sizes(dataset: str, val_fraction: float) -> dict:
    """Images per split after tltune.data.make_splits carves the validation split."""
    train, test = DATASET_IMAGES[dataset]
    val = max(1, round(train * val_fraction))
    return {"train": train - val, "val": val, "test": test}


def plan_rows() -> list[dict]:
    """One row per distinct thing to measure, with the experiments it stands for."""
    from tltune.data import TORCHVISION_DATASETS
    from tltune.models import input_spec
    from tltune.options import SweepOptions
    from tltune.plan import experiment_settings
    from tltune.specs import builtin_experiments

    options = SweepOptions()
    rows: dict[tuple, dict] = {}

    def add(key: tuple, row: dict, experiment: str) -> None:
        row = rows.setdefault(key, row)
        if experiment not in row["experiments"]:
            row["experiments"].append(experiment)

    for experiment in builtin_experiments()[0].values():
        settings = experiment_settings(experiment, options)
        dataset = settings.dataset
        splits = split_sizes(dataset, options.val_fraction)
        data_channels, data_size = DATASET_SHAPES[dataset]
        # The searched batch size wins over the fixed one (tltune.raytune.sweep.trial_config).
        batch = max(values(settings, "batch_size", settings.batch_size)) if "batch_size" in settings.space else settings.batch_size
        optimizer = max(values(settings, "optimizer", "adam"), key=OPTIMIZER_STATES.__getitem__)
        shape = {
            "width": max(values(settings, "width", 1)),
            "depth": max(values(settings, "depth", 2)),
            "batch_norm": max(values(settings, "batch_norm", False)),
        }
        augmentation = max(values(settings, "augmentation", "none"), key=AUGMENTATION_NAMES.index)
        activation = values(settings, "activation", "relu")[0]  # one tensor saved per activation, whichever
        for model in experiment.models():
            channels, size, _, _ = input_spec(model, data_channels, data_size, settings.channels, settings.image_size, (), ())
            spec = {"model": model, "activation": activation, "image_size": settings.image_size, "channels": settings.channels, **shape}
            common = {
                "dataset": dataset, "data_shape": (data_channels, data_size), "num_classes": len(TORCHVISION_DATASETS[dataset].classes),
                "splits": splits, "model": model, "size": size, "channels": channels,
            }  # fmt: skip
            for mode in experiment.modes():
                cached = mode == "feature_extract" and settings.cached_features
                config = {
                    "dataset": dataset, "model": model, "mode": mode, "optimizer": optimizer, "lr": 1e-4, "epochs": 1,
                    "batch_size": batch, "seed": 0, "image_size": settings.image_size, "channels": settings.channels,
                    "cached_features": cached, "augmentation": augmentation, "activation": activation, **shape,
                }  # fmt: skip
                if cached:
                    build_key = ("build", dataset, model, size, channels, *shape.values())
                    add(build_key, {**common, "task": "build", "spec": spec, "experiments": []}, experiment.name)
                    key = ("cached", dataset, model, size, channels, *shape.values(), batch, optimizer)
                    add(key, {**common, "task": "cached", "spec": spec, "config": config, "experiments": []}, experiment.name)
                else:
                    # scratch and finetune train the same network: one row
                    trains = "head" if mode == "feature_extract" else "all"
                    key = ("trial", dataset, model, trains, size, channels, batch, optimizer, augmentation, *shape.values())
                    add(key, {**common, "task": "trial", "trains": trains, "config": config, "experiments": []}, experiment.name)
    return list(rows.values())


def describe(row: dict, result: dict) -> str:
    """What a row measures, in words."""
    n = row["splits"]
    data = f"{row['dataset']}: {n['train']:,} train + {n['val']:,} val images on the device"
    if row["task"] == "build":
        return (f"feature-cache build (one task, before the trials): {row['model']} backbone at {row['size']} px, "
                f"batch {FEATURE_BATCH}, fp32; the float16 features of {max(n.values()):,} images held on the device")  # fmt: skip
    config = row["config"]
    if row["task"] == "cached":
        width = f"{result['feature_dim']:,} " if "feature_dim" in result else ""
        what = f"trial on cached {row['model']} features ({width}float16 per image), the head trains"
        data = f"{row['dataset']}: {n['train']:,} + {n['val']:,} feature vectors on the device"
    else:
        cnn = ""
        if row["model"] == "cnn":
            cnn = f", width {config['width']}, depth {config['depth']}{', BatchNorm' if config['batch_norm'] else ''}"
        trains = "every layer trains" if row["trains"] == "all" else "frozen backbone, the head trains"
        what = f"trial: {row['model']} at {row['size']} px x {row['channels']}{cnn}, {trains}"
    augmentation = f", {config['augmentation']}" if config["augmentation"] != "none" else ""
    return f"{what}, batch {config['batch_size']}, {config['optimizer']}{augmentation}; {data}"


# ---------------------------------------------------------------------------- a worker: rows, as a trial runs


def synthetic_splits(row: dict, train: int, val: int, features: int | None = None):
    """Splits of zeros: uint8 images of the dataset's shape, or float16 feature vectors of
    width ``features``; memory, not accuracy, is measured."""
    import numpy as np

    from tltune.data import ImageArrays, Splits

    channels, size = row["data_shape"]

    def split(n: int) -> ImageArrays:
        shape = (n, features) if features else (n, size, size, channels)
        return ImageArrays(np.zeros(shape, np.float16 if features else np.uint8), np.arange(n, dtype=np.int64) % row["num_classes"])

    stats = () if features else (0.5,) * channels
    return Splits(row["dataset"], [str(c) for c in range(row["num_classes"])], split(train), split(val), split(1), stats, stats)


def shrunk(settings: dict, row: dict, sizes: dict) -> dict:
    """A config or model spec as measured: in --smoke, at a small input size and batch."""
    settings = dict(settings)
    if sizes["max_image_size"] and row["size"] > sizes["max_image_size"]:
        settings["image_size"] = sizes["max_image_size"]
    if sizes["max_batch"] and "batch_size" in settings:
        settings["batch_size"] = min(settings["batch_size"], sizes["max_batch"])
    return settings


def feature_dim(row: dict, sizes: dict) -> int:
    """The width of the backbone's output (its head's input), from the model built on the meta device."""
    import torch

    from tltune.config import ModelSpec
    from tltune.train import setup_image_model

    with torch.device("meta"):
        model, _ = setup_image_model(ModelSpec(**shrunk(row["spec"], row, sizes)), "feature_extract", synthetic_splits(row, 0, 0), None)
    return model.head.in_features


def measure_trial(row: dict, device, sizes: dict) -> dict:
    """What tltune.raytune.trainable._train puts on the device, and a few steps of it."""
    from tltune.config import TrialConfig
    from tltune.data import as_tensors
    from tltune.train import Runtime, build_optimizer, eval_batch_size, evaluate, resolve_precision, seed_everything, setup_model, train_one_epoch

    config = TrialConfig.from_dict(shrunk(row["config"], row, sizes))
    dim = feature_dim(row, sizes) if row["task"] == "cached" else None
    splits = synthetic_splits(row, sizes["train_images"] or row["splits"]["train"], sizes["val_images"] or row["splits"]["val"], dim)
    model, transform = setup_model(config, splits, None)
    runtime = Runtime(device, "fp32", channels_last=True)  # as trainable.trial_runtime: channels_last, no --compile
    runtime.prepare(model, transform)
    optimizer = build_optimizer(config.optimizer, model, config.lr, config.weight_decay)
    train_x, train_y = as_tensors(splits.train, device)
    val_x, val_y = as_tensors(splits.val, device)
    steps = min(len(train_y), sizes["steps"] * config.batch_size)  # views of the splits: all of them stay on the device
    evaluated = eval_batch_size(transform)
    for precision in dict.fromkeys(resolve_precision(p, device) for p in ("fp32", "auto")):
        runtime = Runtime(device, precision, channels_last=True)
        runtime.prepare(model, transform)
        train_one_epoch(
            model, optimizer, train_x[:steps], train_y[:steps], transform, config.batch_size, seed_everything(0), runtime,
            config.augmentation, config.label_smoothing,
        )  # fmt: skip
        evaluate(model, val_x[:evaluated], val_y[:evaluated], transform, runtime=runtime)
    return {} if dim is None else {"feature_dim": dim}


def measure_build(row: dict, device, sizes: dict) -> dict:
    """The feature-cache build (tltune.features.feature_splits) on the largest split: a few
    batches through compute_features, the other batches' features standing in as one block."""
    import torch

    from tltune.config import ModelSpec
    from tltune.data import ImageArrays
    from tltune.features import compute_features
    from tltune.train import Runtime, setup_image_model

    images = sizes["train_images"] or max(row["splits"].values())
    splits = synthetic_splits(row, images, 1)
    model, transform = setup_image_model(ModelSpec(**shrunk(row["spec"], row, sizes)), "feature_extract", splits, None)
    Runtime(device, "fp32", channels_last=True).prepare(model, transform)  # as feature_splits
    dim = model.head.in_features
    done = min(images, sizes["steps"] * FEATURE_BATCH)
    earlier = torch.empty((images - done, dim), dtype=torch.float16, device=device)
    compute_features(model.backbone, ImageArrays(splits.train.images[:done], splits.train.labels[:done]), transform, device)
    # compute_features ends in torch.cat of all the split's features: a second copy of them.
    rest = torch.empty((done, dim), dtype=torch.float16, device=device)
    joined = torch.empty((images, dim), dtype=torch.float16, device=device)
    del earlier, rest, joined
    return {"feature_dim": dim}


def process_memory_mib(pid: int) -> float | None:
    """What nvidia-smi says process ``pid`` holds on the GPUs, in MiB; None where it cannot
    tell (no nvidia-smi, or a container whose pids it does not see)."""
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    out = subprocess.run(query, capture_output=True, text=True, check=False)
    fields = [line.split(",") for line in out.stdout.splitlines()]
    used = [float(f[1]) for f in fields if len(f) == 2 and f[0].strip() == str(pid) and f[1].strip().isdigit()]
    return sum(used) if out.returncode == 0 and used else None


def worker(smoke: bool) -> int:
    """Measure the rows given as JSON on stdin, printing one RESULT line each."""
    import torch

    sizes = SIZES["smoke" if smoke else "gpu"]
    device = torch.device("cpu" if smoke else "cuda")
    for row in json.loads(sys.stdin.read()):
        started = time.perf_counter()
        try:
            result = (measure_build if row["task"] == "build" else measure_trial)(row, device, sizes)
            if device.type == "cuda":
                torch.cuda.synchronize()
                free, total = torch.cuda.mem_get_info()
                result.update(
                    allocated=torch.cuda.max_memory_allocated(),
                    reserved=torch.cuda.max_memory_reserved(),
                    reserved_now=torch.cuda.memory_reserved(),  # freed tensors' blocks stay cached (no empty_cache)
                    gpu_used_now=total - free,
                    nvidia_smi_mib=process_memory_mib(os.getpid()),
                )
        except Exception as exc:  # noqa: BLE001 (an out-of-memory among them: this row fails, the others run)
            message = str(exc).strip().splitlines()
            result = {"error": f"{type(exc).__name__}: {message[0] if message else ''}"}
        print(RESULT + json.dumps({**result, "seconds": time.perf_counter() - started}), flush=True)
    return 0


# ---------------------------------------------------------------------------- the table


def safe_fraction(trials: int) -> float:
    """The --gpus-per-trial at which Ray packs ``trials`` on one GPU: 1/trials, or the shortest
    decimal below it that packs as many; where Ray's 1/10000ths cannot pack exactly that many
    (over 100), the fraction that packs the most below."""
    exact = 1 / trials
    if round(exact, 4) == exact:
        return exact
    for digits in (2, 3, 4):
        fraction = math.floor(exact * 10**digits) / 10**digits
        if fraction > 0 and trials_per_gpu(fraction) == trials:
            return fraction
    return (RESOURCE_UNITS // (trials + 1) + 1) / RESOURCE_UNITS


def trials_per_gpu(fraction: float) -> int:
    """How many trials Ray packs on one GPU at --gpus-per-trial ``fraction``."""
    return fits(1.0, fraction)


def fit_on_card(trial_bytes: float, card_gb: float) -> tuple[int, float | None]:
    """(trials of ``trial_bytes`` that fit on a ``card_gb`` card with HEADROOM kept free, the
    --gpus-per-trial that packs them; None where not even one fits)."""
    trials = int(card_gb * GIB * (1 - HEADROOM) // trial_bytes)
    return trials, safe_fraction(trials) if trials else None


def card_cell(trial_bytes: float, card_gb: float) -> str:
    """The trials Ray packs at the fraction ("4 at 0.25"), or "does not fit"."""
    trials, fraction = fit_on_card(trial_bytes, card_gb)
    return f"{trials_per_gpu(fraction)} at {fraction:g}" if trials else "does not fit"


def process_bytes(result: dict, used_before: float | None) -> tuple[float, str]:
    """The whole process at its peak and where the figure comes from."""
    if result.get("nvidia_smi_mib") is not None:
        now, source = result["nvidia_smi_mib"] * 2**20, "nvidia-smi"
    else:
        now, source = result["gpu_used_now"] - used_before, "mem_get_info"
    return now + result["reserved"] - result["reserved_now"], source


def table(rows: list[dict], results: list[dict], title: str, smoke: bool) -> str:
    cards = " | ".join(f"{gb} GB card" for gb in CARDS_GB)
    lines = [
        f"### GPU memory per trial: {title}",
        "",
        (
            "One trial's peak, training in fp32 and at --precision auto (the larger); whole process: its CUDA context and "
            f"torch's peak reserved memory. A card column: how many trials fit at once with {HEADROOM:.0%} of the card kept free, "
            "at the --gpus-per-trial that packs that many (Ray packs floor(1/f) trials on a GPU at f); for a feature-cache "
            "build row, builds at once. Memory only: the CPUs per trial may allow fewer. Measured by `python bench/gpu_memory.py` (bench/first_gpu_run.py runs it)."
        ),
        "",
        f"| experiment(s) | what is measured | one trial, GiB (whole process) | torch peak allocated / reserved, GiB | {cards} |",
        "|" + "---|" * (4 + len(CARDS_GB)),
    ]
    for row, result in zip(rows, results):
        if smoke:
            memory, torch_peak, fits = NOT_MEASURED, NOT_MEASURED, ["-"] * len(CARDS_GB)
        elif "error" in result:
            memory, torch_peak, fits = f"failed: {result['error']}", "-", ["-"] * len(CARDS_GB)
        else:
            whole, source = result["process"], result["source"]
            memory = f"{whole / GIB:.2f} ({source})"
            torch_peak = f"{result['allocated'] / GIB:.2f} / {result['reserved'] / GIB:.2f}"
            fits = [card_cell(whole, gb) for gb in CARDS_GB]
        lines.append(f"| {', '.join(row['experiments'])} | {describe(row, result)} | {memory} | {torch_peak} | {' | '.join(fits)} |")
    return "\n".join(lines) + "\n"


def run_rows(rows: list[dict], smoke: bool, max_seconds: float) -> list[dict]:
    """Every row measured in a fresh worker process (smoke: all rows in one, on the CPU); rows
    left after ``max_seconds`` are not measured, so that the table is printed all the same."""
    sizes = SIZES["smoke" if smoke else "gpu"]
    batches = [rows] if smoke else [[row] for row in rows]
    deadline = time.monotonic() + max_seconds
    results = []
    for batch in batches:
        timeout = min(sizes["worker_timeout_s"], deadline - time.monotonic())
        if timeout < 5:
            results += [{"error": f"not measured: out of time (--max-seconds {max_seconds:g})"}] * len(batch)
            continue
        used_before = None
        if not smoke:
            import torch

            free, total = torch.cuda.mem_get_info()  # this process's context included, as in the worker's reading
            used_before = total - free
        argv = [sys.executable, __file__, "--worker", *(["--smoke"] if smoke else [])]
        try:
            out = subprocess.run(argv, input=json.dumps(batch), capture_output=True, text=True, timeout=timeout, check=False)
            found = [json.loads(line[len(RESULT) :]) for line in out.stdout.splitlines() if line.startswith(RESULT)]
            problem = None if out.returncode == 0 else f"worker exit code {out.returncode}: {(out.stderr.strip().splitlines() or [''])[-1]}"
        except subprocess.TimeoutExpired:
            found, problem = [], f"worker over {timeout:.0f}s"
        found += [{"error": problem or "no result"}] * (len(batch) - len(found))
        for row, result in zip(batch, found):
            if not smoke and "error" not in result:
                result["process"], result["source"] = process_bytes(result, used_before)
            results.append(result)
            index = len(results)
            if "error" in result:
                print(f"row {index}/{len(rows)} ({', '.join(row['experiments'])}): FAILED {result['error']}", flush=True)
            elif smoke:
                print(f"row {index}/{len(rows)} ({', '.join(row['experiments'])}): ran on the CPU in {result['seconds']:.1f}s", flush=True)
            else:
                print(f"row {index}/{len(rows)} ({', '.join(row['experiments'])}): {result['process'] / GIB:.2f} GiB whole process "
                      f"({result['source']}), {result['allocated'] / GIB:.2f} GiB allocated, {result['reserved'] / GIB:.2f} GiB reserved, "
                      f"{result['seconds']:.1f}s", flush=True)  # fmt: skip
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the code path runs, nothing is measured")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--max-seconds", type=float, default=150, help="rows left after this long are not measured (default 150)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: measure the rows on stdin
    args = p.parse_args()
    if args.worker:
        return worker(args.smoke)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible: run this on a GPU machine, or with --smoke for the CPU check", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows = plan_rows()
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    title = f"CPU smoke run, {today}: not measured (no GPU)" if args.smoke else f"{torch.cuda.get_device_name(0)}, {today}"
    where = "in one process on the CPU" if args.smoke else "each in a fresh process"
    print(f"{len(rows)} rows for the {len({e for r in rows for e in r['experiments']})} built-in experiments, {where}", flush=True)
    results = run_rows(rows, args.smoke, args.max_seconds)
    text = table(rows, results, title, args.smoke)
    print(f"\n{text}\n{len(rows)} rows in {time.perf_counter() - started:.0f}s", flush=True)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
