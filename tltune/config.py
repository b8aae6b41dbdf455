"""A trial's configuration, typed: Ray Tune's config dict as frozen dataclasses.

The sweep (``tltune.raytune.sweep.trial_config``) builds Tune's ``param_space`` as a plain
dict, and Tune hands each trial a dict with the same keys. ``tltune.raytune.trainable``
turns it into a :class:`TrialConfig` once; everything below it takes the dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """The network a trial builds and the input format it is fed: all that a frozen
    backbone's features depend on, besides its weights and the images."""

    model: str  # a name tltune.models resolves: cnn, alexnet, a torchvision model, "module:function"
    activation: str = "relu"  # the CNN's; AlexNet's configs have none
    image_size: int | None = None  # None: 224 for AlexNet, the dataset's for the CNN
    channels: int | None = None  # None: the dataset's (AlexNet always takes 3)
    width: int = 1  # the CNN's channel multiplier (tltune.models.cnn_backbone)
    depth: int = 2  # the CNN's conv blocks
    batch_norm: bool = False  # after each of the CNN's convs
    params: tuple = ()  # a user factory's keyword arguments, as sorted (name, value) pairs


# The hyperparameters that shape the network: a frozen backbone computed once cannot serve a
# search over any of them (nor over a user factory's keyword arguments: see model_shape_keys).
MODEL_SHAPE_KEYS = ("activation", "width", "depth", "batch_norm")


@dataclass(frozen=True)
class TrialConfig:
    """Every key of a trial's config. The defaults are those of configs that lack the key:
    AlexNet's (no activation), those of runs from before --precision and --compile, and
    the seed's training (the keys the extended search of issue #12 added)."""

    dataset: str
    model: str
    mode: str  # "scratch", "finetune" or "feature_extract"
    optimizer: str  # a name in tltune.train.OPTIMIZERS
    lr: float
    epochs: int
    batch_size: int
    seed: int
    activation: str = "relu"
    image_size: int | None = None
    channels: int | None = None
    cached_features: bool = False  # in feature_extract mode, the splits hold backbone features (on_cached_features)
    precision: str = "fp32"  # a name in tltune.train.PRECISION_CHOICES ("auto" included)
    compile: bool = False
    width: int = 1
    depth: int = 2
    batch_norm: bool = False
    weight_decay: float | None = None  # None: the optimizer's own (tltune.train.OPTIMIZERS)
    augmentation: str = "none"  # a name in tltune.train.AUGMENTATIONS
    label_smoothing: float = 0.0
    schedule: str = "constant"  # a name in tltune.train.SCHEDULES: the learning rate over the trial's epochs
    stop_epoch: int | None = None  # train only this many of the epochs (a repeat of a trial ASHA stopped: same schedule, same stop)
    # A user factory's keyword arguments (searched or fixed): their names, comma-separated, and
    # their values under those names in the config, flat like every other hyperparameter.
    factory_keys: str = ""
    params: tuple = ()  # the factory's keyword arguments as sorted (name, value) pairs: no key of Tune's config

    @classmethod
    def from_dict(cls, config: dict) -> "TrialConfig":
        # Unknown keys are refused, not ignored: no version of tltune put other keys in a
        # trial's config than the fields and the factory keywords that factory_keys names,
        # so one is a mistake in whoever built the dict.
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "params"}
        named = set(filter(None, str(config.get("factory_keys", "")).split(",")))
        unknown = sorted(set(config) - set(fields) - named)
        required = [name for name, f in fields.items() if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in config] + sorted(named - set(config))
        if unknown or missing:
            problems = [f"{what} {keys}" for what, keys in (("unknown keys", unknown), ("missing keys", missing)) if keys]
            raise ValueError(f"not a trial config ({', '.join(problems)}): {config}")
        params = tuple(sorted((k, plain(config[k])) for k in named))
        return cls(**{k: v for k, v in config.items() if k in fields}, params=params)

    def to_dict(self) -> dict:
        """The flat config Tune gave, in plain Python values (Tune's samplers may give NumPy
        scalars), so it can go into a checkpoint that ``torch.load(weights_only=True)`` reads,
        or into JSON."""
        fields = {k: plain(v) for k, v in dataclasses.asdict(self).items() if k != "params"}
        return {**fields, **dict(self.params)}

    @property
    def on_cached_features(self) -> bool:
        """The splits hold the frozen backbone's features and the model is the head alone."""
        return self.cached_features and self.mode == "feature_extract"

    @property
    def model_spec(self) -> ModelSpec:
        params = self.params if ":" in self.model else ()  # only a user factory takes keywords
        return ModelSpec(self.model, self.activation, self.image_size, self.channels, self.width, self.depth, self.batch_norm, params)


def plain(value):
    return value.item() if isinstance(value, np.generic) else value


TRIAL_CONFIG_KEYS = frozenset(f.name for f in dataclasses.fields(TrialConfig) if f.name != "params")


def factory_params(values: dict) -> dict:
    """The keys of a reference or a search space that are no TrialConfig field: a user
    factory's keyword arguments. ``model`` and ``mode`` are fields, so searching them is not."""
    return {k: v for k, v in values.items() if k not in TRIAL_CONFIG_KEYS}


def model_shape_keys(keys) -> set:
    """Those of ``keys`` that change the network a trial builds: the CNN's shape and a user
    factory's keyword arguments (a frozen backbone computed once cannot serve a search over them)."""
    return {k for k in keys if k in MODEL_SHAPE_KEYS or k not in TRIAL_CONFIG_KEYS}
