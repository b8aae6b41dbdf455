"""The GPU memory one trial of each built-in experiment needs, measured on a CUDA GPU, and how
many such trials fit on a 16, 24, 40 or 80 GB card (with the --gpus-per-trial that packs them).

    python bench/gpu_memory.py [--out FILE]   # a GPU machine: a markdown table, in about 90 s
    python bench/gpu_memory.py --smoke        # tiny sizes on the CPU: the same code path, nothing measured (tests run it)
    python bench/gpu_memory.py --estimate [--out FILE]  # no GPU: an estimate on the CPU from tensor sizes, in about 90 s
    python bench/gpu_memory.py --estimate --smoke       # the estimate at tiny sizes, in seconds (tests run it)

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

--estimate, until a GPU measures them: the same rows on the CPU, from the tensors a trial holds
at its peak, built at the row's real sizes: the model, its gradients and the optimizer's state
after a real step, the splits, and the larger of a training batch (what it saves for backward,
in fp32 and in bf16) and an evaluation batch (twice its largest tensor); plus an allowance for
the CUDA context, cuDNN's and cuBLAS's workspaces and the allocator's fragmentation
(CONTEXT_ALLOWANCE, FRAGMENTATION_ALLOWANCE), which the CPU cannot see.
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


# ---------------------------------------------------------------------------- --estimate: on the CPU, from tensor sizes

# What the CPU cannot see, added to an estimate's tensors: per trial (each is a process with its
# own CUDA context), the context with its kernel images and cuDNN's and cuBLAS's handles and
# workspaces (0.3 to 0.5 GiB on recent drivers with lazy module loading; cuDNN's autotuning may
# cache more), and the caching allocator's rounding of blocks and the fragmentation between them.
CONTEXT_ALLOWANCE = 0.6 * GIB
FRAGMENTATION_ALLOWANCE = 0.10  # of the tensors' total


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (views of one storage count once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def saved_for_backward(model, x, y, autocast, held: set[int]) -> int:
    """Bytes of the distinct tensors one forward and backward of batch ``x`` saves for backward,
    other than the storages in ``held`` (the parameters and the input, counted on their own)."""
    import torch
    import torch.nn.functional as F

    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held and storage.nbytes():
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(saved.values())


def largest_output(model, x) -> int:
    """Bytes of the largest tensor a no-grad forward of ``x`` makes (any module's output, or ``x``)."""
    import torch

    largest = [x.nbytes]

    def record(module, inputs, output):
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        largest.extend(o.nbytes for o in outputs if isinstance(o, torch.Tensor))

    hooks = [module.register_forward_hook(record) for module in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return max(largest)


def estimate_trial(row: dict, sizes: dict) -> dict:
    """What tltune.raytune.trainable._train holds on the device, from the tensors built on the
    CPU: the model, its gradients and optimizer state after a real step, the splits, and what
    one training batch saves for backward (fp32 and bf16) or one evaluation batch makes."""
    import torch

    from tltune.config import TrialConfig
    from tltune.data import as_tensors, iterate_batches
    from tltune.train import Runtime, apply_augmentation, build_optimizer, draw_augmentation, eval_batch_size, seed_everything, setup_model

    config = TrialConfig.from_dict(shrunk(row["config"], row, sizes))
    dim = feature_dim(row, sizes) if row["task"] == "cached" else None
    splits = synthetic_splits(row, sizes["train_images"] or row["splits"]["train"], sizes["val_images"] or row["splits"]["val"], dim)
    model, transform = setup_model(config, splits, None)
    runtime = Runtime("cpu", "fp32", channels_last=True)  # as trainable.trial_runtime
    runtime.prepare(model, transform)
    optimizer = build_optimizer(config.optimizer, model, config.lr, config.weight_decay)
    train_x, train_y = as_tensors(splits.train)
    val_x, val_y = as_tensors(splits.val)
    generator = seed_everything(0)
    # An epoch's augmentation draws and its shuffled order are on the device beside the splits
    draws, order = draw_augmentation(config.augmentation, len(train_y), generator, "cpu"), torch.randperm(len(train_y))
    images, labels = next(iterate_batches(train_x, train_y, config.batch_size, shuffle=True, generator=generator))
    augmented = apply_augmentation(config.augmentation, images, [d[: len(labels)] for d in draws])
    x = transform(augmented)
    state = list(model.parameters()) + list(model.buffers())
    held = {t.untyped_storage().data_ptr() for t in state + [x]}
    model.train()
    activations = {"fp32": saved_for_backward(model, x, labels, runtime.autocast(), held)}
    optimizer.step()
    trained = [p for p in model.parameters() if p.requires_grad]
    grads = storage_bytes(p.grad for p in trained if p.grad is not None)
    optimizer_state = storage_bytes(t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    # bf16: --precision auto on Ampere and later (fp16 on older GPUs saves as many bytes)
    activations["bf16"] = saved_for_backward(model, x, labels, Runtime("cpu", "bf16").autocast(), held)
    model.eval()
    eval_images, _ = next(iterate_batches(val_x, val_y, eval_batch_size(transform), shuffle=False))
    evaluation = 2 * largest_output(model, transform(eval_images))  # a layer's input and output live at once
    return {
        "model": storage_bytes(state), "grads": grads, "optimizer": optimizer_state,
        "data": storage_bytes([train_x, train_y, val_x, val_y, *draws, order]),
        "batch": images.nbytes + (augmented.nbytes if augmented is not images else 0) + x.nbytes,
        "activations": activations, "eval": evaluation, **({} if dim is None else {"feature_dim": dim}),
    }  # fmt: skip


def estimate_build(row: dict, sizes: dict) -> dict:
    """The feature-cache build (tltune.features.feature_splits) on the largest split: the frozen
    backbone, a no-grad batch of FEATURE_BATCH through it, and the split's float16 features,
    twice at the end (compute_features' torch.cat copies them)."""
    import torch

    from tltune.config import ModelSpec
    from tltune.data import as_tensors, iterate_batches
    from tltune.train import Runtime, setup_image_model

    images = sizes["train_images"] or max(row["splits"].values())
    splits = synthetic_splits(row, min(images, FEATURE_BATCH), 1)  # one batch is enough: the features' size is known
    model, transform = setup_image_model(ModelSpec(**shrunk(row["spec"], row, sizes)), "feature_extract", splits, None)
    Runtime("cpu", "fp32", channels_last=True).prepare(model, transform)  # as feature_splits
    model.backbone.eval()
    batch, _ = next(iterate_batches(*as_tensors(splits.train), FEATURE_BATCH, shuffle=False))
    x = transform(batch)
    with torch.no_grad():
        one = model.backbone(x).to(torch.float16)
    features = one.nbytes // len(one) * images
    return {
        "model": storage_bytes(list(model.backbone.parameters()) + list(model.backbone.buffers())),
        "batch": batch.nbytes + x.nbytes, "eval": 2 * largest_output(model.backbone, x), "features": features,
        "feature_dim": model.head.in_features,
    }  # fmt: skip


def estimated_tensors(result: dict, precision: str | None = None) -> int:
    """The tensors a row holds at its peak; a trial at ``precision`` (None: the larger of fp32 and bf16)."""
    if "features" in result:  # a build: the features so far beside a batch, or both copies at the end
        return result["model"] + max(result["features"] + result["batch"] + result["eval"], 2 * result["features"])
    if precision is None:
        return max(estimated_tensors(result, p) for p in result["activations"])
    fixed = result["model"] + result["grads"] + result["optimizer"] + result["data"]
    return fixed + max(result["activations"][precision] + result["batch"], result["eval"])


def estimated_bytes(result: dict) -> float:
    """One trial's (or build's) process on the GPU: its tensors, and the allowance for the rest."""
    return estimated_tensors(result) * (1 + FRAGMENTATION_ALLOWANCE) + CONTEXT_ALLOWANCE


def estimate_rows(rows: list[dict], smoke: bool) -> list[dict]:
    """Every row estimated in this process on the CPU."""
    sizes = SIZES["smoke" if smoke else "gpu"]
    results = []
    for index, row in enumerate(rows, 1):
        started = time.perf_counter()
        try:
            result = (estimate_build if row["task"] == "build" else estimate_trial)(row, sizes)
        except Exception as exc:  # noqa: BLE001 (this row fails, the others are estimated)
            message = str(exc).strip().splitlines()
            result = {"error": f"{type(exc).__name__}: {message[0] if message else ''}"}
        result["seconds"] = time.perf_counter() - started
        results.append(result)
        what = f"FAILED {result['error']}" if "error" in result else f"{estimated_bytes(result) / GIB:.2f} GiB estimated"
        print(f"row {index}/{len(rows)} ({', '.join(row['experiments'])}): {what}, {result['seconds']:.1f}s", flush=True)
    return results


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


# The card columns of both tables, measured and estimated
CARD_COLUMNS = (
    f"A card column: how many trials fit at once with {HEADROOM:.0%} of the card kept free, at the --gpus-per-trial that "
    "packs that many (Ray packs floor(1/f) trials on a GPU at f); for a feature-cache build row, builds at once. "
    "Memory only: the CPUs per trial may allow fewer."
)


def table(rows: list[dict], results: list[dict], title: str, smoke: bool) -> str:
    cards = " | ".join(f"{gb} GB card" for gb in CARDS_GB)
    lines = [
        f"### GPU memory per trial: {title}",
        "",
        (
            "One trial's peak, training in fp32 and at --precision auto (the larger); whole process: its CUDA context and "
            f"torch's peak reserved memory. {CARD_COLUMNS} Measured by `python bench/gpu_memory.py` (bench/first_gpu_run.py runs it)."
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


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}" if n >= 10 * 2**20 else f"{n / 2**20:.1f}"


def estimate_parts(result: dict) -> str:
    """An estimate's tensors by what holds them, in MiB."""
    if "features" in result:
        return f"backbone {mib(result['model'])}; features {mib(result['features'])}, twice at the end; a batch's forward {mib(result['batch'] + result['eval'])}"
    training = " / ".join(mib(result["activations"][p] + result["batch"]) for p in ("fp32", "bf16"))
    return f"{mib(result['model'])} + {mib(result['grads'])} + {mib(result['optimizer'])}; {mib(result['data'])}; {training}; {mib(result['eval'])}"


def estimate_table(rows: list[dict], results: list[dict], title: str) -> str:
    cards = " | ".join(f"{gb} GB card" for gb in CARDS_GB)
    allowance = (
        f"{CONTEXT_ALLOWANCE / GIB:.1f} GiB per trial for the CUDA context and cuDNN's and cuBLAS's workspaces, plus "
        f"{FRAGMENTATION_ALLOWANCE:.0%} of the tensors for the caching allocator's rounding and fragmentation"
    )
    lines = [
        f"### GPU memory per trial: {title}",
        "",
        (
            "One trial's peak, estimated from the tensors a trial holds, built on the CPU at the row's real sizes: the model, "
            "the gradients of what trains and the optimizer's state after one real step; the train and validation splits as "
            "uint8 (features: float16) on the device; and the larger of one training batch (its input in float and what it "
            "saves for backward, in fp32 and in bf16 as at --precision auto) and one evaluation batch (twice its largest "
            f"tensor). Not measured on a GPU: the allowance for what the CPU cannot see is {allowance}. "
            f"{CARD_COLUMNS} Estimated by `python bench/gpu_memory.py --estimate`; "
            "the first GPU run's measurement (`python bench/gpu_memory.py`) replaces it."
        ),
        "",
        f"| experiment(s) | what is estimated | one trial, GiB (estimate, allowance included) | tensors, MiB: model + gradients + optimizer; splits; training batch fp32 / bf16; evaluation batch | {cards} |",
        "|" + "---|" * (4 + len(CARDS_GB)),
    ]
    for row, result in zip(rows, results):
        if "error" in result:
            memory, parts, fits = f"failed: {result['error']}", "-", ["-"] * len(CARDS_GB)
        else:
            memory, parts = f"{estimated_bytes(result) / GIB:.2f}", estimate_parts(result)
            fits = [card_cell(estimated_bytes(result), gb) for gb in CARDS_GB]
        lines.append(f"| {', '.join(row['experiments'])} | {describe(row, result)} | {memory} | {parts} | {' | '.join(fits)} |")
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


def estimate(smoke: bool, out: str | None) -> int:
    """--estimate: every row on the CPU, the table printed (and written to ``out``)."""
    import torch

    started = time.perf_counter()
    rows = plan_rows()
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    title = f"estimated on the CPU from tensor sizes, not measured on a GPU ({today}, torch {torch.__version__})"
    if smoke:
        title += "; --smoke: tiny sizes, not the real figures"
    print(f"{len(rows)} rows for the {len({e for r in rows for e in r['experiments']})} built-in experiments, estimated in one process on the CPU", flush=True)
    results = estimate_rows(rows, smoke)
    text = estimate_table(rows, results, title)
    print(f"\n{text}\n{len(rows)} rows in {time.perf_counter() - started:.0f}s", flush=True)
    if out:
        Path(out).write_text(text, encoding="utf-8")
    return 1 if any("error" in r for r in results) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the code path runs, nothing is measured")
    p.add_argument("--estimate", action="store_true", help="no GPU: estimate each row on the CPU from its tensors' sizes")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--max-seconds", type=float, default=150, help="rows left after this long are not measured (default 150)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: measure the rows on stdin
    args = p.parse_args()
    if args.worker:
        return worker(args.smoke)
    if args.estimate:
        return estimate(args.smoke, args.out)
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
