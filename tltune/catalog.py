"""The names a user may write — optimizers, activations, augmentations, schedules, precisions,
models, modes — and the shape of each dataset tltune knows, without importing torch.

The torch modules key their tables by these names (``train.OPTIMIZERS``, ``models.ACTIVATIONS``,
...) and check at import that they agree, so the command line, the checks and ``tltune list``
read the names from here and stay light.
"""

import os
import re

OPTIMIZER_NAMES = ("adam", "adamw", "sgd", "rmsprop", "adagrad")
ACTIVATION_NAMES = ("relu", "tanh", "sigmoid", "leaky_relu", "elu", "gelu")
AUGMENTATION_NAMES = ("none", "flip", "flip_crop")
SCHEDULE_NAMES = ("constant", "cosine", "onecycle")
PRECISION_NAMES = ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto", *PRECISION_NAMES)

MODELS = ("cnn", "alexnet")
# a torchvision weights name (IMAGENET1K_V2, ResNet50_Weights.IMAGENET1K_V2); any other weights but
# imagenet and none name a state-dict file
WEIGHTS_NAME = re.compile(r"^(?:\w+_Weights\.)?[A-Z][A-Z0-9_]*$")

MODES = ("scratch", "finetune", "feature_extract")
PRETRAINED_MODES = ("finetune", "feature_extract")
CNN_MAX_DEPTH = 3

# "1" in the environment of Ray's nodes: their GPUs are logical (test clusters), trials train on the CPU
LOGICAL_GPUS_ENV = "TLTUNE_LOGICAL_GPUS"

# dataset -> (channels, image size) of the datasets torchvision knows (tltune.data reads them)
DATASET_SHAPES = {"cifar10": (3, 32), "mnist": (1, 28), "svhn": (3, 32)}


def looks_like_path(text: str) -> bool:
    """Whether a dataset or weights value is written as a path (pets/, ./pets, ~/pets), not a name."""
    return os.sep in text or text.startswith((".", "~"))


def check_table(names: tuple, table: dict, what: str) -> None:
    """A torch module's table keyed by exactly ``names``, in their order."""
    if tuple(table) != tuple(names):
        raise RuntimeError(f"tltune.catalog's {what} {names} and the table {tuple(table)} disagree")
