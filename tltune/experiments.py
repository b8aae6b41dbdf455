"""Experiments as data: what to train, the reference settings, and the space searched around them.

Each :class:`Experiment` is one row of the seed exercise's tables. A sweep always evaluates
the reference settings first (so the reproduction is part of every sweep) and then searches
``space``. The space is declared here with one hierarchy of plain types (``Choice``,
``LogUniform``, ``IntRange``), translated once per target: to Ray Tune domains in
``tltune.raytune.sweep.to_tune_domain``, to Optuna distributions in
``tltune.studies.distribution``, to TensorBoard HParams domains by ``hparams_domain()``.
A new experiment is a few lines in ``EXPERIMENTS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tltune.catalog import (
    ACTIVATION_NAMES,
    AUGMENTATION_NAMES,
    CNN_MAX_DEPTH,
    DATASET_SHAPES,
    MODELS,
    MODES,
    OPTIMIZER_NAMES,
    SCHEDULE_NAMES,
)
from tltune.errors import UserError


@dataclass(frozen=True)
class Choice:
    options: tuple

    def contains(self, value) -> bool:
        return value in self.options

    def check(self, name: str) -> None:
        if not self.options:
            raise UserError(f"search space '{name}': no options to choose from")

    def hparams_domain(self) -> frozenset:
        """TensorBoard HParams' view (tltune.raytune.callbacks): the values themselves."""
        return frozenset(self.options)


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float

    def contains(self, value) -> bool:
        return self.low <= value <= self.high

    def check(self, name: str) -> None:
        if not (0 < self.low < self.high and math.isfinite(self.high)):
            raise UserError(f"search space '{name}': need 0 < low < high, got [{self.low}, {self.high}]")

    def hparams_domain(self) -> tuple[float, float]:
        return (float(self.low), float(self.high))


@dataclass(frozen=True)
class IntRange:
    """Integers from ``low`` to ``high``, both included."""

    low: int
    high: int

    def contains(self, value) -> bool:
        return self.low <= value <= self.high

    def check(self, name: str) -> None:
        if not self.low <= self.high:
            raise UserError(f"search space '{name}': empty range [{self.low}, {self.high}]")

    def hparams_domain(self) -> tuple[float, float]:
        return (float(self.low), float(self.high))


@dataclass(frozen=True)
class Experiment:
    name: str
    dataset: str
    model: str
    mode: str
    label: str  # "Model type" column of the seed's table
    reference: dict  # the seed's settings: optimizer, lr, epochs, and activation for the CNN
    reference_accuracy: float | None  # the seed's test accuracy in %, None where it never filled the cell
    space: dict = field(default_factory=dict)  # hyperparameter -> Choice | LogUniform | IntRange
    num_samples: int = 1  # trials in a full run; the first one is the reference
    input: dict = field(default_factory=dict)  # fixed input format, e.g. {"channels": 3, "image_size": 32}
    # For the CNN: the experiment whose best trial supplies the architecture (its activation)
    # and, in a pretrained mode, the backbone weights.
    source: str | None = None


def max_epochs(reference: dict, space: dict) -> int:
    """The most epochs a trial of ``reference`` and ``space`` can train."""
    epochs = space.get("epochs")
    return max(reference["epochs"], epochs.high if isinstance(epochs, IntRange) else 0)


CNN_SEARCH_SPACE = {
    "optimizer": Choice(OPTIMIZER_NAMES),
    "activation": Choice(ACTIVATION_NAMES),
    "lr": LogUniform(1e-5, 1e-1),
    "epochs": IntRange(1, 10),
}
ALEXNET_SEARCH_SPACE = {
    "optimizer": Choice(("sgd", "adam", "adamw", "rmsprop")),
    "lr": LogUniform(1e-5, 1e-2),
    "epochs": IntRange(1, 10),
}
CNN_REFERENCE = {"optimizer": "adam", "activation": "relu", "lr": 0.001, "epochs": 5}


def alexnet_pair(dataset: str, epochs: int, finetune_accuracy: float, extract_accuracy: float) -> list[Experiment]:
    """The seed's two AlexNet rows of a dataset: fine-tuning and feature extraction, SGD lr 0.001."""
    reference = {"optimizer": "sgd", "lr": 0.001, "epochs": epochs}
    return [
        Experiment(f"{dataset}-alexnet-finetune", dataset, "alexnet", "finetune",
                   "AlexNet (ImageNet) fine-tuning", reference, finetune_accuracy, ALEXNET_SEARCH_SPACE),
        Experiment(f"{dataset}-alexnet-feature_extract", dataset, "alexnet", "feature_extract",
                   "AlexNet (ImageNet) feature extraction", reference, extract_accuracy, ALEXNET_SEARCH_SPACE),
    ]  # fmt: skip


# MNIST -> SVHN: both as 3-channel 32x32 images, SVHN's native format. MNIST digits are
# resized 28 -> 32 and their gray channel copied to R, G and B; each dataset is normalised
# with its own per-channel statistics. The same CNN then fits both without any change.
MNIST_TO_SVHN_INPUT = dict(zip(("channels", "image_size"), DATASET_SHAPES["svhn"]))


def mnist_to_svhn() -> list[Experiment]:
    """Train the CNN on MNIST, then on SVHN: fine-tune it, train only its head, and (the
    control) train the same CNN from scratch, so the transfer's gain is a number."""
    source = "mnist_to_svhn-source"
    space = {k: v for k, v in CNN_SEARCH_SPACE.items() if k != "activation"}  # the source fixes it
    common = dict(space=space, num_samples=10, input=MNIST_TO_SVHN_INPUT, source=source)
    return [
        Experiment(source, "mnist", "cnn", "scratch", "vanilla CNN on MNIST as 3x32x32 (transfer source)",
                   CNN_REFERENCE, None, CNN_SEARCH_SPACE, num_samples=10, input=MNIST_TO_SVHN_INPUT),
        Experiment("mnist_to_svhn-finetune", "svhn", "cnn", "finetune",
                   "vanilla CNN pretrained on MNIST, fine-tuned", CNN_REFERENCE, None, **common),
        Experiment("mnist_to_svhn-feature_extract", "svhn", "cnn", "feature_extract",
                   "vanilla CNN pretrained on MNIST, only the last Linear trained", CNN_REFERENCE, None, **common),
        Experiment("mnist_to_svhn-scratch", "svhn", "cnn", "scratch",
                   "vanilla CNN from scratch (control)", CNN_REFERENCE, None, **common),
    ]  # fmt: skip


# Beyond the seed (issue #12): what practitioners tune besides optimizer, activation, lr and
# epochs, within 10 epochs, on a CNN one block deeper and with BatchNorm. The reference is a
# known-good CIFAR recipe (SGD momentum + one-cycle, flip+crop, label smoothing, weight decay
# 5e-4), so the sweep starts from a strong point; the ranges stay where such recipes work, so
# a 90-minute CPU budget (about 30 trials, most stopped by ASHA) is not spent on hopeless corners.
# Width 4 trains at about 250 s per epoch on one CPU thread (bf16), 40 minutes a trial: left out.
CNN_PLUS_SEARCH_SPACE = {
    "optimizer": Choice(("sgd", "adamw")),
    "activation": Choice(("relu", "leaky_relu", "elu", "gelu")),
    "lr": LogUniform(1e-3, 0.2),  # SGD's good range is the top, AdamW's the bottom
    "epochs": IntRange(4, 10),
    "batch_size": Choice((64, 128, 256)),
    "weight_decay": LogUniform(5e-5, 5e-3),
    "augmentation": Choice(("flip_crop", "flip", "none")),
    "width": Choice((1, 2)),
    "label_smoothing": Choice((0.0, 0.1)),
    "schedule": Choice(("onecycle", "cosine", "constant")),
}
CNN_PLUS_REFERENCE = {
    "optimizer": "sgd", "activation": "relu", "lr": 0.05, "epochs": 10, "batch_size": 128, "weight_decay": 5e-4,
    "augmentation": "flip_crop", "width": 2, "label_smoothing": 0.1, "schedule": "onecycle",
    "depth": 3, "batch_norm": True,  # fixed: the architecture every trial of the search shares
}  # fmt: skip

EXPERIMENTS = {
    e.name: e
    for e in [
        *alexnet_pair("cifar10", 10, 88.93, 84.43),
        Experiment(
            "cifar10-cnn-search", "cifar10", "cnn", "scratch",
            "small CNN, best of the search", {"optimizer": "adam", "activation": "tanh", "lr": 1e-4, "epochs": 3},
            53.0, CNN_SEARCH_SPACE, num_samples=30,
        ),
        Experiment("mnist-cnn", "mnist", "cnn", "scratch", "vanilla CNN", CNN_REFERENCE, 98.0, CNN_SEARCH_SPACE, num_samples=10),
        *alexnet_pair("mnist", 5, 99.57, 97.52),
        Experiment("svhn-cnn", "svhn", "cnn", "scratch", "vanilla CNN", CNN_REFERENCE, 87.0, CNN_SEARCH_SPACE, num_samples=10),
        *alexnet_pair("svhn", 5, 94.30, 46.56),
        *mnist_to_svhn(),
        Experiment(
            "cifar10-cnn-search-plus", "cifar10", "cnn", "scratch",
            "CNN, 3 conv blocks + BatchNorm, extended search (beyond the seed)", CNN_PLUS_REFERENCE, None,
            CNN_PLUS_SEARCH_SPACE, num_samples=30,
        ),
    ]
}  # fmt: skip

# What the seed never states, what tltune chose, and why (the report and docs/RESULTS.md show it)
ASSUMPTIONS = [
    ("the 53% small CNN of the CIFAR-10 search", "the vanilla CNN of the MNIST/SVHN rows: two 3x3 conv blocks (32, 64 channels, max-pool) and a hidden Linear of 128",
     "the seed names only the searched optimizer, activation, lr and epochs; one CNN for every row keeps the rows comparable"),
    ("optimizer and activation of the vanilla CNN rows", "Adam, ReLU, lr 1e-3, 5 epochs",
     "the seed gives 5 epochs only; Adam at 1e-3 with ReLU is PyTorch's usual default, and the search tries the others"),
    ("SGD of the AlexNet rows (lr 0.001)", "momentum 0.9, also wherever a search tries SGD", "the transfer-learning tutorial the exercise follows uses SGD with momentum 0.9; plain SGD at 1e-3 barely moves in 5-10 epochs"),
    ("the other optimizers' settings", "PyTorch's defaults: AdamW weight decay 0.01, none for Adam, RMSprop, Adagrad", "the seed names the optimizers only"),
    ("loss", "cross-entropy (label smoothing only where the extended search tries it)", "the usual classification loss; the seed names none"),
    ("batch size", "64", "the seed gives none; 64 is the tutorials' value and fits every model in CPU memory"),
    ("data augmentation", "none", "the seed mentions none; the extended search (issue #12) searches it"),
    ("learning-rate schedule", "none (constant)", "the seed gives one learning rate per row"),
    ("model selection", "10% of the training set held out (seeded), so every model trains on the other 90%; trials compete on their last epoch's validation accuracy; the test set scores only the best and the reference trial, at their last epoch",
     "the seed reports test accuracy; choosing on the test set would overstate it"),
    ("ours, best of the search, with repeats", "mean ± std over the search's own trial (seed 0) and re-trainings with seeds 1, 2; a trial ASHA stopped is re-trained with the same schedule, stopped at the same epoch",
     "the seed-0 trial won a selection on validation accuracy, so its mean leans high by that selection; the re-trained seeds do not"),
    ("AlexNet input", "224x224 (64x64 with --quick); MNIST's gray channel copied to RGB", "torchvision's ImageNet weights expect 3x224x224"),
    ("normalisation", "AlexNet: ImageNet's mean and std; the CNN: each dataset's own per-channel mean and std", "pretrained weights expect the statistics they were trained with; the seed gives none"),
    ("the CNN's input", "each dataset's own size and channels (MNIST 1x28x28, CIFAR-10 and SVHN 3x32x32); MNIST resized to 3x32x32 for the MNIST -> SVHN transfer rows", "the transfer needs one input format on both datasets"),
    ("initial weights", "PyTorch's default initialisation, drawn from the trial's seed (0 for the search, 1, 2 for the repeats); AlexNet rows: ImageNet weights, a new last Linear", "the seed gives none; one seed per trial makes every number reproducible"),
    ("the search", "Optuna TPE (seeded), the reference as its first trial; ASHA over epochs with grace period 2 and reduction factor 3; two trials at a time on this 2-core machine",
     "the exercise searches by hand; TPE and ASHA spend the same time on more promising settings"),
    ("feature extraction", "every layer frozen but the last Linear (AlexNet's Dropouts inactive); the frozen part's output computed once",
     "the seed's definition; computing it once changes the time, not the result"),
    ("the reference trial", "always trained to its full epochs (ASHA never stops it) and tested", "so the seed's settings get a number of ours"),
    ("precision", "--precision auto: bf16 autocast where the hardware has it natively (this CPU: AVX512-BF16; GPUs from Ampere), else fp32 on a CPU and fp16 with loss scaling on a GPU; each trial records what it used", "1.8x the fp32 speed for the small CNN on one thread of this CPU (docs/PERFORMANCE.md), same accuracy; the seed states none"),
    ("the extended search's CNN (cifar10-cnn-search-plus)", "three conv blocks (32, 64, 128 channels times the searched width 1 or 2) with BatchNorm, hidden Linear of 128 times the width",
     "the 75% target within 10 CPU epochs; a third block and BatchNorm are the usual first additions to a small CNN, and the seed's rows keep the vanilla CNN"),
    ("the extended search's reference", "SGD momentum 0.9, lr 0.05 one-cycle, batch 128, weight decay 5e-4, flip + 4-px crop, label smoothing 0.1, width 2, 10 epochs",
     "a known-good CIFAR-10 recipe, so the search starts from a strong point"),
    ("learning-rate schedules", "stepped per batch; one-cycle rises linearly from lr/25 over 30% of the steps, then cosine to 0; cosine runs from lr to 0 over the trial's epochs",
     "torch's OneCycleLR defaults, without momentum cycling; recomputed from the epoch, so a resumed trial continues it exactly"),
]

# What ``tltune sweep FAMILY`` and each ``sweeps/FAMILY.py`` run, in order
FAMILIES = {
    "cifar10": ["cifar10-alexnet-finetune", "cifar10-alexnet-feature_extract", "cifar10-cnn-search"],
    "mnist": ["mnist-cnn", "mnist-alexnet-finetune", "mnist-alexnet-feature_extract"],
    "svhn": ["svhn-cnn", "svhn-alexnet-finetune", "svhn-alexnet-feature_extract"],
    "mnist_to_svhn": [e.name for e in mnist_to_svhn()],
    "cifar10_plus": ["cifar10-cnn-search-plus"],  # on its own: 90 minutes, beyond the seed's cifar10 rows
    "all": [name for name in EXPERIMENTS if name != "cifar10-cnn-search-plus"],  # the seed's rows
}


def validate(experiment: Experiment) -> None:
    """Every name known, every range well-formed; raises UserError otherwise."""
    e = experiment
    if e.model not in MODELS:
        raise UserError(f"experiment {e.name}: unknown model '{e.model}' (use {', '.join(MODELS)})")
    if e.mode not in MODES:
        raise UserError(f"experiment {e.name}: unknown mode '{e.mode}' (use {', '.join(MODES)})")
    for name, domain in e.space.items():
        domain.check(f"{e.name}.{name}")
    if e.source is not None and (e.model != "cnn" or e.source not in EXPERIMENTS or EXPERIMENTS[e.source].model != "cnn"):
        raise UserError(f"experiment {e.name}: source '{e.source}' must be a declared CNN experiment, and {e.name} a CNN")
    if e.model == "cnn" and e.mode != "scratch" and e.source is None:
        raise UserError(f"experiment {e.name}: a pretrained CNN needs a source experiment to take its weights from")
    missing = set(e.space) - set(e.reference)
    if missing:
        raise UserError(f"experiment {e.name}: searched {sorted(missing)} without a reference value: add them to reference")
    check_settings({**e.reference}, where=f"experiment {e.name}")
    for name, domain in e.space.items():
        if isinstance(domain, Choice):
            for option in domain.options:
                check_settings({name: option}, where=f"experiment {e.name} search space")


def is_whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# hyperparameter -> (whether a value is good, the error's requirement)
VALUE_CHECKS = {
    "lr": (lambda v: v > 0 and math.isfinite(v), "learning rate must be > 0"),
    "weight_decay": (lambda v: v is None or (v >= 0 and math.isfinite(v)), "weight_decay must be >= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "label_smoothing must be in [0, 1)"),
    "epochs": (is_whole_number, "epochs must be a whole number >= 1"),
    "batch_size": (is_whole_number, "batch_size must be a whole number >= 1"),
    "width": (is_whole_number, "width must be a whole number >= 1"),
    "depth": (lambda v: is_whole_number(v) and v <= CNN_MAX_DEPTH, f"depth must be a whole number from 1 to {CNN_MAX_DEPTH}"),
    "batch_norm": (lambda v: isinstance(v, bool), "batch_norm must be true or false"),
}


def check_settings(settings: dict, where: str) -> None:
    """Check hyperparameter values a user or a declaration gives."""
    choices = {"optimizer": OPTIMIZER_NAMES, "activation": ACTIVATION_NAMES, "augmentation": AUGMENTATION_NAMES, "schedule": SCHEDULE_NAMES}
    for key, table in choices.items():
        if key in settings and settings[key] not in table:
            raise UserError(f"{where}: unknown {key} '{settings[key]}' (use {', '.join(table)})")
    for key, (good, requirement) in VALUE_CHECKS.items():
        if key in settings and not good(settings[key]):
            raise UserError(f"{where}: {requirement}, got {settings[key]}")


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment '{name}': use one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
