"""The JSON records a sweep writes, as types: each one class with a schema version, written
and read by the same code (the sweep writes them, :mod:`tltune.results` reads them).

| record | file | written |
|---|---|---|
| :class:`RunRecord` | ``<run>/runs.jsonl`` (one line per invocation) | before the first experiment |
| :class:`ExperimentRecord` | ``<experiment>/tltune_experiment.json`` | before the first trial |
| :class:`ExperimentSummary` | ``<experiment>/tltune_best.json`` | when the experiment finished |
| :class:`FailureRecord` | ``<experiment>/tltune_failed.json`` | when its trials failed for good |
| :class:`TimeRecord` | ``<experiment>/tltune_time.json`` | when an invocation ends early |

Reading is forgiving where it can be, as a run folder may come from another version: a record
without ``schema`` is version 1 (before versions were written); keys this version does not
know are left out; a missing key takes its default; a record of a newer schema is read as far
as it goes, after one warning line naming the file. A value of the wrong type makes the record
unreadable (``ValueError``: the reader skips it with one warning), never a crash later.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import ClassVar

SCHEMA_KEY = "schema"


def is_number(value) -> bool:
    """A number of JSON (not a bool), finite or not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    return is_number(value) and math.isfinite(value)


_CHECKS = {int: lambda v: isinstance(v, int) and not isinstance(v, bool), float: is_number, str: lambda v: isinstance(v, str),
           dict: lambda v: isinstance(v, dict), list: lambda v: isinstance(v, list), bool: lambda v: isinstance(v, bool)}  # fmt: skip


def _accepts(hint, value) -> bool:
    """Whether ``value`` (from JSON) fits a field annotated ``hint`` (``int | None``, ``dict``, ...)."""
    kinds = [a for a in typing.get_args(hint)] or [hint]
    for kind in kinds:
        if kind is type(None) and value is None:
            return True
        base = typing.get_origin(kind) or kind
        if base in _CHECKS and _CHECKS[base](value):
            return True
        if kind is typing.Any:
            return True
    return False


def warn(path: str, why: str) -> None:
    print(f"warning: {path}: {why}", file=sys.stderr)


@dataclass
class Record:
    """A JSON object with a schema version; subclasses are dataclasses of its fields."""

    FILE: ClassVar[str] = ""
    SCHEMA: ClassVar[int] = 1

    def to_dict(self) -> dict:
        return {SCHEMA_KEY: self.SCHEMA, **dataclasses.asdict(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    @classmethod
    def from_dict(cls, data: dict, path: str = "record"):
        """The record in ``data`` (a JSON object), as forgiving as the module says."""
        version = data.get(SCHEMA_KEY, 1)
        if not isinstance(version, int) or version > cls.SCHEMA:
            warn(path, f"written by a newer tltune (schema {version!r}; this one reads {cls.SCHEMA}): reading the fields it knows")
        hints = typing.get_type_hints(cls)
        values, wrong = {}, []
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            if _accepts(hints[f.name], data[f.name]):
                values[f.name] = data[f.name]
            else:
                wrong.append(f.name)
        if wrong:
            raise ValueError(f"its {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not of the type tltune writes")
        return cls(**values)


@dataclass
class RunRecord(Record):
    """One invocation that wrote to a run directory: when, its command line and its options
    (:meth:`tltune.options.SweepOptions.record`). Runs made before SweepOptions hold argparse's
    namespace as ``args`` instead, with the same names."""

    FILE: ClassVar[str] = "runs.jsonl"
    SCHEMA: ClassVar[int] = 2  # 2: signed (hmac), as --resume follows its options
    started: str = ""
    argv: list = field(default_factory=list)
    options: dict | None = None
    # what was swept, so that ``tltune sweep --resume RUN`` needs nothing else: built-in
    # experiment names or "all", and spec files' absolute paths; None: experiments made in Python
    targets: list | None = None
    args: dict | None = None  # runs before SweepOptions
    hmac: str | None = None  # tltune.trust.sign_record: over every other key; None before schema 2

    def saved_options(self) -> dict | None:
        return self.options if self.options is not None else self.args


@dataclass
class ExperimentRecord(Record):
    """What an experiment is and how it was set up, written before its first trial."""

    FILE: ClassVar[str] = "tltune_experiment.json"
    name: str | None = None
    dataset: str | None = None
    model: str | None = None
    mode: str | None = None
    label: str | None = None  # the "Model type" column
    reference: dict = field(default_factory=dict)  # the declared reference settings
    reference_accuracy: float | None = None  # the seed's test accuracy in %
    settings: dict = field(default_factory=dict)  # tltune.settings.ExperimentSettings.record()
    space: dict = field(default_factory=dict)  # hyperparameter -> repr of its domain
    optimizer_extras: dict = field(default_factory=dict)  # optimizer -> its fixed keyword arguments


@dataclass
class ExperimentSummary(Record):
    """How a finished experiment came out: its best trial (by last validation accuracy) and
    the reference trial, each tested, and the repeats with other seeds."""

    FILE: ClassVar[str] = "tltune_best.json"
    experiment: str | None = None
    trials: int | None = None
    errored_trials: int | None = None
    best_trial: str | None = None  # None: no trial reported a validation accuracy
    config: dict | None = None
    epochs_trained: int | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    test_loss: float | None = None
    test_images: int | None = None
    reference_trial: dict | None = None  # trial, epochs_trained, val_acc, test_acc, test_loss, test_images
    repeats: dict | None = None  # seeds, epochs_spent, and per group (reference, best): trials, seeds, epochs, val_acc, test_acc
    epochs_spent: int | None = None
    wall_s: float | None = None
    time_budget: dict | None = None  # seconds, search_s, ended_search, stopped_trials (names): see tltune.raytune.budget

    def problem(self) -> str | None:
        """Why a summary that names a best trial cannot be used, or ``None``."""
        if self.config is None:  # no trial reported a val_acc (or a config of the wrong type, warned)
            return None
        if self.best_trial is None:
            return "its best_trial is not a string"
        if self.val_acc is None:
            return "its val_acc or test_acc is not a number"
        return None


@dataclass
class FailureRecord(Record):
    """Why an experiment failed: its trials failed in every retry."""

    FILE: ClassVar[str] = "tltune_failed.json"
    experiment: str | None = None
    reason: str = ""


@dataclass
class TimeRecord(Record):
    """Seconds an experiment ran in the invocations that ended early (the resume adds them)."""

    FILE: ClassVar[str] = "tltune_time.json"
    spent_s: float = 0.0
    budget_stopped_trials: list | None = None  # trials the time budget stopped before a resume with a larger one
