"""The training loop: optimizers by name, precisions, one epoch of training, evaluation, checkpoints.

Plain PyTorch, no Ray: ``tltune.raytune`` calls these from a trial, and they can be used
(and are tested) alone.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tltune.catalog import AUGMENTATION_NAMES, OPTIMIZER_NAMES, PRECISION_CHOICES, PRECISION_NAMES, SCHEDULE_NAMES, check_table  # noqa: F401 (re-exported)
from tltune.config import ModelSpec, TrialConfig
from tltune.data import BatchTransform, FeatureTransform, iterate_batches, to_device
from tltune.models import BackboneHead, build_model, input_spec

# name -> (optimizer class, its keyword arguments besides the learning rate; PyTorch's defaults for the rest)
OPTIMIZERS = {
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.01}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adagrad": (torch.optim.Adagrad, {}),
}
check_table(OPTIMIZER_NAMES, OPTIMIZERS, "optimizers")


# --------------------------------------------------------------- on-batch augmentation
# On uint8 (B, H, W, C) batches on the trial's device, before BatchTransform converts them.
# Every random parameter of an epoch (a flip per image, a crop offset per image) is drawn at
# once at the epoch's start from its seeded generator (a CPU one, like the shuffle's) and moved
# to the device once; each batch takes its slice. A draw and a copy per batch would make the
# host wait for the GPU at every step. A resumed trial sees the same batches, on any device.

CROP_PADDING = 4  # pixels of black around the image before a random crop of its own size


def draw_flips(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < 0.5


def random_flip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right where ``flip`` (one bool per image) says so."""
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(2), images)


def draw_crop_offsets(n: int, generator: torch.Generator | None, padding: int = CROP_PADDING) -> torch.Tensor:
    return torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)


def random_crop(images: torch.Tensor, offsets: torch.Tensor, padding: int = CROP_PADDING) -> torch.Tensor:
    """Each image padded with ``padding`` black pixels on every side, then cropped back to
    its size at its (top, left) offset (the usual CIFAR recipe): a shift of up to ``padding`` pixels."""
    n, height, width, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))  # (C, W, H) sides
    top, left = offsets[:, 0], offsets[:, 1]
    rows = top.view(n, 1, 1) + torch.arange(height, device=images.device).view(1, height, 1)
    cols = left.view(n, 1, 1) + torch.arange(width, device=images.device).view(1, 1, width)
    return padded[torch.arange(n, device=images.device).view(n, 1, 1), rows, cols]


# name -> the steps applied to each training batch, in order: (draw n parameters, apply them)
AUGMENTATIONS = {
    "none": (),
    "flip": ((draw_flips, random_flip),),
    "flip_crop": ((draw_flips, random_flip), (draw_crop_offsets, random_crop)),
}
check_table(AUGMENTATION_NAMES, AUGMENTATIONS, "augmentations")


def draw_augmentation(name: str, n: int, generator: torch.Generator | None, device) -> list[torch.Tensor]:
    """The parameters of every step of augmentation ``name`` for ``n`` images (an epoch), on ``device``."""
    return [draw(n, generator).to(device) for draw, _ in AUGMENTATIONS[name]]


def apply_augmentation(name: str, images: torch.Tensor, draws: list[torch.Tensor]) -> torch.Tensor:
    """Augmentation ``name`` on a batch, with its slice of the epoch's ``draws``."""
    for (_, apply), params in zip(AUGMENTATIONS[name], draws):
        images = apply(images, params)
    return images


def augment(name: str, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One batch drawn and augmented on its own (the training loop draws per epoch)."""
    return apply_augmentation(name, images, draw_augmentation(name, len(images), generator, images.device))


# ------------------------------------------------------------ learning-rate schedules
# name -> the learning rate's factor at ``progress`` in [0, 1) of a trial's training steps.
# A pure function of the step, so a resumed trial recomputes it from its epoch: nothing to checkpoint.

ONE_CYCLE_WARMUP = 0.3  # share of the steps spent rising, as torch's OneCycleLR (pct_start)
ONE_CYCLE_START = 1 / 25  # the first step's factor, as OneCycleLR's div_factor


def cosine_factor(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


def one_cycle_factor(progress: float) -> float:
    """A linear rise from 1/25 to 1 over the first 30% of the steps, then cosine to 0 (the
    learning rate's half of the one-cycle policy; momentum is not cycled)."""
    if progress < ONE_CYCLE_WARMUP:
        return ONE_CYCLE_START + (1 - ONE_CYCLE_START) * progress / ONE_CYCLE_WARMUP
    return cosine_factor((progress - ONE_CYCLE_WARMUP) / (1 - ONE_CYCLE_WARMUP))


SCHEDULES = {
    "constant": lambda progress: 1.0,
    "cosine": cosine_factor,
    "onecycle": one_cycle_factor,
}
check_table(SCHEDULE_NAMES, SCHEDULES, "schedules")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every training step (batch) of a trial, set before each step."""

    name: str  # a name in SCHEDULES
    lr: float  # the configured (for one-cycle: the peak) learning rate
    epochs: int
    steps_per_epoch: int

    @classmethod
    def of(cls, config: TrialConfig, train_images: int) -> "LRSchedule":
        return cls(config.schedule, config.lr, config.epochs, math.ceil(train_images / config.batch_size))

    def rate(self, epoch: int, step: int) -> float:
        """The rate of batch ``step`` (from 0) of ``epoch`` (from 1)."""
        done = (epoch - 1) * self.steps_per_epoch + step
        return self.lr * SCHEDULES[self.name](min(done / (self.epochs * self.steps_per_epoch), 1.0))


# name -> (autocast dtype, None for plain fp32; needs a GradScaler). fp16's narrow exponent
# range underflows small gradients unless the loss is scaled; bf16 has fp32's range.
PRECISIONS = {
    "fp32": (None, False),
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, True),
}
check_table(PRECISION_NAMES, PRECISIONS, "precisions")


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite (typically a learning rate far too high)."""


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    skipped_steps: int = 0  # fp16 batches whose loss overflowed: GradScaler skipped their step


# With loss scaling, a batch whose fp16 loss overflows is skipped (weights untouched) and the
# scale lowered; such batches are part of normal fp16 training. Past this share of an epoch's
# batches the trial is diverged, not unlucky.
MAX_SKIPPED_SHARE = 0.5


def optimizer_extras(name: str) -> dict:
    """The keyword arguments optimizer ``name`` is built with besides the learning rate,
    e.g. ``{"momentum": 0.9}`` for SGD."""
    return dict(OPTIMIZERS[name][1])


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float | None = None) -> torch.optim.Optimizer:
    """``weight_decay``: replaces the table's (None: keep it); every optimizer of the table takes one."""
    optimizer_class, extras = OPTIMIZERS[name]
    if weight_decay is not None:
        extras = {**extras, "weight_decay": weight_decay}
    return optimizer_class([p for p in model.parameters() if p.requires_grad], lr=lr, **extras)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns the generator that shuffles batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX512-BF16 or AMX): there bf16 autocast trains faster than
    fp32 (docs/PERFORMANCE.md); elsewhere it is emulated and slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence getattr
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def gpu_has_bf16(device: torch.device | int | None = None) -> bool:
    """Ampere (compute capability 8.0) and later; older GPUs only emulate bf16, slowly."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def bf16_problem(device: torch.device | int) -> str | None:
    """Why ``--precision bf16`` must not run on this GPU (a T4 or V100 "supports" bf16 only by
    emulation, many times slower than fp16); None where it is native."""
    if gpu_has_bf16(device):
        return None
    name, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
    return f"--precision bf16: {name} (compute capability {major}.{minor}) has no native bf16 (needs 8.0+): use fp16 or auto"


def runs_on(arches: list[str], major: int, minor: int) -> bool:
    """Whether a build for ``arches`` (``torch.cuda.get_arch_list()``: sm_80, sm_90, compute_90...)
    runs on a GPU of compute capability major.minor: a binary (sm_XY) runs on X.Y and later
    minors of X, PTX (compute_XY) is compiled for anything from X.Y on."""
    for arch in arches:
        kind, _, number = arch.partition("_")
        if not number.isdigit() or len(number) < 2:
            continue  # e.g. sm_90a: a variant next to sm_90
        built = (int(number[:-1]), int(number[-1]))
        if (kind == "sm" and built[0] == major and built[1] <= minor) or (kind == "compute" and built <= (major, minor)):
            return True
    return False


def cuda_problem() -> str | None:
    """Why this process cannot train on its GPUs with this torch, as one clause with what to
    install; None when it can."""
    if not torch.cuda.is_available():
        cuda = torch.version.cuda or "none"
        return (f"torch {torch.__version__} (built for CUDA {cuda}) cannot use it: no NVIDIA driver, or one older than CUDA {cuda} "
                f"needs; install a driver for CUDA {cuda}, or a torch wheel built for the driver's CUDA")
    arches = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        if not runs_on(arches, major, minor):
            return (f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) is not among the architectures "
                    f"torch {torch.__version__} was built for ({', '.join(arches)}); install a torch wheel built for it")
    return None


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs with bf16 (fp16 + loss scaling on older ones); on the CPU bf16
    where it is native, else fp32. Other names are returned as they are."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if gpu_has_bf16(device) else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


class Runtime:
    """How a model runs on ``device``: its precision (autocast dtype and loss scaling),
    channels_last memory format for conv models, cuDNN autotuning, optional torch.compile."""

    def __init__(self, device: torch.device | str, precision: str = "fp32", channels_last: bool = False, compile: bool = False):
        self.device = torch.device(device)
        if precision == "bf16" and self.device.type == "cuda" and (problem := bf16_problem(self.device)):
            raise ValueError(problem)  # on a joined cluster the driver could not see this GPU
        self.precision = resolve_precision(precision, self.device)
        self.dtype, scaled = PRECISIONS[self.precision]
        # Disabled, the scaler passes the loss and the step through: one code path for all.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaled)
        self.channels_last = channels_last
        self.compile = compile

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def prepare(self, model: nn.Module, transform) -> nn.Module:
        """Move ``model`` to the device in the runtime's format, and make ``transform``'s
        batches match. Compiled in place (``Module.compile``), so state dicts keep their keys."""
        model.to(self.device)
        if self.channels_last and isinstance(transform, BatchTransform):  # image batches, conv models
            model.to(memory_format=torch.channels_last)
            transform.memory_format = torch.channels_last
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a trial's input size is fixed: autotune once
        if self.compile:
            import torch._inductor.config as inductor

            # its compile workers share the trial's CPUs (Ray's share, set as torch's threads), not the node's
            inductor.compile_threads = max(1, torch.get_num_threads())
            model.compile()
        return model

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skipped when fp16 gradients overflowed
        self.scaler.update()


def default_runtime(model: nn.Module) -> Runtime:
    return Runtime(next(model.parameters()).device)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    transform: BatchTransform,
    batch_size: int,
    generator: torch.Generator | None = None,
    runtime: Runtime | None = None,
    augmentation: str = "none",
    label_smoothing: float = 0.0,
    schedule: LRSchedule | None = None,
    epoch: int = 1,
) -> EpochStats:
    """One pass over the shuffled ``images``. ``augmentation``: a name in AUGMENTATIONS;
    ``schedule`` sets the learning rate of each batch of ``epoch`` (None: left as it is)."""
    model.train()
    runtime = runtime or default_runtime(model)
    device = runtime.device
    # Sums stay on the device: no host sync per batch (it would stall a GPU).
    total_loss = torch.zeros((), device=device)
    loss_images = torch.zeros((), device=device, dtype=torch.long)  # of batches with a finite loss
    skipped = torch.zeros((), device=device, dtype=torch.long)
    correct = torch.zeros((), device=device, dtype=torch.long)
    steps = 0
    draws = draw_augmentation(augmentation, len(labels), generator, device)  # the whole epoch's, moved once
    for step, (x, y) in enumerate(iterate_batches(images, labels, batch_size, shuffle=True, generator=generator)):
        start = step * batch_size
        batch_draws = [d[start : start + len(y)] for d in draws]
        x, y = transform(apply_augmentation(augmentation, to_device(x, device), batch_draws)), to_device(y, device)
        if schedule is not None:
            rate = schedule.rate(epoch, step)
            for group in optimizer.param_groups:
                group["lr"] = rate
        with runtime.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        runtime.backward_step(loss, optimizer)
        batch_loss = loss.detach()
        finite = torch.isfinite(batch_loss)
        total_loss += torch.where(finite, batch_loss, 0.0) * len(y)
        loss_images += finite * len(y)
        skipped += ~finite
        correct += (logits.argmax(1) == y).sum()
        steps += 1
    skipped_steps = int(skipped.item())
    # Unscaled (fp32, bf16), a non-finite loss has already written NaN into the weights.
    if skipped_steps and (not runtime.scaler.is_enabled() or skipped_steps > MAX_SKIPPED_SHARE * steps):
        raise DivergedError(f"training loss became NaN or infinite in {skipped_steps} of {steps} batches: the learning rate is probably too high")
    return EpochStats(total_loss.item() / max(loss_images.item(), 1), correct.item() / len(labels), skipped_steps)


EVAL_BATCH = 512  # images per evaluation batch at up to EVAL_BATCH_SIZE_PX pixels a side
EVAL_BATCH_SIZE_PX = 64


def eval_batch_size(transform) -> int:
    """Images per evaluation batch: 512 up to 64x64 inputs, fewer for larger ones, so that an
    evaluation needs no more memory than 512 images at 64 px (AlexNet at 224 px: 41)."""
    size = getattr(transform, "size", None)  # None: feature vectors
    if not size or size <= EVAL_BATCH_SIZE_PX:
        return EVAL_BATCH
    return max(1, EVAL_BATCH * EVAL_BATCH_SIZE_PX**2 // size**2)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    transform: BatchTransform,
    batch_size: int | None = None,
    runtime: Runtime | None = None,
) -> EpochStats:
    """Mean loss and accuracy over ``images``; ``batch_size`` None: :func:`eval_batch_size`."""
    batch_size = batch_size or eval_batch_size(transform)
    model.eval()
    runtime = runtime or default_runtime(model)
    device = runtime.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in iterate_batches(images, labels, batch_size, shuffle=False):
        x, y = transform(to_device(x, device)), to_device(y, device)
        with runtime.autocast():
            logits = model(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").float()
        correct += (logits.argmax(1) == y).sum()
    n = len(labels)
    loss = total_loss.item() / n
    correct = correct.item()
    return EpochStats(loss if math.isfinite(loss) else float("nan"), correct / n)


CHECKPOINT_FILE = "model.pt"


@dataclass(frozen=True)
class CheckpointPolicy:
    """The epochs at which a trial saves its model and optimizer. A full checkpoint each epoch
    (0.7 GB for AlexNet fine-tuned with Adam) can cost more than a GPU epoch; what must never
    be missing is a checkpoint of the epoch a trial ends on, since its test accuracy is measured
    on it: its last epoch, the epochs at which ASHA may stop it (``milestones``, its rungs) and,
    once the time budget is over (``deadline``, a ``time.time()``), every epoch, as each may be
    the last. Between them: every ``every`` epochs, or (None) whenever the last save cost at
    most ``MAX_COST_SHARE`` of the training since the checkpoint before. An interrupted trial
    goes on from its last checkpoint, so sparser checkpoints cost redone epochs after a crash."""

    milestones: tuple[int, ...] = ()
    every: int | None = None
    deadline: float | None = None
    MAX_COST_SHARE = 0.1

    def due(self, epoch: int, last_epoch: int, trained_s: float, last_save_s: float | None, now: float) -> bool:
        """``trained_s``: seconds of training since the last checkpoint; ``last_save_s``: what
        the last save cost (None: none yet in this run of the trial)."""
        if epoch >= last_epoch or epoch in self.milestones or (self.deadline is not None and now >= self.deadline):
            return True
        if self.every is not None:
            return epoch % self.every == 0
        return last_save_s is None or last_save_s <= self.MAX_COST_SHARE * trained_s

    def epochs_saved(self, epochs: int, epoch_s: float, save_s: float) -> list[int]:
        """The epochs a trial of ``epochs`` epochs of ``epoch_s`` seconds saves at, when a save
        costs ``save_s`` (before the deadline, if any): what the policy does, for benchmarks."""
        saved, trained_s, last_save_s = [], 0.0, None
        for epoch in range(1, epochs + 1):
            trained_s += epoch_s
            if self.due(epoch, epochs, trained_s, last_save_s, now=float("-inf")):
                saved.append(epoch)
                trained_s, last_save_s = 0.0, save_s
        return saved


def asha_milestones(grace_period: int, max_t: int, reduction_factor: int) -> tuple[int, ...]:
    """The epochs at which Ray's ASHA (one bracket) compares a trial with the others and may
    stop it: ``grace_period * reduction_factor**k`` up to ``max_t``, computed as Ray does."""
    rungs = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
    return tuple(sorted(grace_period * reduction_factor**k for k in range(rungs)))


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    config: TrialConfig,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Model and optimizer state after ``epoch`` epochs, the trial config that trained them
    (and fp16's loss scale). Frozen parameters are left out (they equal the pretrained weights
    the model is built from), which keeps feature-extraction checkpoints small."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name for name, _ in model.named_parameters()} - trainable
    state = {k: v for k, v in model.state_dict().items() if k not in frozen}
    checkpoint = {"model": state, "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config.to_dict()}
    if scaler is not None and scaler.is_enabled():
        checkpoint["scaler"] = scaler.state_dict()
    torch.save(checkpoint, Path(directory) / CHECKPOINT_FILE)


def load_model_state(directory: str | Path) -> dict:
    """The model state dict of a checkpoint (to transfer it to another task)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["model"]


def load_checkpoint_config(directory: str | Path) -> TrialConfig | None:
    """The trial config a checkpoint was trained with; None for checkpoints from before
    checkpoints carried it. Memory-mapped: the weights are not read."""
    checkpoint = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True, mmap=True)
    return TrialConfig.from_dict(checkpoint["config"]) if "config" in checkpoint else None


def load_checkpoint(
    directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None
) -> int:
    """Restore what :func:`save_checkpoint` wrote; returns the number of epochs done."""
    state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location=next(model.parameters()).device, weights_only=True)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    try:
        result = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        raise ValueError(f"checkpoint in {directory} does not fit the model: {exc}") from None
    if result.unexpected_keys or set(result.missing_keys) - frozen:
        raise ValueError(f"checkpoint in {directory} does not fit the model: {result}")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"])


def setup_model(config: TrialConfig, splits, pretrained_state: dict | None) -> tuple[nn.Module, BatchTransform | FeatureTransform]:
    """The model a trial ``config`` describes, and the batch transform that feeds it.
    On cached features (``config.on_cached_features``) the splits hold backbone features and the model is the head.
    The initial weights come from ``config.seed`` alone, whatever ran before in this process
    (a Ray actor reused for another trial)."""
    seed_everything(config.seed)
    if config.on_cached_features:
        head = nn.Linear(splits.train.images.shape[1], splits.num_classes)
        return BackboneHead(nn.Identity(), head), FeatureTransform()
    return setup_image_model(config.model_spec, config.mode, splits, pretrained_state)


def setup_image_model(spec: ModelSpec, mode: str, splits, pretrained_state: dict | None) -> tuple[BackboneHead, BatchTransform]:
    """The model ``spec`` describes in ``mode`` for ``splits``' images, and its batch transform."""
    channels, size, mean, std = input_spec(
        spec.model, splits.channels, splits.image_size, spec.channels, spec.image_size, splits.mean, splits.std
    )
    model = build_model(
        spec.model, mode, splits.num_classes, channels, size, spec.activation, pretrained_state,
        spec.width, spec.depth, spec.batch_norm, params=dict(spec.params),
    )  # fmt: skip
    return model, BatchTransform(channels, size, mean, std)
