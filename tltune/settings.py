"""What a sweep needs, complete before Ray starts: the command line's answer, as data."""

from __future__ import annotations

from dataclasses import dataclass

from tltune.data import Splits
from tltune.experiments import Experiment


@dataclass(frozen=True)
class SweepPlan:
    experiments: list[Experiment]  # in the order they run
    settings: dict[str, dict]  # per experiment: reference, search space, trial counts, input size...
    splits: dict[str, Splits]  # per dataset, loaded once by the driver
    imagenet_state: dict | None  # AlexNet weights, None for random init
    weights: str  # where imagenet_state came from: 'imagenet' or a file path
    run_dir: str  # a local path or a storage URI (s3://...)
    record: dict  # this invocation, appended to the run's runs.jsonl
    source_run: str | None  # transfer experiments: the run holding their source experiment
    address: str | None  # the Ray cluster to join; None starts a local Ray
    cpus_per_trial: float | None  # None: sized to the cluster
    gpus_per_trial: float | None
