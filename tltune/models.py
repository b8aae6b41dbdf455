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

A model name is one of:

- ``cnn`` or ``alexnet``: the built-in models above;
- any torchvision classification model (``resnet18``, ``mobilenet_v3_small``, ``vit_b_16``...,
  ``torchvision.models.list_models(module=torchvision.models)``): built without weights, the
  pretrained state loaded into the whole model, then split at its last ``nn.Linear`` (last in
  ``named_modules()`` order), which becomes ``nn.Identity()`` in the backbone; the head is a
  new ``nn.Linear`` of the same input size, sized for the task;
- a user factory ``"package.module:function"``, called as ``function(num_classes, **params)``
  (``params``: its searched keyword arguments, such as ``dropout``) and returning an
  ``nn.Module``, split by the first rule that applies:

  1. a :class:`BackboneHead` is used as it is (its head as the factory made it);
  2. a module with attributes ``backbone`` and ``head``, the head an ``nn.Linear``: those two;
  3. otherwise its last ``nn.Linear`` is the head, as for torchvision models;
  4. a module without any ``nn.Linear`` is refused: every mode trains a head.

  A pretrained state for a factory model (a state-dict file) is loaded into the factory's
  model, the head's keys left out; the factory may also load its own weights.

New heads (torchvision and factory models) draw the same initial weights as a head created
before the backbone, as the built-in models do: the random state is restored before the head
is made, so the head equals the one trained alone on cached features (tltune.features).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from tltune.catalog import ACTIVATION_NAMES, CNN_MAX_DEPTH, MODELS, MODES, PRETRAINED_MODES, WEIGHTS_NAME, check_table  # noqa: F401 (re-exported)
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

    if imagenet_state is None:
        alexnet = torchvision.models.alexnet()
    else:  # every weight comes from the state: allocated, not randomly initialised first (0.6 CPU-s here)
        with torch.device("meta"):
            alexnet = torchvision.models.alexnet()
        alexnet.to_empty(device="cpu").load_state_dict(imagenet_state)
    return nn.Sequential(alexnet.features, alexnet.avgpool, nn.Flatten(), *alexnet.classifier[:-1])


FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MODEL_CHOICES = 'cnn, alexnet, any torchvision classification model such as resnet18, or "package.module:function"'
# Builder arguments some torchvision models need: googlenet and inception_v3 return a tensor
# (no auxiliary outputs) and take ImageNet-normalised input as their ported weights expect.
TORCHVISION_EXTRAS = {
    "googlenet": {"aux_logits": False, "init_weights": False, "transform_input": True},
    "inception_v3": {"aux_logits": False, "init_weights": False, "transform_input": True},
}
# State keys of the auxiliary classifiers the models above are built without.
AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def is_factory(name: str) -> bool:
    """A user factory ``package.module:function`` (recognised by its colon)."""
    return ":" in name


@functools.lru_cache(maxsize=1)
def torchvision_models() -> tuple[str, ...]:
    """The names of torchvision's classification models."""
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def model_kind(name: str) -> str:
    """``"cnn"``, ``"alexnet"``, ``"torchvision"`` or ``"factory"``. Only a torchvision name
    imports torchvision (seconds), so CNN-only runs stay light."""
    if name in MODELS:
        return name
    if is_factory(name):
        if not FACTORY_PATTERN.match(name):
            raise UserError(f"model factory '{name}' is not of the form package.module:function")
        return "factory"
    if name in torchvision_models():
        return "torchvision"
    close = difflib.get_close_matches(name.lower(), (*MODELS, *torchvision_models()), n=1)
    hint = f"did you mean {close[0]}? ({MODEL_CHOICES})" if close else f"use {MODEL_CHOICES}"
    raise UserError(f"unknown model '{name}': {hint}")


def load_factory(name: str) -> Callable[..., nn.Module]:
    """The function a factory name ``package.module:function`` names."""
    if model_kind(name) != "factory":
        raise UserError(f"model '{name}' is not a factory (package.module:function)")
    module_name, function_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises when imported
        raise UserError(f"model factory {name}: cannot import {module_name} ({type(exc).__name__}: {_first_line(exc)})") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise UserError(f"model factory {name}: module {module_name} has no {function_name}")
    if not callable(function):
        raise UserError(f"model factory {name}: {module_name}.{function_name} is not callable")
    return function


def check_model_name(name: str, where: str = "") -> None:
    """Refuse an unknown model, or a factory that cannot be imported, before any trial starts."""
    try:
        if model_kind(name) == "factory":
            load_factory(name)
    except UserError as exc:
        raise UserError(f"{where}: {exc}" if where else str(exc)) from None


def check_factory_keywords(name: str, keywords: list[str], where: str) -> None:
    """A spec's keyword for a factory (in its reference or space) that the factory does not
    take is refused now, by name, rather than once the data has loaded (a ``**kwargs`` factory
    takes any)."""
    import inspect

    try:
        parameters = list(inspect.signature(load_factory(name)).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin or C callable): the call will tell
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    takes = [p.name for p in parameters[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]  # the first: num_classes
    for keyword in keywords:
        if keyword not in takes:
            close = difflib.get_close_matches(keyword, takes, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"{where}: {keyword} is no keyword of the factory {name}: {hint}it takes {', '.join(takes) or 'none besides num_classes'}")


def uses_imagenet_weights(model: str) -> bool:
    """Whether ``weights: imagenet`` applies to ``model``: AlexNet and torchvision models."""
    return model_kind(model) in ("alexnet", "torchvision")


def _first_line(exc: BaseException) -> str:
    """The line of ``exc``'s message that says what went wrong (for load_state_dict's
    errors the first mismatch, under their heading)."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1]
    return lines[0] if lines and lines[0] else type(exc).__name__


def last_linear(module: nn.Module) -> str | None:
    """The name of ``module``'s last ``nn.Linear`` in ``named_modules()`` order, None if none."""
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear) and name]
    return names[-1] if names else None


def split_at_last_linear(module: nn.Module, name: str, num_classes: int, rng_state: torch.Tensor) -> tuple[nn.Module, nn.Linear]:
    """``module`` with its Linear ``name`` replaced by ``nn.Identity()`` (the backbone) and a new
    head in its place, drawn from ``rng_state`` (the random state before the model was built),
    so it equals a head created first."""
    last = module.get_submodule(name)
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name), child, nn.Identity())
    torch.set_rng_state(rng_state)
    return module, nn.Linear(last.in_features, num_classes)


def load_state_except(module: nn.Module, state: dict, skip: tuple[str, ...]) -> None:
    """Load ``state`` into ``module``, every key but those under the ``skip`` prefixes (the
    head, absent auxiliary classifiers); RuntimeError naming the first mismatch."""
    if not isinstance(state, dict):
        raise RuntimeError(f"a state dict is a dict, got {type(state).__name__}")
    result = module.load_state_dict({k: v for k, v in state.items() if not k.startswith(skip)}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(skip)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"missing keys {missing[:3]}, unexpected keys {result.unexpected_keys[:3]}")


def torchvision_model(name: str, image_size: int | None = None, params: dict | None = None) -> nn.Module:
    """torchvision's ``name`` without weights, with ``num_classes`` left at ImageNet's 1000 (its
    classifier is replaced anyway) and ``params`` as builder arguments."""
    import torchvision

    kwargs = {**TORCHVISION_EXTRAS.get(name, {}), **(params or {})}
    if image_size is not None and name.startswith("vit_"):
        kwargs.setdefault("image_size", image_size)  # a ViT takes exactly this size
    if image_size is not None and name.startswith("maxvit"):
        kwargs.setdefault("input_size", (image_size, image_size))
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as exc:
        raise UserError(f"cannot build torchvision's {name} with {params or {}} ({type(exc).__name__}: {_first_line(exc)})") from None


def _torchvision_backbone_head(
    name: str, num_classes: int, image_size: int, pretrained_state: dict | None, params: dict | None, rng_state: torch.Tensor
) -> tuple[nn.Module, nn.Linear]:
    module = torchvision_model(name, image_size, params)
    head_name = classifier_name(module)
    if pretrained_state is not None:
        try:
            load_state_except(module, pretrained_state, (head_name + ".", *AUX_PREFIXES))
        except Exception as exc:
            raise UserError(f"the pretrained state does not fit torchvision's {name} ({_first_line(exc)}): pass a state dict of torchvision.models.get_model('{name}')") from None
    if isinstance(module.get_submodule(head_name), nn.Conv2d):  # SqueezeNet's
        # SqueezeNet classifies with a 1x1 conv and a ReLU before its pooling: without them its
        # backbone ends in the pooled 512 features, which a Linear head takes.
        module.classifier[1], module.classifier[2] = nn.Identity(), nn.Identity()
        torch.set_rng_state(rng_state)
        return module, nn.Linear(512, num_classes)
    return split_at_last_linear(module, head_name, num_classes, rng_state)


SQUEEZENET_CLASSIFIER = "classifier.1"


def classifier_name(module: nn.Module) -> str:
    """The name of a torchvision model's classifier, which the head replaces: its last Linear,
    or SqueezeNet's final conv (it has no Linear)."""
    import torchvision

    if isinstance(module, torchvision.models.SqueezeNet):
        return SQUEEZENET_CLASSIFIER
    name = last_linear(module)
    if name is None:  # none in torchvision's classification models today
        raise UserError(f"torchvision's {type(module).__name__} has no nn.Linear to replace by a head")
    return name


def _factory_backbone_head(
    name: str, num_classes: int, pretrained_state: dict | None, params: dict | None, rng_state: torch.Tensor
) -> tuple[nn.Module, nn.Linear]:
    function = load_factory(name)
    try:
        module = function(num_classes, **(params or {}))
    except Exception as exc:  # noqa: BLE001  a user's factory may raise anything
        raise UserError(f"model factory {name} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"model factory {name} returned a {type(module).__name__}, not a torch.nn.Module")
    own_head = isinstance(module, BackboneHead) or (
        isinstance(getattr(module, "backbone", None), nn.Module) and isinstance(getattr(module, "head", None), nn.Linear)
    )
    head_name = "head" if own_head else last_linear(module)
    if head_name is None:
        raise UserError(
            f"model factory {name} returned a model without an nn.Linear: every mode trains a head, "
            "so its model needs a last nn.Linear (or backbone and head attributes, the head an nn.Linear)"
        )
    if pretrained_state is not None:
        try:
            load_state_except(module, pretrained_state, (head_name + ".",))
        except Exception as exc:
            raise UserError(f"the pretrained state does not fit the model of factory {name} ({_first_line(exc)})") from None
    if own_head:
        if module.head.out_features != num_classes:
            raise UserError(f"model factory {name} made a head of {module.head.out_features} outputs for {num_classes} classes")
        return module.backbone, module.head
    return split_at_last_linear(module, head_name, num_classes, rng_state)


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
    params: dict | None = None,
) -> BackboneHead:
    """``pretrained_state``: torchvision's state dict for AlexNet and torchvision models (its
    classifier is dropped); for the CNN, the state dict of a CNN trained on a source task (its
    head is dropped); for a factory, a state dict of the factory's model. None in a
    pretrained mode means random initialisation: the caller decided and warned.
    ``width``, ``depth``, ``batch_norm``: the CNN's (:func:`cnn_backbone`); AlexNet has none.
    ``params``: keyword arguments of a factory (or of torchvision's builder)."""
    if mode not in MODES:
        raise UserError(f"unknown mode '{mode}': use one of {', '.join(MODES)}")
    kind = model_kind(model)
    freeze = mode == "feature_extract"
    if params and kind in MODELS:
        raise UserError(f"the {model} model takes no parameters, got {', '.join(params)}")
    # The head is created first, so it draws the same initial weights as the head that
    # trains alone on cached features (tltune.features).
    if kind == "alexnet":
        head = nn.Linear(4096, num_classes)
        return BackboneHead(alexnet_backbone(pretrained_state), head, freeze)
    if kind == "cnn":
        head = nn.Linear(cnn_hidden(width), num_classes)
        backbone = cnn_backbone(in_channels, image_size, activation, width, depth, batch_norm)
        if pretrained_state is not None:
            source = {k[len("backbone.") :]: v for k, v in pretrained_state.items() if k.startswith("backbone.")}
            try:
                backbone.load_state_dict(source)
            except RuntimeError as exc:
                raise UserError(f"the source CNN does not fit this CNN ({str(exc).splitlines()[0]}): same input channels, size, activation, width and depth?") from None
        return BackboneHead(backbone, head, freeze)
    # Other models make their head last, from the random state before they were built.
    rng_state = torch.get_rng_state()
    if kind == "torchvision":
        backbone, head = _torchvision_backbone_head(model, num_classes, image_size, pretrained_state, params, rng_state)
    else:
        backbone, head = _factory_backbone_head(model, num_classes, pretrained_state, params, rng_state)
    return BackboneHead(backbone, head, freeze)


def default_weights(model: str):
    """The DEFAULT weights enum member of torchvision's ``model``, None if it has none."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(model).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def input_spec(model: str, dataset_channels: int, dataset_size: int, channels: int | None, image_size: int | None, mean, std):
    """(channels, size, mean, std) the model is fed: AlexNet and torchvision models take RGB
    with the statistics (and by default the crop size) of their ImageNet weights; the CNN and
    factory models take the dataset's (or the requested) channels and size with the dataset's
    statistics."""
    kind = model_kind(model)
    if kind == "alexnet":
        size = image_size or 224
        if size < ALEXNET_MIN_SIZE:
            raise UserError(f"AlexNet needs --image-size of at least {ALEXNET_MIN_SIZE}, got {size}")
        return 3, size, IMAGENET_MEAN, IMAGENET_STD
    if kind == "torchvision":
        weights = default_weights(model)
        if weights is None:
            return 3, image_size or 224, IMAGENET_MEAN, IMAGENET_STD
        transforms = weights.transforms()
        return 3, image_size or int(transforms.crop_size[0]), tuple(transforms.mean), tuple(transforms.std)
    size = image_size or dataset_size
    if size < 4:
        raise UserError(f"--image-size must be at least 4 for the {'CNN' if kind == 'cnn' else 'model'}, got {size}")
    return channels or dataset_channels, size, mean, std


def _weights_member(model: str, weights: str):
    """The torchvision weights of ``model`` that ``weights`` names ("IMAGENET1K_V2",
    "ResNet50_Weights.IMAGENET1K_V2", "DEFAULT"); UserError listing the valid ones."""
    import torchvision

    enum = torchvision.models.get_model_weights(model)
    prefix, _, member = weights.rpartition(".")
    if prefix in ("", enum.__name__):
        try:
            return enum[member]
        except KeyError:
            pass
    valid = ", ".join(w.name for w in enum)
    raise UserError(f"weights {weights} are not torchvision's for {model}: use imagenet, one of {valid}, or a state-dict file")


def _read_state_file(weights: str) -> dict:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist: pass --weights imagenet, none, or an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot read weights file {path} ({type(exc).__name__}): is it a torch.save'd state dict?") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def _download(model: str, member) -> dict:
    try:
        return member.get_state_dict(progress=False)
    except Exception as exc:  # URLError when offline
        if model == "alexnet":
            raise UserError(
                f"could not download AlexNet's ImageNet weights ({type(exc).__name__}: {_first_line(exc)}). "
                "When offline, pass --weights PATH to a state dict saved with "
                "torch.save(torchvision.models.alexnet(weights='IMAGENET1K_V1').state_dict(), PATH)"
            ) from None
        raise UserError(
            f"could not download {model}'s {member.name} weights ({type(exc).__name__}: {_first_line(exc)}): "
            f"pass a state-dict file, e.g. weights: {{{model}: FILE}} in the spec or --weights FILE, saved with "
            f"torch.save(torchvision.models.get_model('{model}', weights='{member.name}').state_dict(), FILE)"
        ) from None


def load_pretrained_state(model: str, weights: str) -> dict:
    """The pretrained state dict ``weights`` names for ``model``: "imagenet" (torchvision's
    DEFAULT weights; AlexNet's IMAGENET1K_V1), downloaded through torchvision (cached in the
    torch hub folder); a torchvision weights name of the model; anything else a path to a
    state dict file. AlexNet and torchvision states are checked against the architecture
    here, so a wrong file fails before any trial starts; a factory's state is checked when its
    model is built (its shape depends on the task)."""
    kind = model_kind(model)
    if kind not in ("alexnet", "torchvision"):
        if weights == "imagenet" or (WEIGHTS_NAME.match(weights) and not Path(weights).expanduser().is_file()):
            raise UserError(f"model {model} takes pretrained weights from a state-dict file only, got {weights}")
        return _read_state_file(weights)
    import torchvision

    if weights == "imagenet":
        member = torchvision.models.AlexNet_Weights.IMAGENET1K_V1 if kind == "alexnet" else default_weights(model)
        if member is None:
            raise UserError(f"torchvision has no ImageNet weights for {model}: pass a state-dict file")
        state = _download(model, member)
    elif WEIGHTS_NAME.match(weights) and not Path(weights).expanduser().is_file():
        state = _download(model, _weights_member(model, weights))
    else:
        state = _read_state_file(weights)
    try:
        if kind == "alexnet":  # names and shapes checked on a model without memory, so nothing initialised or copied
            with torch.device("meta"):
                torchvision.models.alexnet().load_state_dict(state, assign=True)
        else:
            reference = torchvision_model(model, _state_image_size(state))
            load_state_except(reference, state, (classifier_name(reference) + ".", *AUX_PREFIXES))
    except Exception as exc:
        display = "AlexNet" if kind == "alexnet" else model
        source = "torchvision.models.alexnet()" if kind == "alexnet" else f"torchvision.models.get_model('{model}')"
        raise UserError(f"weights {weights} do not fit torchvision's {display} ({_first_line(exc)}): pass a state dict of {source}") from None
    return state


def _state_image_size(state) -> int | None:
    """The input size a ViT state dict was trained at (its position embeddings fix it), else None."""
    if not isinstance(state, dict):
        return None
    pos, patch = state.get("encoder.pos_embedding"), state.get("conv_proj.weight")
    if not (isinstance(pos, torch.Tensor) and isinstance(patch, torch.Tensor) and pos.dim() == 3 and patch.dim() == 4):
        return None
    side = round((pos.shape[1] - 1) ** 0.5)
    return side * patch.shape[-1]


def load_imagenet_state(weights: str) -> dict:
    """AlexNet's ImageNet weights (:func:`load_pretrained_state` for ``alexnet``)."""
    return load_pretrained_state("alexnet", weights)
