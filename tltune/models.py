"""Models: a vanilla CNN with a choice of activation, and AlexNet for transfer learning.

AlexNet is split into a ``backbone`` (everything up to the last Linear: conv features,
pooling and the two hidden fully connected layers with their Dropout) and a ``head`` (the
last Linear, sized for the task). Modes:

- ``scratch``: random initialisation, everything trains;
- ``finetune``: ImageNet weights, everything trains;
- ``feature_extract``: ImageNet weights, only the head trains; the backbone is frozen and
  kept in eval mode, so its Dropout layers are off and its output per image is fixed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from tltune.errors import UserError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}
MODELS = ("cnn", "alexnet")
MODES = ("scratch", "finetune", "feature_extract")
PRETRAINED_MODES = ("finetune", "feature_extract")
ALEXNET_MIN_SIZE = 63  # smaller inputs vanish in AlexNet's conv/pool stack
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VanillaCNN(nn.Module):
    """Two conv blocks and two Linear layers; for 1- or 3-channel square images."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, activation: str = "relu"):
        super().__init__()
        act = ACTIVATIONS[activation]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), act(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), act(), nn.MaxPool2d(2),
        )  # fmt: skip
        side = image_size // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 128), act(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TransferAlexNet(nn.Module):
    """torchvision's AlexNet as ``backbone`` + ``head``; see the module docstring for modes."""

    def __init__(self, num_classes: int, freeze_backbone: bool, imagenet_state: dict | None = None):
        super().__init__()
        alexnet = torchvision.models.alexnet()
        if imagenet_state is not None:
            alexnet.load_state_dict(imagenet_state)
        self.backbone = nn.Sequential(alexnet.features, alexnet.avgpool, nn.Flatten(), *alexnet.classifier[:-1])
        self.head = nn.Linear(alexnet.classifier[-1].in_features, num_classes)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "TransferAlexNet":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_model(
    model: str,
    mode: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    activation: str = "relu",
    imagenet_state: dict | None = None,
) -> nn.Module:
    if model == "cnn":
        if mode != "scratch":
            raise UserError(f"the vanilla CNN has no pretrained weights: use mode 'scratch', not '{mode}'")
        return VanillaCNN(in_channels, num_classes, image_size, activation)
    if model == "alexnet":  # imagenet_state None in a pretrained mode: random init, the caller warned
        return TransferAlexNet(num_classes, freeze_backbone=mode == "feature_extract", imagenet_state=imagenet_state)
    raise UserError(f"unknown model '{model}': use one of {', '.join(MODELS)}")


def input_spec(model: str, dataset_channels: int, dataset_size: int, image_size: int | None, mean, std):
    """(channels, size, mean, std) the model is fed: AlexNet takes RGB with ImageNet statistics."""
    if model == "alexnet":
        size = image_size or 224
        if size < ALEXNET_MIN_SIZE:
            raise UserError(f"AlexNet needs --image-size of at least {ALEXNET_MIN_SIZE}, got {size}")
        return 3, size, IMAGENET_MEAN, IMAGENET_STD
    size = image_size or dataset_size
    if size < 4:
        raise UserError(f"--image-size must be at least 4 for the CNN, got {size}")
    return dataset_channels, size, mean, std


def load_imagenet_state(weights: str) -> dict:
    """AlexNet's ImageNet weights: 'imagenet' downloads through torchvision (cached in the
    torch hub folder); anything else is a path to a state dict saved from
    ``torchvision.models.alexnet()``. Checked against the architecture here, so a wrong file
    fails before any trial starts."""
    if weights == "imagenet":
        try:
            state = torchvision.models.AlexNet_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as exc:  # URLError when offline
            raise UserError(
                f"could not download AlexNet's ImageNet weights ({type(exc).__name__}: {exc}). "
                "When offline, pass --weights PATH to a state dict saved with "
                "torch.save(torchvision.models.alexnet(weights='IMAGENET1K_V1').state_dict(), PATH)"
            ) from None
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"weights file {path} does not exist: pass --weights imagenet, none, or an existing file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"cannot read weights file {path} ({type(exc).__name__}): is it a torch.save'd state dict?") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    try:
        torchvision.models.alexnet().load_state_dict(state)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"weights {weights} do not fit torchvision's AlexNet ({first_line}): "
            "pass a state dict of torchvision.models.alexnet()"
        ) from None
    return state
