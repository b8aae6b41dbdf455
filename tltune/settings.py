"""What a sweep needs, complete before Ray starts: the command line's answer, as data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tltune.config import MODEL_SHAPE_KEYS, ModelSpec, factory_params
from tltune.experiments import Experiment
from tltune.records import RunRecord

if TYPE_CHECKING:
    from tltune.data import Splits


@dataclass(frozen=True)
class ExperimentSettings:
    """One experiment's settings after the user's flags and presets. Frozen: what the sweep
    learns later (the trials' size on the cluster, a transfer source) makes a changed copy
    (``dataclasses.replace``)."""

    dataset: str
    reference: dict  # every trial's fixed values, and the reference's values of the searched ones
    space: dict  # hyperparameter -> tltune.experiments Choice | LogUniform | IntRange
    num_samples: int
    max_epochs: int
    batch_size: int
    seed: int
    image_size: int | None  # None: the dataset's own
    channels: int | None  # None: the dataset's own
    cached_features: bool  # feature extraction: the frozen backbone's output computed once
    grace_period: int  # ASHA: epochs before a trial may be stopped
    max_concurrent_trials: int | None  # None: as many as the cluster holds
    warm_start: tuple = ()  # configurations of an earlier run, evaluated after the reference
    repeats: int = 1  # the reference and the best configuration trained with this many seeds in all
    max_failures: int = 2  # retries of a failing trial (its node died, or an error)
    cpus_per_trial: float | None = None  # None until sized to the cluster
    gpus_per_trial: float | None = None
    log_to: tuple[str, ...] = ()  # trackers every trial is also logged to (--log-to)
    time_budget_s: float | None = None  # the search stops after this long (--time-budget); None: no budget
    checkpoint_every: int | None = None  # a trial also checkpoints every N epochs; None: when a save costs little (train.CheckpointPolicy)
    quiet: bool = False  # print only the final table and a count of trials per state at most once a minute
    pretrained: str = "none"  # where the starting weights come from: 'imagenet', a file, a checkpoint ('model=..., ...' for several models)

    def reference_model_spec(self, model: str) -> ModelSpec:
        """The network of the reference trial with ``model`` (and of every trial with it, where
        its shape is not searched); a user factory gets the reference's keyword arguments."""
        shape = {key: self.reference[key] for key in MODEL_SHAPE_KEYS if key in self.reference}
        params = tuple(sorted(factory_params(self.reference).items())) if ":" in model else ()
        return ModelSpec(model, image_size=self.image_size, channels=self.channels, params=params, **shape)

    def record(self) -> dict:
        """Everything but the search space (recorded on its own, readably)."""
        return {k: v for k, v in asdict(self).items() if k != "space"}


@dataclass(frozen=True)
class SweepPlan:
    experiments: list[Experiment]  # in the order they run
    settings: dict[str, ExperimentSettings]  # by experiment name
    splits: dict[str, Splits]  # per dataset, loaded once by the driver
    weights: dict[str, dict[str, str]]  # experiment -> model -> where its pretrained weights come from ('imagenet', a torchvision weights name, a file)
    pretrained_states: dict[tuple[str, str], dict]  # (model, where from) -> its state dict, read once by the driver
    run_dir: str  # a local path or a storage URI (s3://...)
    record: RunRecord  # this invocation, appended to the run's runs.jsonl
    source_run: str | None  # transfer experiments: the run holding their source experiment
    address: str | None  # the Ray cluster to join; None starts a local Ray
    cpus_per_trial: float | None  # None: sized to the cluster
    gpus_per_trial: float | None
    py_modules: tuple[str, ...] = ()  # local modules of users' model factories, shipped to every node
