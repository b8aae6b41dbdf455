"""Every option of a sweep, typed, in one place: ``SweepOptions``.

The command line's flags are generated from its fields (``build_parser``), ``tltune.run(**kw)``
is ``SweepOptions.from_keywords(**kw)``, ``runs.jsonl`` records ``options.record()`` and
``--resume`` reads it back through ``SweepOptions.from_record``. Each field carries its type,
default, help and group; ``__post_init__`` checks types and values, so every face gets the
same one-line ``UserError``. Light: no torch, no Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field

from tltune.catalog import ACTIVATION_NAMES, OPTIMIZER_NAMES, PRECISION_CHOICES
from tltune.errors import UserError
from tltune.experiments import IntRange, LogUniform, check_settings
from tltune.specs import check_image_size, parse_duration

# --quick: the same code path on a subset, small AlexNet input, few trials: minutes on a laptop CPU.
QUICK = {
    "train_subset": 4000,
    "test_subset": 2000,
    "alexnet_image_size": 64,
    "max_epochs": 4,
    "num_samples": 8,
    "grace_period": 1,
    "repeats": 1,
}
DEFAULT_REPEATS = 3
DEFAULT_BATCH_SIZE = 64
DEFAULT_GRACE_PERIOD = 2
GROUPS = ("data", "model and training", "sweep")


def option(default, help: str, group: str | None = None, metavar=None, choices: tuple | None = None):
    """A field of SweepOptions: its default and what ``--help`` says of it."""
    return field(default=default, metadata={"help": help, "group": group, "metavar": metavar, "choices": choices})


@dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep. ``None`` means "the experiment's own value" (or the preset's)."""

    quick: bool = option(False, "a few-minute CPU run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    experiments: tuple[str, ...] | None = option(None, "run only these experiments", metavar="NAME")
    # data
    data_root: str | None = option(None, "dataset folder (else $TLTUNE_DATA_ROOT, else ./data)", "data")
    dataset: str | None = option(None, "run the experiments on another dataset: mnist, svhn, cifar10, or a class-folder dataset under the data root", "data")
    train_subset: int | None = option(None, "train on this many images (default: all)", "data")
    test_subset: int | None = option(None, "test on this many images (default: all)", "data")
    val_fraction: float = option(0.1, "share of the training set held out for validation (default 0.1)", "data")
    image_size: int | None = option(None, "model input size (default: 224 for AlexNet, native for the CNN)", "data")
    # model and training
    weights: str | None = option(
        None, "pretrained models' weights: 'imagenet' (each model's torchvision weights, downloaded), 'none', a torchvision weights "
        "name (IMAGENET1K_V2), a state-dict file, or MODEL=SOURCE,... one per model (default: a spec's weights, else imagenet)", "model and training")  # fmt: skip
    optimizer: str | None = option(None, "fix the optimizer instead of searching it", "model and training", choices=OPTIMIZER_NAMES)
    activation: str | None = option(None, "fix the CNN activation instead of searching it", "model and training", choices=ACTIVATION_NAMES)
    lr: float | None = option(None, "fix the learning rate instead of searching it", "model and training")
    epochs: int | None = option(None, "fix the number of epochs instead of searching it", "model and training")
    lr_range: tuple[float, float] | None = option(None, "search the learning rate log-uniformly in [LOW, HIGH]", "model and training", ("LOW", "HIGH"))
    epochs_range: tuple[int, int] | None = option(None, "search epochs in [LOW, HIGH]", "model and training", ("LOW", "HIGH"))
    max_epochs: int | None = option(None, "cap every epoch count (reference and search)", "model and training")
    batch_size: int | None = option(None, f"fix the batch size (default {DEFAULT_BATCH_SIZE}, or searched where an experiment searches it)", "model and training")
    no_feature_cache: bool = option(False, "feature extraction: run the frozen backbone in every epoch instead of once", "model and training")
    precision: str = option(
        "auto", "(default) auto: bf16 on GPUs that have it (Ampere+), else fp16 with loss scaling; on a CPU bf16 where it is native "
        "(AVX512-BF16, AMX), else fp32", "model and training", choices=PRECISION_CHOICES)  # fmt: skip
    compile: bool = option(False, "torch.compile each trial's model: minutes of compiling per trial, pays only on long GPU trials (docs/PERFORMANCE.md)", "model and training")
    seed: int = option(0, "seeds the data split, the searcher and every trial (default 0)", "model and training")
    # sweep
    num_samples: int | None = option(None, "trials per experiment (default: each experiment's own)", "sweep")
    max_concurrent_trials: int | None = option(None, "default: as many as the cluster holds, its autoscaler's nodes included", "sweep")
    cpus_per_trial: float | None = option(None, "default: the CPUs of a node shared among the trials", "sweep")
    gpus_per_trial: float | None = option(None, "fractions pack trials on one GPU (default: 1 if the cluster has GPU nodes or its autoscaler can add them, else 0)", "sweep")
    repeats: int | None = option(
        None, f"after the search, train the reference and the best configuration with this many seeds in all and report mean ± std "
        f"(default {DEFAULT_REPEATS}; 1 with --quick: no re-training)", "sweep")  # fmt: skip
    grace_period: int | None = option(None, f"ASHA: epochs before a trial may be stopped (default {DEFAULT_GRACE_PERIOD})", "sweep")
    source_run: str | None = option(None, "transfer experiments: take the source CNN from this run (default: this run)", "sweep", "RUN_DIR")
    resume: str | None = option(
        None, "continue an interrupted run with its original settings: finished experiments are kept, unfinished trials go on from their checkpoints", "sweep", "RUN_DIR")  # fmt: skip
    warm_start: str | None = option(None, "first evaluate the best configurations of the same experiments in a previous run", "sweep", "RUN_DIR")
    address: str | None = option(None, "join this Ray cluster (else $RAY_ADDRESS, else start a local Ray)", "sweep")
    storage_path: str = option("results", "where run directories go: a local folder (default ./results) or a URI (s3://bucket/prefix, gs://...)", "sweep")
    name: str | None = option(None, "run directory name (default: the experiments' common name, e.g. cifar10, then -<date>-<time>)", "sweep")
    time_budget: str | None = option(
        None, "stop searching after this long, e.g. 90s, 30m, 2h, 1h30m (per experiment; default: a spec's time_budget, else none): "
        "no new trials, running ones stop at their next epoch", "sweep", "DURATION")  # fmt: skip
    checkpoint_every: int | None = option(
        None, "also save a trial's checkpoint every N epochs (default: each epoch whose save costs at most a tenth of the training "
        "since the last one); always at ASHA's rungs, at a trial's last epoch and once the time budget is over", "sweep", "N")  # fmt: skip
    log_to: tuple[str, ...] | None = option(None, "also log every trial to these trackers: mlflow, wandb (extras: pip install 'tltune[mlflow]')", "sweep", "TRACKER")
    quiet: bool = option(False, "print only the final table (and a count of trials per state at most once a minute)", "sweep")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _typed(f, getattr(self, f.name)))
        self._check_values()

    @classmethod
    def from_keywords(cls, **keywords) -> "SweepOptions":
        """``tltune.run``'s keywords; an unknown one is a UserError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in keywords if k not in known]
        if unknown:
            raise UserError(f"unknown option {unknown[0]!r}: use one of {', '.join(sorted(known))}")
        return cls(**keywords)

    @classmethod
    def from_record(cls, saved: dict) -> "SweepOptions":
        """Options recorded in ``runs.jsonl`` (``options``, or an older run's ``args``: argparse's
        names are the fields' names); keys this version does not know are left out."""
        if not isinstance(saved, dict):
            raise UserError(f"recorded options must be a JSON object, got {type(saved).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def record(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in dataclasses.fields(self)}

    def changed(self) -> dict:
        """The options that differ from their defaults."""
        default = SweepOptions()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(default, f.name)}

    def _check_values(self) -> None:
        check_settings({k: getattr(self, k) for k in ("lr", "epochs", "batch_size") if getattr(self, k) is not None}, where="command line")
        if self.lr_range:
            LogUniform(*self.lr_range).check("--lr-range")
        if self.epochs_range:
            IntRange(*self.epochs_range).check("--epochs-range")
            if self.epochs_range[0] < 1:
                raise UserError(f"--epochs-range must start at 1 or more, got {self.epochs_range[0]}")
        for name in ("cpus_per_trial", "gpus_per_trial"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):  # nan: Ray would wait for "nan CPUs" forever
                raise UserError(f"{flag(name)} must be a number >= 0, got {value}")
        if self.cpus_per_trial == 0:
            raise UserError("--cpus-per-trial must be > 0: a trial needs a CPU to run on")
        if self.gpus_per_trial is not None and self.gpus_per_trial > 1:
            raise UserError(f"--gpus-per-trial {self.gpus_per_trial:g}: a trial trains on one GPU (no data parallelism), "
                            "so more would sit idle: use 1, or a fraction to share a GPU among trials")
        for name in ("num_samples", "max_concurrent_trials", "grace_period", "repeats", "max_epochs", "train_subset", "test_subset", "image_size", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{flag(name)} must be at least 1, got {value}")
        check_image_size(self.image_size)
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.time_budget is not None:
            parse_duration(self.time_budget, "--time-budget")
        unknown = [t for t in self.log_to or () if t not in TRACKERS]
        if unknown:
            raise UserError(f"--log-to {unknown[0]}: unknown tracker (use {', '.join(TRACKERS)})")
        if not (math.isfinite(self.val_fraction) and 0 < self.val_fraction < 1):
            raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")


TRACKERS = ("mlflow", "wandb")
def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(SweepOptions)


def _shape(hint) -> tuple[type, int | str | None]:
    """``int | None`` -> (int, None); ``tuple[float, float] | None`` -> (float, 2);
    ``tuple[str, ...] | None`` -> (str, '+')."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    (base,) = args
    if typing.get_origin(base) is tuple:
        items = typing.get_args(base)
        return (items[0], "+") if items[-1] is Ellipsis else (items[0], len(items))
    return base, None


def _scalar(name: str, kind: type, value):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise UserError(f"{name} must be {'a' if kind is not int else 'an'} {kind.__name__}, got {value!r}")
    return value


def _typed(f: dataclasses.Field, value):
    """``value`` checked against field ``f``'s type (lists become tuples); a UserError naming it."""
    if value is None:
        if f.default is None:
            return None
        raise UserError(f"{f.name} must not be None")
    kind, nargs = _shape(_hints()[f.name])
    if nargs is None:
        value = _scalar(f.name, kind, value)
    else:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise UserError(f"{f.name} must be a list of {kind.__name__}, got {value!r}")
        if nargs != "+" and len(value) != nargs or nargs == "+" and not value:
            raise UserError(f"{f.name} must hold {nargs if nargs != '+' else 'at least one'} value(s), got {list(value)!r}")
        value = tuple(_scalar(f.name, kind, v) for v in value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{f.name}: invalid choice {value!r} (use {', '.join(choices)})")
    return value


def build_parser(description: str, prog: str | None = None, experiment_names: list[str] | None = None, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line of a sweep, one flag per field of SweepOptions."""
    parser = parser_class(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {None: parser, **{name: parser.add_argument_group(name) for name in GROUPS}}
    for f in dataclasses.fields(SweepOptions):
        kind, nargs = _shape(_hints()[f.name])
        meta = f.metadata
        help_text = meta["help"]
        if f.name == "experiments" and experiment_names:
            help_text += f": {', '.join(experiment_names)}"
        if kind is bool:
            groups[meta["group"]].add_argument(flag(f.name), action="store_true", help=help_text)
            continue
        extra = {"nargs": nargs} if nargs else {}
        if meta["choices"]:
            extra["choices"] = list(meta["choices"])
        if meta["metavar"]:
            extra["metavar"] = meta["metavar"]
        groups[meta["group"]].add_argument(flag(f.name), type=kind, default=f.default, help=help_text, **extra)
    return parser


def parse(argv: list[str] | None, description: str = "", prog: str | None = None, experiment_names: list[str] | None = None) -> SweepOptions:
    """Command-line flags as SweepOptions (argparse exits 2 on a malformed flag; a bad value raises UserError)."""
    return SweepOptions(**vars(build_parser(description, prog, experiment_names).parse_args(argv)))
