"""The trial: a Ray Tune function trainable that trains one configuration, reporting once per
epoch with a checkpoint, plus the Ray tasks that run beside it (test scoring, backbone
features). The math is in ``tltune.train``; this file only moves data and reports, and turns
Tune's config dicts into :class:`~tltune.config.TrialConfig` (once, as a trial starts).

The driver puts each dataset in Ray's object store once; every trial reads it from there
(zero-copy NumPy on the trial's node) and resumes from ``tune.get_checkpoint()``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
import time

import ray
import torch
from ray import tune

from tltune.catalog import LOGICAL_GPUS_ENV
from tltune.config import ModelSpec, TrialConfig
from tltune.data import Splits, as_tensors
from tltune.raytune.cluster import fits
from tltune.features import feature_splits
from tltune.train import (
    CheckpointPolicy,
    DivergedError,
    LRSchedule,
    Runtime,
    build_optimizer,
    cuda_problem,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    setup_model,
    train_one_epoch,
)


# Each checkpoint's record of what the trial reported, one JSON line per report: a driver killed
# mid-upload can leave storage with the state naming a checkpoint but without the results of
# the epochs before it, and a restored trial's results are rebuilt from here (callbacks.py).
REPORTED_FILE = "reported.jsonl"


def write_reported(directory: str, reported: list[dict]) -> None:
    with open(os.path.join(directory, REPORTED_FILE), "w") as f:
        f.writelines(json.dumps(row, default=str) + "\n" for row in reported)


def read_reported(directory: str) -> list[dict]:
    """The reports :func:`write_reported` kept in a checkpoint ([] for checkpoints from before it)."""
    try:
        with open(os.path.join(directory, REPORTED_FILE)) as f:
            return reported_rows(f.read())
    except (OSError, ValueError):
        return []


def reported_rows(text: str) -> list[dict]:
    """The reports in a :data:`REPORTED_FILE`'s text (a damaged one raises ValueError)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def trial_device() -> torch.device:
    """The GPU Ray assigned to this trial (it sets CUDA_VISIBLE_DEVICES), else the CPU. A trial
    holding a GPU that CUDA cannot use fails at once instead of training on a CPU core while
    the GPU sits idle (unless $TLTUNE_LOGICAL_GPUS=1: a test cluster's logical GPUs)."""
    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        return torch.device("cpu")
    problem = cuda_problem()
    if problem is None:
        return torch.device("cuda")
    if os.environ.get(LOGICAL_GPUS_ENV) == "1":
        return torch.device("cpu")
    raise RuntimeError(f"this trial holds GPU {','.join(map(str, gpu_ids))} but {problem}")


def device_report(device: torch.device) -> dict:
    """What a trial trained on, for its results."""
    if device.type != "cuda":
        return {"device": "cpu", "device_capability": None}
    major, minor = torch.cuda.get_device_capability(device)
    return {"device": torch.cuda.get_device_name(device), "device_capability": f"{major}.{minor}"}


def trial_runtime(config: TrialConfig, device: torch.device, compile: bool = True) -> Runtime:
    """The config's precision (``auto`` is resolved for ``device``) and torch.compile if it
    asks and ``compile`` allows, with channels_last for conv models."""
    return Runtime(device, config.precision, channels_last=True, compile=compile and config.compile)


def train_trial(tune_config: dict, inputs: dict) -> None:
    """A Ray Tune function trainable: one ``tune.report`` per epoch, with a checkpoint where
    ``inputs["checkpoints"]`` (a :class:`~tltune.train.CheckpointPolicy`) says."""
    config = TrialConfig.from_dict(tune_config)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch is noise
    started_at = time.time()
    resources = tune.get_context().get_trial_resources().required_resources
    cpus, gpus = resources.get("CPU", 1), resources.get("GPU", 0)
    torch.set_num_threads(max(1, int(cpus)))
    device = trial_device()
    release_memory(device)  # what an earlier trial of this actor may have left in the cache
    freeze_what_lives_as_long_as_the_process()
    try:
        _train(config, inputs, device, started_at, held={"cpus_held": cpus, "gpus_held": gpus})
    except torch.OutOfMemoryError as exc:
        raise RuntimeError(out_of_memory_line(exc, device, gpus, config)) from None
    finally:  # completed, diverged, failed, or stopped by ASHA (Ray ends the trial inside tune.report)
        release_memory(device)


def out_of_memory_line(exc: torch.OutOfMemoryError, device: torch.device, gpus: float, config: TrialConfig) -> str:
    """What a trial that ran out of GPU memory tells its user: the card, how many trials share
    it, and what to change; then the first two sentences of torch's own message."""
    torch_said = ". ".join(str(exc).strip().splitlines()[0].split(". ")[:2]).rstrip(".") if str(exc).strip() else "out of memory"
    if device.type != "cuda":
        return f"this trial ran out of memory ({torch_said}): pass a smaller --batch-size or --image-size"
    props = torch.cuda.get_device_properties(device)
    sharing = fits(1.0, gpus) if gpus else 1
    return (f"this trial ran out of GPU memory on {props.name} ({props.total_memory / 2**30:.0f} GiB, shared by up to {sharing} trials "
            f"at --gpus-per-trial {gpus:g}; batch size {config.batch_size}): pass a larger --gpus-per-trial (fewer trials per GPU), "
            f"a smaller --batch-size or --image-size (docs/PERFORMANCE.md, GPU memory per trial); torch: {torch_said}")  # fmt: skip


def release_memory(device: torch.device) -> None:
    """Collect what a trial left (model, optimizer, its tensors on the device) and hand the
    GPU's cached blocks back, so that the next trial of this actor, or of this GPU, has them."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def freeze_what_lives_as_long_as_the_process() -> None:
    """Once a process, at its first trial: the objects its imports made (torch, Ray: some 400,000)
    live as long as it does, and every full collection walks them all (0.18 s each on a 2-core
    machine): two per trial in release_memory, and Python's own now and then. gc.freeze() leaves
    them out of every later collection; they are still freed when nothing refers to them."""
    if gc.get_freeze_count() == 0:
        gc.freeze()


def _train(config: TrialConfig, inputs: dict, device: torch.device, started_at: float, held: dict) -> None:
    """``held``: the CPUs and GPUs Ray gave the trial, reported with every epoch (its compute:
    seconds times what it held, :func:`tltune.results.trial_rows`)."""
    started = time.perf_counter()
    splits, pretrained_state = trial_inputs(config, inputs)
    data_ready_s = time.perf_counter() - started
    model, transform = setup_model(config, splits, pretrained_state)
    runtime = trial_runtime(config, device)
    if runtime.compile:  # a reused actor: the last trial's graphs would count toward Dynamo's recompile limit
        torch._dynamo.reset()
    runtime.prepare(model, transform)
    optimizer = build_optimizer(config.optimizer, model, config.lr, config.weight_decay)
    epochs_done, reported = 0, []
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            epochs_done = load_checkpoint(directory, model, optimizer, runtime.scaler)
            reported = read_reported(directory)[:epochs_done]
    train_x, train_y = as_tensors(splits.train, device)
    val_x, val_y = as_tensors(splits.val, device)
    schedule = LRSchedule.of(config, len(train_y))  # recomputed from the epoch after a resume
    policy: CheckpointPolicy = inputs.get("checkpoints") or CheckpointPolicy()
    last_epoch = config.stop_epoch or config.epochs
    trained_s, last_save_s = 0.0, None  # training since the last checkpoint; what the last save cost
    for epoch in range(epochs_done + 1, last_epoch + 1):
        generator = seed_everything(config.seed * 1000 + epoch)  # same batches (and augmentations) after a resume
        train_started = time.perf_counter()
        try:
            train = train_one_epoch(
                model, optimizer, train_x, train_y, transform, config.batch_size, generator, runtime,
                config.augmentation, config.label_smoothing, schedule, epoch,
            )  # fmt: skip
        except DivergedError as exc:
            # Stop this trial with its reason in the results; val_acc 0 ranks it last for the
            # searcher and ASHA (a NaN would be dropped, and a retry would diverge again).
            tune.report({"epoch": epoch, "diverged": True, "stop_reason": str(exc), "val_acc": 0.0, "train_loss": float("nan")})
            return
        train_s = time.perf_counter() - train_started
        train_images_per_s = len(train_y) / train_s
        val = evaluate(model, val_x, val_y, transform, runtime=runtime)
        metrics = {
            "epoch": epoch,
            "train_loss": train.loss,
            "train_acc": train.accuracy,
            "skipped_steps": train.skipped_steps,  # fp16 batches whose loss overflowed (GradScaler skipped them)
            "val_loss": val.loss,
            "val_acc": val.accuracy,
            "train_images_per_s": train_images_per_s,
            "lr": optimizer.param_groups[0]["lr"],  # the rate the optimizer trained with, not the config's
            "data_ready_s": data_ready_s,
            "started_at": started_at,  # this run of the trial (a restored trial starts again)
            "reported_at": time.time(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
            "precision_used": runtime.precision,  # what config.precision (maybe "auto") became on this device
            **device_report(device),
            **held,
            "last_checkpoint_s": last_save_s,  # what the last save cost (saving and persisting to the run's storage)
        }
        trained_s += train_s
        reported.append(metrics)
        if not policy.due(epoch, last_epoch, trained_s, last_save_s, now=metrics["reported_at"]):  # the budget's stopper reads it too
            tune.report(metrics)
            continue
        saving = time.perf_counter()
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(directory, model, optimizer, epoch, config, runtime.scaler)
            write_reported(directory, reported)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
        trained_s, last_save_s = 0.0, time.perf_counter() - saving


def score_on_test_split(tune_config: dict, inputs: dict, checkpoint: tune.Checkpoint) -> dict:
    """Test accuracy of a trial's checkpoint: a Ray task with the trial's resources, or (CPU
    trials) a call in the driver."""
    config = TrialConfig.from_dict(tune_config)
    device = trial_device()
    splits, pretrained_state = trial_inputs(config, inputs)
    model, transform = setup_model(config, splits, pretrained_state)
    runtime = trial_runtime(config, device, compile=False)  # one pass over the test split: compiling does not pay
    runtime.prepare(model, transform)
    with checkpoint.as_directory() as directory:
        load_checkpoint(directory, model)
    test_x, test_y = as_tensors(splits.test, device)
    stats = evaluate(model, test_x, test_y, transform, runtime=runtime)
    return {"test_acc": stats.accuracy, "test_loss": stats.loss, "test_images": len(test_y)}


def trial_inputs(config: TrialConfig, inputs: dict) -> tuple[Splits, dict | None]:
    """A trial's splits (images, or its backbone's cached features) and its model's starting
    weights, zero-copy from the node's object store. ``inputs``: ``splits`` (the images),
    ``pretrained`` (model -> weights, which a scratch-mode trial ignores) and, for feature extraction, ``features`` (model -> splits)."""
    splits = inputs["features"][config.model] if config.on_cached_features else inputs["splits"]
    pretrained = inputs["pretrained"].get(config.model) if config.mode != "scratch" else None
    return ray.get(splits), (None if pretrained is None else ray.get(pretrained))


def precompute_features(input_config: dict, inputs: dict) -> Splits:
    """Backbone features of every image, computed once (or read from the disk cache) on the
    device a trial would get; runs as a Ray task, its result stays in the object store.
    ``input_config``: the fields of :class:`~tltune.config.ModelSpec`."""
    spec = ModelSpec(**{**input_config, "params": tuple(map(tuple, input_config.get("params", ())))})
    pretrained = inputs["pretrained"].get(spec.model)
    return feature_splits(ray.get(inputs["splits"]), spec, None if pretrained is None else ray.get(pretrained), trial_device())
