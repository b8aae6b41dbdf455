"""Models: a vanilla CNN with a choice of activation (and, for the extended search, of width,
depth and BatchNorm), and AlexNet, both as backbone + head.

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

from tltune.catalog import ACTIVATION_NAMES, CNN_MAX_DEPTH, MODELS, MODES, PRETRAINED_MODES, check_table  # noqa: F401 (re-exported)
from tltune.errors import UserError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}
check_table(ACTIVATION_NAMES, ACTIVATIONS, "activations")
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


CNN_CHANNELS = 32  # of the first conv block; each further block doubles it
CNN_HIDDEN = 128  # the hidden Linear layer's width


def cnn_hidden(width: int = 1) -> int:
    """The size of the CNN's features, which its head takes."""
    return CNN_HIDDEN * width


def cnn_backbone(
    in_channels: int, image_size: int, activation: str = "relu", width: int = 1, depth: int = 2, batch_norm: bool = False
) -> nn.Sequential:
    """``depth`` blocks of 3x3 conv (+ BatchNorm), activation and 2x2 max-pool, with 32, 64,
    128 channels times ``width``, then a hidden Linear layer of 128 times ``width``; for 1- or
    3-channel square images. The defaults are the vanilla CNN of the seed's rows, layer for layer."""
    if not (width >= 1 and 1 <= depth <= CNN_MAX_DEPTH):
        raise UserError(f"the CNN takes a width of 1 or more and 1 to {CNN_MAX_DEPTH} conv blocks, got width {width}, depth {depth}")
    side = image_size // 2**depth
    if side < 1:
        raise UserError(f"a {image_size}x{image_size} input vanishes in the CNN's {depth} pooling steps: use fewer blocks or a larger --image-size")
    act = ACTIVATIONS[activation]
    layers, channels = [], in_channels
    for block in range(depth):
        out = CNN_CHANNELS * width * 2**block
        norm = [nn.BatchNorm2d(out)] if batch_norm else []
        layers += [nn.Conv2d(channels, out, 3, padding=1), *norm, act(), nn.MaxPool2d(2)]
        channels = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * side * side, cnn_hidden(width)), act())


def alexnet_backbone(imagenet_state: dict | None) -> nn.Sequential:
    import torchvision  # here: importing it costs seconds (torch._dynamo), which CNN-only trials skip

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
    width: int = 1,
    depth: int = 2,
    batch_norm: bool = False,
) -> BackboneHead:
    """``pretrained_state``: torchvision's AlexNet state dict for AlexNet; for the CNN, the
    state dict of a CNN trained on a source task (its head is dropped). None in a
    pretrained mode means random initialisation: the caller decided and warned.
    ``width``, ``depth``, ``batch_norm``: the CNN's (:func:`cnn_backbone`); AlexNet has none."""
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}': use one of {', '.join(MODES)}")
    # The head is created first, so it draws the same initial weights as the head that
    # trains alone on cached features (tltune.features).
    if model == "alexnet":
        head = nn.Linear(4096, num_classes)
        return BackboneHead(alexnet_backbone(pretrained_state), head, mode == "feature_extract")
    if model == "cnn":
        head = nn.Linear(cnn_hidden(width), num_classes)
        backbone = cnn_backbone(in_channels, image_size, activation, width, depth, batch_norm)
        if pretrained_state is not None:
            source = {k[len("backbone.") :]: v for k, v in pretrained_state.items() if k.startswith("backbone.")}
            try:
                backbone.load_state_dict(source)
            except RuntimeError as exc:
                raise UserError(f"the source CNN does not fit this CNN ({str(exc).splitlines()[0]}): same input channels, size, activation, width and depth?") from None
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
    import torchvision

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
