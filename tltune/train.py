"""The training loop: optimizers by name, one epoch of training, evaluation, checkpoints.

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

from tltune.data import BatchTransform, iterate_batches
from tltune.features import FeatureTransform
from tltune.models import BackboneHead, build_model, input_spec

OPTIMIZERS = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr),
}


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite (typically a learning rate far too high)."""


@dataclass
class EpochStats:
    loss: float
    accuracy: float


def build_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], lr)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns the generator that shuffles batches."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    transform: BatchTransform,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> EpochStats:
    model.train()
    device = next(model.parameters()).device
    # Sums stay on the device: no host sync per batch (it would stall a GPU).
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in iterate_batches(images, labels, batch_size, shuffle=True, generator=generator):
        x, y = transform(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    mean_loss = total_loss.item() / len(labels)
    if not math.isfinite(mean_loss):
        raise DivergedError(f"training loss became {mean_loss}: the learning rate is probably too high")
    return EpochStats(mean_loss, correct.item() / len(labels))


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, transform: BatchTransform, batch_size: int = 512
) -> EpochStats:
    model.eval()
    device = next(model.parameters()).device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in iterate_batches(images, labels, batch_size, shuffle=False):
        x, y = transform(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = len(labels)
    loss = total_loss.item() / n
    correct = correct.item()
    return EpochStats(loss if math.isfinite(loss) else float("nan"), correct / n)


CHECKPOINT_FILE = "model.pt"


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int) -> None:
    """Model and optimizer state after ``epoch`` epochs. Frozen parameters are left out
    (they equal the pretrained weights the model is built from), which keeps
    feature-extraction checkpoints small."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name for name, _ in model.named_parameters()} - trainable
    state = {k: v for k, v in model.state_dict().items() if k not in frozen}
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "epoch": epoch}, Path(directory) / CHECKPOINT_FILE)


def load_model_state(directory: str | Path) -> dict:
    """The model state dict of a checkpoint (to transfer it to another task)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["model"]


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
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
    return int(state["epoch"])


def setup_model(config: dict, splits, pretrained_state: dict | None) -> tuple[nn.Module, BatchTransform]:
    """The model a trial ``config`` describes, and the batch transform that feeds it.
    With ``cached_features`` the splits hold backbone features and the model is the head."""
    if config.get("cached_features"):
        head = nn.Linear(splits.train.images.shape[1], splits.num_classes)
        return BackboneHead(nn.Identity(), head), FeatureTransform()
    channels, size, mean, std = input_spec(
        config["model"],
        splits.channels,
        splits.image_size,
        config.get("channels"),
        config.get("image_size"),
        splits.mean,
        splits.std,
    )
    model = build_model(
        config["model"],
        config["mode"],
        splits.num_classes,
        channels,
        size,
        config.get("activation", "relu"),
        pretrained_state,
    )
    return model, BatchTransform(channels, size, mean, std)
