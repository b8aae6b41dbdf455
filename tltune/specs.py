"""Sweep spec files: experiments declared in YAML, and the vocabulary they are read into.

    experiments:
      - name: pets-backbones
        dataset: mypets                    # cifar10, mnist, svhn; class folders under the data root; or a path (from this file's folder)
        model: {choice: [resnet18, mobilenet_v3_small, alexnet]}   # or one name, or "mypkg.models:build"
        mode: {choice: [finetune, feature_extract]}                # scratch | finetune | feature_extract (default:
                                                                   # scratch for the cnn, else finetune)
        weights: imagenet                  # imagenet | none | a weights name | a state-dict file, or model -> one of those
        reference: {optimizer: sgd, lr: 0.001, epochs: 5}          # trained first, never stopped early, test-scored
        space:
          optimizer: {choice: [sgd, adam]}
          lr: {loguniform: [1.0e-5, 1.0e-2]}
          epochs: {int: [1, 10]}           # both ends included
          dropout: {uniform: [0.0, 0.5]}   # any keyword of a user factory
          depth: 3                         # a plain value: fixed, part of the reference
        num_samples: 20

Left out, ``reference``'s values default to: a searched hyperparameter's first choice, the
geometric mean of a loguniform, the middle of a uniform or int range; optimizer adam, lr 0.001,
epochs 5 when neither the reference nor the space names them. Other keys: ``label`` (the
table's "Model type"), ``reference_accuracy`` (a % to compare with), ``channels`` and
``image_size`` (a fixed input format), ``batch_size``, ``grace_period``, ``repeats``, ``time_budget``
(``30m``: the search stops after this long), ``source``
(the experiment whose best CNN trial gives a transfer its architecture and weights),
``description`` (free text). A top-level ``families:`` maps a name to experiment names.

The built-in experiments are such files too (``tltune/specs/*.yaml``; ``tltune spec NAME``
prints one to copy). A bad file is one :class:`UserError` line naming the file and the key
(``pets.yaml: experiments[0].space.lr: ...``), raised before anything runs.

The domains, :class:`Experiment` and :func:`check_settings` live here rather than in
``tltune.experiments`` (which re-exports them) because ``experiments`` builds its table from
these files: the reader must not import it back. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tltune.catalog import (
    ACTIVATION_NAMES,
    AUGMENTATION_NAMES,
    CNN_MAX_DEPTH,
    DATASET_SHAPES,
    MODES,
    OPTIMIZER_NAMES,
    SCHEDULE_NAMES,
    WEIGHTS_NAME,
    looks_like_path,
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
class Uniform:
    low: float
    high: float

    def contains(self, value) -> bool:
        return self.low <= value <= self.high

    def check(self, name: str) -> None:
        if not (self.low < self.high and math.isfinite(self.low) and math.isfinite(self.high)):
            raise UserError(f"search space '{name}': need low < high, got [{self.low}, {self.high}]")

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
    space: dict = field(default_factory=dict)  # hyperparameter -> Choice | LogUniform | Uniform | IntRange
    num_samples: int = 1  # trials in a full run; the first one is the reference
    input: dict = field(default_factory=dict)  # fixed input format, e.g. {"channels": 3, "image_size": 32}
    # For the CNN: the experiment whose best trial supplies the architecture (its activation)
    # and, in a pretrained mode, the backbone weights.
    source: str | None = None
    # Where pretrained models start: None (the sweep's --weights, else "imagenet"), "imagenet"
    # (each model's default torchvision weights), "none", a torchvision weights name
    # ("IMAGENET1K_V2"), a state-dict file, or a mapping model -> one of those.
    weights: str | dict | None = None
    batch_size: int | None = None  # None: --batch-size, else 64 (a searched batch_size wins)
    grace_period: int | None = None  # ASHA's; None: --grace-period, else the default
    repeats: int | None = None  # None: --repeats, else the default
    time_budget: str | None = None  # the search stops after this long ("30m"); --time-budget wins
    spec_file: str | None = None  # the YAML file that declared it (errors name it); None: built in

    # ``model`` and ``mode`` may be searched: then ``space`` holds their Choice, ``reference``
    # their reference values, and ``model``/``mode`` above equal the reference's.
    def models(self) -> tuple[str, ...]:
        """Every model a trial of this experiment may build."""
        searched = self.space.get("model")
        return tuple(searched.options) if isinstance(searched, Choice) else (self.model,)

    def modes(self) -> tuple[str, ...]:
        searched = self.space.get("mode")
        return tuple(searched.options) if isinstance(searched, Choice) else (self.mode,)


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
        if key in settings and not passes(good, settings[key]):
            value = settings[key]
            raise UserError(f"{where}: {requirement}, got {repr(value) if isinstance(value, str) else value}")


def passes(good, value) -> bool:
    """Whether ``value`` passes a check; one of the wrong type (text for a number) does not."""
    try:
        return bool(good(value))
    except TypeError:
        return False


# The spec file format

SPEC_DIR = Path(__file__).with_name("specs")
BUILTIN_SPECS = ("cifar10", "mnist", "svhn", "mnist_to_svhn", "cifar10_plus")  # files, in EXPERIMENTS' order
SEED_SPECS = BUILTIN_SPECS[:-1]  # family "all": the seed's rows; cifar10_plus (90 minutes) only on its own

TOP_KEYS = ("experiments", "families")
EXPERIMENT_KEYS = (
    "name", "dataset", "model", "mode", "weights", "reference", "space", "num_samples", "label", "reference_accuracy",
    "image_size", "channels", "batch_size", "grace_period", "repeats", "time_budget", "source", "description",
)  # fmt: skip
REQUIRED_KEYS = ("name", "dataset", "model")
DOMAIN_KINDS = ("choice", "loguniform", "uniform", "int")
# The reference of an experiment that names none of them: the seed's CNN reference
DEFAULT_REFERENCE = {"optimizer": "adam", "lr": 0.001, "epochs": 5}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # an experiment's name is a folder of the run
SCALARS = (str, int, float, bool, type(None))


@dataclass
class Spec:
    experiments: list[Experiment]
    families: dict[str, list[str]]  # family -> experiment names, as the file declares them


class SpecLoader(yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader):  # type: ignore[misc]
    """``yaml.safe_load``, but ``1e-5`` is a number (YAML 1.1 wants ``1.0e-5``) and a key
    given twice is an error instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the constructor below says so
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def did_you_mean(word, known) -> str:
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1)
    return f"did you mean {close[0]}? " if close else ""


def shown(value) -> str:
    """A value as the error shows it, with its kind where the kind is the problem."""
    if isinstance(value, str):
        return f"'{value}' (text)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else str(value)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SpecReader:
    """Reads one file's text into experiments; every error names ``where`` and the key."""

    def __init__(self, where: str, spec_file: str | None, known_sources: tuple[str, ...] = ()):
        self.where = where
        self.spec_file = spec_file
        self.known_sources = known_sources  # experiments outside the file that a source may name

    def fail(self, path: str, message: str):
        raise UserError(f"{self.where}: {path}: {message}" if path else f"{self.where}: {message}")

    def read(self, text: str) -> Spec:
        try:
            top = yaml.load(text, Loader=SpecLoader)
        except yaml.MarkedYAMLError as exc:
            line = f"line {exc.problem_mark.line + 1}: " if exc.problem_mark else ""
            opened = f", {exc.context} at line {exc.context_mark.line + 1}" if exc.context and exc.context_mark else ""
            raise UserError(f"{self.where}: {line}{' '.join(f'{exc.problem or exc}{opened}'.split())} (not valid YAML)") from None
        except yaml.YAMLError as exc:
            raise UserError(f"{self.where}: {' '.join(str(exc).split())} (not valid YAML)") from None
        if isinstance(top, dict):
            self.unknown_keys(top, TOP_KEYS, "")
        if not isinstance(top, dict) or "experiments" not in top:
            got = "nothing" if top is None else "a mapping without it" if isinstance(top, dict) else shown(top)
            self.fail("", f"expected a mapping with an 'experiments' list at the top, got {got}")
        entries = top["experiments"]
        if not isinstance(entries, list) or not entries:
            self.fail("experiments", f"expected a list of experiments, got {'an empty list' if entries == [] else shown(entries)}")
        experiments = []
        for index, entry in enumerate(entries):
            experiment = self.experiment(entry, f"experiments[{index}]")
            if experiment.name in {e.name for e in experiments}:
                self.fail(f"experiments[{index}].name", f"'{experiment.name}' names an earlier experiment too")
            experiments.append(experiment)
        names = [e.name for e in experiments]
        for index, experiment in enumerate(experiments):
            if experiment.source is not None and experiment.source not in names + list(self.known_sources):
                hint = did_you_mean(experiment.source, names + list(self.known_sources))
                self.fail(f"experiments[{index}].source", f"'{experiment.source}' is no experiment of this file or a built-in one ({hint}use {', '.join(names)})")
        return Spec(experiments, self.families(top.get("families", {}), names))

    def families(self, declared, names: list[str]) -> dict[str, list[str]]:
        if not isinstance(declared, dict):
            self.fail("families", f"expected a mapping family -> list of experiment names, got {shown(declared)}")
        for family, members in declared.items():
            path = f"families.{family}"
            if not isinstance(family, str) or family == "all":
                self.fail(path, "a family name is text other than 'all' (every experiment)")
            if not isinstance(members, list) or not members:
                self.fail(path, f"expected a list of experiment names, got {shown(members)}")
            for member in members:
                if member not in names:
                    self.fail(path, f"unknown experiment {shown(member)} ({did_you_mean(member, names)}use {', '.join(names)})")
        return {family: list(members) for family, members in declared.items()}

    def unknown_keys(self, mapping: dict, known: tuple[str, ...], path: str) -> None:
        for key in mapping:
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, f"unknown key ({did_you_mean(key, known)}use {', '.join(known)})")

    def text(self, value, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"expected a name, got {shown(value)}")
        return value

    def count(self, value, path: str) -> int:
        if not is_integer(value) or value < 1:
            self.fail(path, f"expected a whole number >= 1, got {shown(value)}")
        return value

    def scalar(self, value, path: str):
        if not isinstance(value, SCALARS):
            self.fail(path, f"expected one value (text, a number, true/false), got {shown(value)}")
        return value

    def experiment(self, entry, path: str) -> Experiment:
        if not isinstance(entry, dict):
            self.fail(path, f"expected a mapping (name: ..., dataset: ..., model: ...), got {shown(entry)}")
        self.unknown_keys(entry, EXPERIMENT_KEYS, path)
        for key in REQUIRED_KEYS:
            if key not in entry:
                self.fail(path, f"missing '{key}'")
        name = self.text(entry["name"], f"{path}.name")
        if not NAME_PATTERN.fullmatch(name):
            self.fail(f"{path}.name", f"'{name}' must be letters, digits and - _ . + (it names the experiment's folder)")
        dataset = self.dataset(self.text(entry["dataset"], f"{path}.dataset"))
        model = self.named(entry["model"], f"{path}.model", None)
        mode = self.named(entry.get("mode", "scratch" if model == "cnn" else "finetune"), f"{path}.mode", MODES)

        reference = self.reference(entry.get("reference", {}), f"{path}.reference")
        space = {}
        searched = entry.get("space", {})
        if not isinstance(searched, dict):
            self.fail(f"{path}.space", f"expected a mapping hyperparameter -> domain or value, got {shown(searched)}")
        for key, value in searched.items():
            key_path = f"{path}.space.{key}"
            if key in ("model", "mode"):
                self.fail(key_path, f"search the {key} with the experiment's own '{key}: {{choice: [...]}}'")
            domain = self.domain(value, key_path)
            if isinstance(domain, (Choice, LogUniform, Uniform, IntRange)):
                space[key] = domain
            elif key in reference and reference[key] != domain:
                self.fail(key_path, f"fixed at {domain}, but the reference says {reference[key]}")
            else:
                reference[key] = domain
        for key, domain in space.items():
            if key not in reference:
                reference[key] = default_value(domain)
        for key, value in DEFAULT_REFERENCE.items():
            reference.setdefault(key, value)
        model = self.searched_name("model", model, space, reference, path)
        mode = self.searched_name("mode", mode, space, reference, path)

        for key, value in reference.items():
            check_settings({key: value}, where=f"{self.where}: {path}.reference.{key}")
        for key, domain in space.items():
            if isinstance(domain, Choice):
                for option in domain.options:
                    check_settings({key: option}, where=f"{self.where}: {path}.space.{key}")
            value = reference[key]
            comparable = isinstance(domain, Choice) or is_number(value)
            if not (comparable and domain.contains(value)):
                self.fail(f"{path}.reference.{key}", f"{shown(value)} lies outside the space searched ({described(domain)})")

        input_format = {key: self.count(entry[key], f"{path}.{key}") for key in ("channels", "image_size") if key in entry}
        check_image_size(input_format.get("image_size"), f"{self.where}: {path}.image_size")
        optional_counts = {key: self.count(entry[key], f"{path}.{key}") for key in ("batch_size", "grace_period", "repeats") if key in entry}
        budget = entry.get("time_budget")
        if budget is not None:
            budget = self.text(str(budget) if is_number(budget) else budget, f"{path}.time_budget")
            try:
                parse_duration(budget, "time_budget")
            except UserError as exc:
                self.fail(f"{path}.time_budget", str(exc).removeprefix("time_budget "))
        accuracy = entry.get("reference_accuracy")
        if accuracy is not None and not (is_number(accuracy) and 0 <= accuracy <= 100):
            self.fail(f"{path}.reference_accuracy", f"expected a test accuracy in % (0 to 100), got {shown(accuracy)}")
        label = entry.get("label", default_label(entry["model"], entry.get("mode"), model, mode))
        source = entry.get("source")
        return Experiment(
            name, dataset, model, mode, self.text(label, f"{path}.label"), reference, accuracy, space,
            num_samples=self.count(entry.get("num_samples", 1), f"{path}.num_samples"),
            input=input_format,
            source=None if source is None else self.text(source, f"{path}.source"),
            weights=self.weights(entry.get("weights"), f"{path}.weights", model, space),
            spec_file=self.spec_file,
            time_budget=budget,
            **optional_counts,
        )  # fmt: skip

    def named(self, value, path: str, known: tuple[str, ...] | None):
        """A model or mode: one name, or ``{choice: [...]}`` of names (kept as a Choice)."""
        if isinstance(value, dict):
            domain = self.domain(value, path)
            if not isinstance(domain, Choice):
                self.fail(path, "only one name or {choice: [name, ...]} here")
            for option in domain.options:
                self.one_name(option, path, known)
            return domain
        return self.one_name(value, path, known)

    def one_name(self, value, path: str, known: tuple[str, ...] | None) -> str:
        name = self.text(value, path)
        if known is not None and name not in known:
            self.fail(path, f"unknown {path.rsplit('.', 1)[-1]} '{name}' ({did_you_mean(name, known)}use {', '.join(known)})")
        return name

    def searched_name(self, key: str, declared, space: dict, reference: dict, path: str) -> str:
        """``model`` or ``mode``: a Choice goes into the space, its reference value into the
        reference; the reference value is what ``Experiment.model``/``mode`` hold."""
        if isinstance(declared, Choice):
            space[key] = declared
            value = reference.setdefault(key, declared.options[0])
            if not declared.contains(value):
                self.fail(f"{path}.reference.{key}", f"{shown(value)} is not one of the {key}s searched ({', '.join(declared.options)})")
            return value
        if key in reference and reference.pop(key) != declared:
            self.fail(f"{path}.reference.{key}", f"the {key} is '{declared}', not searched: leave it out of the reference or search it")
        return declared

    def reference(self, value, path: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping hyperparameter -> value, got {shown(value)}")
        return {key: self.scalar(v, f"{path}.{key}") for key, v in value.items()}

    def domain(self, value, path: str):
        """A domain for ``{kind: arguments}``, else the plain value itself (a fixed one)."""
        if not isinstance(value, dict):
            return self.scalar(value, path)
        if len(value) != 1:
            self.fail(path, f"a domain is one of {{choice: [...]}}, {{loguniform: [low, high]}}, {{uniform: [low, high]}}, {{int: [low, high]}}; got keys {', '.join(map(str, value))}")
        kind, arguments = next(iter(value.items()))
        if kind not in DOMAIN_KINDS:
            self.fail(path, f"unknown domain '{kind}' ({did_you_mean(kind, DOMAIN_KINDS)}use {', '.join(DOMAIN_KINDS)})")
        if kind == "choice":
            if not isinstance(arguments, list):
                self.fail(path, f"choice needs a list of options, got {shown(arguments)}")
            if not arguments:
                self.fail(path, "choice has no options to choose from")
            options = tuple(self.scalar(option, f"{path}.choice[{i}]") for i, option in enumerate(arguments))
            repeated = [o for i, o in enumerate(options) if o in options[:i]]
            if repeated:
                self.fail(path, f"choice lists {shown(repeated[0])} twice")
            return Choice(options)
        if not isinstance(arguments, list) or len(arguments) != 2:
            self.fail(path, f"{kind} needs [low, high], got {shown(arguments)}")
        whole = kind == "int"
        for bound in arguments:
            if not (is_integer(bound) if whole else is_number(bound) and math.isfinite(bound)):
                need = "whole numbers" if whole else "finite numbers"
                unquote = " without quotes" if isinstance(bound, str) else ""
                self.fail(path, f"{kind} bounds must be {need}{unquote}, got {shown(bound)}")
        low, high = arguments
        if not low < high:
            self.fail(path, f"{kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            self.fail(path, f"loguniform needs low > 0 (a log scale), got [{low}, {high}]")
        if whole:
            return IntRange(low, high)
        return (LogUniform if kind == "loguniform" else Uniform)(float(low), float(high))

    def beside_the_file(self, value: str) -> str:
        """A relative path in a spec file is taken from the file's folder, where its factories are
        found too (so the file works from any folder and a resume finds the same files); one that
        exists only from the current folder is taken from there, as it was before this rule."""
        path = Path(value).expanduser()
        if self.spec_file is None or path.is_absolute():
            return str(path) if value.startswith("~") else value
        beside = Path(os.path.normpath(Path(self.spec_file).absolute().parent / path))
        return str(beside) if beside.exists() or not path.exists() else value

    def dataset(self, value: str) -> str:
        """A dataset tltune knows, a class-folder name under the data root, or a folder: a path,
        or a name whose folder is beside the file."""
        if value in DATASET_SHAPES:
            return value
        if looks_like_path(value):
            return self.beside_the_file(value)
        beside = self.beside_the_file(value)
        return beside if Path(beside).is_dir() and beside != value else value

    def weights(self, value, path: str, model: str, space: dict):
        """One source of pretrained weights for every model, or a mapping model -> source; a file
        (not imagenet, none or a torchvision weights name) is found as beside_the_file says."""
        if value is None or isinstance(value, str):
            return None if value is None else self.weights_file(self.text(value, path))
        if not isinstance(value, dict):
            self.fail(path, f"expected imagenet, none, a weights name, a file, or a mapping model -> one of those; got {shown(value)}")
        models = space["model"].options if "model" in space else (model,)
        for key, weights in value.items():
            if key not in models:
                self.fail(f"{path}.{key}", f"not a model of this experiment ({did_you_mean(key, models)}use {', '.join(models)})")
        return {key: self.weights_file(self.text(weights, f"{path}.{key}")) for key, weights in value.items()}

    def weights_file(self, value: str) -> str:
        return value if value in ("imagenet", "none") or WEIGHTS_NAME.match(value) else self.beside_the_file(value)


def default_value(domain):
    """The reference value of a searched hyperparameter the reference leaves out."""
    if isinstance(domain, Choice):
        return domain.options[0]
    if isinstance(domain, LogUniform):
        return math.sqrt(domain.low * domain.high)
    if isinstance(domain, Uniform):
        return (domain.low + domain.high) / 2
    return (domain.low + domain.high) // 2


def described(domain) -> str:
    if isinstance(domain, Choice):
        return "choice of " + ", ".join(map(str, domain.options))
    kind = {LogUniform: "loguniform", Uniform: "uniform", IntRange: "int"}[type(domain)]
    return f"{kind} [{domain.low}, {domain.high}]"


def default_label(declared_model, declared_mode, model: str, mode: str) -> str:
    """The table's "Model type" when the file gives none: "resnet18 finetune", "model × mode search"..."""
    model_searched, mode_searched = isinstance(declared_model, dict), isinstance(declared_mode, dict)
    if model_searched and mode_searched:
        return "model × mode search"
    if model_searched:
        return f"model search, {mode}"
    if mode_searched:
        return f"{model}, mode search"
    return f"{model} {mode}"


def load_spec(path_or_text: str | Path) -> list[Experiment]:
    """The experiments of a spec file, or of spec text (anything that is not a ``.yaml``/``.yml``
    name or an existing file); raises UserError for a bad one."""
    if isinstance(path_or_text, Path) or is_spec_path(path_or_text):
        return load_spec_file(path_or_text)
    return SpecReader("spec", None, tuple(builtin_experiments()[0])).read(path_or_text).experiments


def is_spec_path(target: str) -> bool:
    """Whether a command-line target names a spec file rather than a family or an experiment."""
    return "\n" not in target and (target.endswith((".yaml", ".yml")) or Path(target).is_file())


def load_spec_file(path: str | Path) -> list[Experiment]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read the spec file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (a spec file is YAML)") from None
    return SpecReader(str(path), str(path), tuple(builtin_experiments()[0])).read(text).experiments


def builtin_spec_path(name: str) -> Path:
    """The built-in spec file of a family, or the one declaring a built-in experiment."""
    if name in BUILTIN_SPECS:
        return SPEC_DIR / f"{name}.yaml"
    for family, spec in builtin_specs().items():
        if name in {e.name for e in spec.experiments}:
            return SPEC_DIR / f"{family}.yaml"
    names = [*BUILTIN_SPECS, *builtin_experiments()[0]]
    raise UserError(f"unknown spec '{name}': {did_you_mean(name, names)}use a family ({', '.join(BUILTIN_SPECS)}) or a built-in experiment (tltune list)")


@functools.cache
def builtin_specs() -> dict[str, Spec]:
    """file name -> its Spec, read once."""
    specs = {}
    for name in BUILTIN_SPECS:
        path = SPEC_DIR / f"{name}.yaml"
        specs[name] = SpecReader(str(path), None).read(path.read_text(encoding="utf-8"))
    return specs


@functools.cache
def builtin_experiments() -> tuple[dict[str, Experiment], dict[str, list[str]]]:
    """``EXPERIMENTS`` and ``FAMILIES`` of tltune.experiments: every built-in experiment by name,
    in file order, and family -> experiment names, ``all`` being the seed's rows."""
    specs = builtin_specs()
    experiments: dict[str, Experiment] = {}
    families: dict[str, list[str]] = {}
    for spec in specs.values():
        for experiment in spec.experiments:
            if experiment.name in experiments:
                raise RuntimeError(f"built-in experiment {experiment.name} declared twice")
            experiments[experiment.name] = experiment
        for family, names in spec.families.items():
            if family in families:
                raise RuntimeError(f"built-in family {family} declared twice")
            families[family] = names
    families["all"] = [e.name for name in SEED_SPECS for e in specs[name].experiments]
    return experiments, families


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, what: str) -> float:
    """Seconds in ``90``, ``90s``, ``30m``, ``2h``, ``1h30m``, ``1.5h``; a UserError naming ``what``."""
    cleaned = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        seconds = float(cleaned)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", cleaned)
        if not parts or "".join(n + u for n, u in parts) != cleaned:
            raise UserError(f"{what} {text!r}: use a duration such as 90s, 30m, 2h or 1h30m")
        seconds = sum(float(n) * DURATION_UNITS[u] for n, u in parts)
    if not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"{what} must be longer than 0, got {text!r}")
    return seconds


def duration_text(seconds: float) -> str:
    """``45s``, ``30m``, ``1h30m``: :func:`parse_duration` reads it back."""
    seconds = int(round(seconds))
    hours, minutes, rest = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return "".join(f"{n}{u}" for n, u in ((hours, "h"), (minutes, "m"), (rest, "s")) if n) or "0s"


MAX_IMAGE_SIZE = 2048  # --image-size; torchvision's ImageNet models are trained at 224 to 518


def check_image_size(size: int | None, what: str = "--image-size") -> None:
    """A UserError for a model input size above ``MAX_IMAGE_SIZE``: a 100000x100000 input
    needs 120 GB per image as float32, and no model gets better from it."""
    if size is not None and size > MAX_IMAGE_SIZE:
        gigabytes = 3 * 4 * size * size / 1e9
        raise UserError(
            f"{what} {size} is too large: use at most {MAX_IMAGE_SIZE} (a {size}x{size} RGB input takes "
            f"{gigabytes:,.1f} GB per image as float32; ImageNet models are trained at 224 to 518)"
        )
