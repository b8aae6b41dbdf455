"""Models: a vanilla CNN with a choice of activation, and AlexNet, both as backbone + head.

Every model is a :class:`BackboneHead`: the ``backbone`` is everything up to the last
Linear (for AlexNet: conv features, pooling and the two hidden fully connected layers with
their Dropout), the ``head`` is the last Linear, sized for the task. Modes:

- ``scratch``: random initialisation, everything trains;
- ``finetune``: pretrained backbone (ImageNet for AlexNet, a source task for the CNN),
  everything trains;
- ``feature_extract``: pretrained backbone, only the head trains; the backbone is frozen
  and kept in eval mode, so its Dropout layers are off and its output per image is fixed.

The head is always new: pretrained weights never include it.
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


class BackboneHead(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Linear, freeze_backbone: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "BackboneHead":
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def cnn_backbone(in_channels: int, image_size: int, activation: str = "relu") -> nn.Sequential:
    """Two conv blocks and a hidden Linear layer of 128; for 1- or 3-channel square images."""
    act = ACTIVATIONS[activation]
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side * side, 128), act(),
    )  # fmt: skip


def alexnet_backbone(imagenet_state: dict | None) -> nn.Sequential:
    alexnet = torchvision.models.alexnet()
    if imagenet_state is not None:
        alexnet.load_state_dict(imagenet_state)
    return nn.Sequential(alexnet.features, alexnet.avgpool, nn.Flatten(), *alexnet.classifier[:-1])


def build_model(
    model: str,
    mode: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    activation: str = "relu",
    pretrained_state: dict | None = None,
) -> BackboneHead:
    """``pretrained_state``: torchvision's AlexNet state dict for AlexNet; for the CNN, the
    state dict of a CNN trained on a source task (its head is dropped). None in a
    pretrained mode means random initialisation: the caller decided and warned."""
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}': use one of {', '.join(MODES)}")
    # The head is created first, so it draws the same initial weights as the head that
    # trains alone on cached features (tltune.features).
    if model == "alexnet":
        head = nn.Linear(4096, num_classes)
        return BackboneHead(alexnet_backbone(pretrained_state), head, mode == "feature_extract")
    if model == "cnn":
        head = nn.Linear(128, num_classes)
        backbone = cnn_backbone(in_channels, image_size, activation)
        if pretrained_state is not None:
            source = {k[len("backbone.") :]: v for k, v in pretrained_state.items() if k.startswith("backbone.")}
            try:
                backbone.load_state_dict(source)
            except RuntimeError as exc:
                raise UserError(f"the source CNN does not fit this CNN ({str(exc).splitlines()[0]}): same input channels, size and activation?") from None
        return BackboneHead(backbone, head, mode == "feature_extract")
    raise UserError(f"unknown model '{model}': use one of {', '.join(MODELS)}")


def input_spec(model: str, dataset_channels: int, dataset_size: int, channels: int | None, image_size: int | None, mean, std):
    """(channels, size, mean, std) the model is fed: AlexNet takes RGB with ImageNet statistics;
    the CNN takes the dataset's (or the requested) channels and size with the dataset's statistics."""
    if model == "alexnet":
        size = image_size or 224
        if size < ALEXNET_MIN_SIZE:
            raise UserError(f"AlexNet needs --image-size of at least {ALEXNET_MIN_SIZE}, got {size}")
        return 3, size, IMAGENET_MEAN, IMAGENET_STD
    size = image_size or dataset_size
    if size < 4:
        raise UserError(f"--image-size must be at least 4 for the CNN, got {size}")
    return channels or dataset_channels, size, mean, std


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
