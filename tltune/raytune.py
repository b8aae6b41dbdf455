"""Everything that talks to Ray: the trainable, the search space, the Tuner, TensorBoard.

The driver loads a dataset once, puts it in Ray's object store, and every trial reads it
from there (zero-copy NumPy on the trial's node). A trial reports once per epoch with a
checkpoint and resumes from ``tune.get_checkpoint()``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from tltune.data import Splits, as_tensors
from tltune.errors import UserError
from tltune.features import feature_splits
from tltune.experiments import Choice, Experiment, IntRange, LogUniform
from tltune.models import PRETRAINED_MODES
from tltune.results import EXPERIMENT_FILE, METRIC, SUMMARY_FILE
from tltune.train import (
    DivergedError,
    build_optimizer,
    evaluate,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
    setup_model,
    train_one_epoch,
)

MODE = "max"


def to_tune_domain(domain):
    if isinstance(domain, Choice):
        return tune.choice(list(domain.options))
    if isinstance(domain, LogUniform):
        return tune.loguniform(domain.low, domain.high)
    if isinstance(domain, IntRange):
        return tune.randint(domain.low, domain.high + 1)  # randint's upper bound is exclusive
    raise TypeError(f"unknown search domain {domain!r}")


def trial_device() -> torch.device:
    """The GPU Ray assigned to this trial (it sets CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def train_trial(config: dict, inputs: dict) -> None:
    """A Ray Tune function trainable: one ``tune.report`` per epoch, with a checkpoint."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch is noise
    started_at = time.time()
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    device = trial_device()
    started = time.perf_counter()
    splits: Splits = ray.get(inputs["splits"])  # zero-copy from the node's object store
    data_ready_s = time.perf_counter() - started
    model, transform = setup_model(config, splits, ray.get(inputs["pretrained_state"]))
    model.to(device)
    optimizer = build_optimizer(config["optimizer"], model, config["lr"])
    epochs_done = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            epochs_done = load_checkpoint(directory, model, optimizer)
    train_x, train_y = as_tensors(splits.train, device)
    val_x, val_y = as_tensors(splits.val, device)
    for epoch in range(epochs_done + 1, config["epochs"] + 1):
        generator = seed_everything(config["seed"] * 1000 + epoch)  # same batches after a resume
        train_started = time.perf_counter()
        try:
            train = train_one_epoch(model, optimizer, train_x, train_y, transform, config["batch_size"], generator)
        except DivergedError as exc:
            # Stop this trial with its reason in the results; val_acc 0 ranks it last for the
            # searcher and ASHA (a NaN would be dropped, and a retry would diverge again).
            tune.report({"epoch": epoch, "diverged": True, "stop_reason": str(exc), "val_acc": 0.0, "train_loss": float("nan")})
            return
        train_images_per_s = len(train_y) / (time.perf_counter() - train_started)
        val = evaluate(model, val_x, val_y, transform)
        metrics = {
            "epoch": epoch,
            "train_loss": train.loss,
            "train_acc": train.accuracy,
            "val_loss": val.loss,
            "val_acc": val.accuracy,
            "train_images_per_s": train_images_per_s,
            "data_ready_s": data_ready_s,
            "started_at": started_at,  # this run of the trial (a restored trial starts again)
            "reported_at": time.time(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": ",".join(str(g) for g in ray.get_gpu_ids()),
        }
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(directory, model, optimizer, epoch)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
    del model, optimizer  # reused actors run the next trial in this process
    if device.type == "cuda":
        torch.cuda.empty_cache()


def score_on_test_split(config: dict, inputs: dict, checkpoint: tune.Checkpoint) -> dict:
    """Test accuracy of a trial's checkpoint; runs as a Ray task with the trial's resources."""
    device = trial_device()
    splits: Splits = ray.get(inputs["splits"])
    model, transform = setup_model(config, splits, ray.get(inputs["pretrained_state"]))
    model.to(device)
    with checkpoint.as_directory() as directory:
        load_checkpoint(directory, model)
    test_x, test_y = as_tensors(splits.test, device)
    stats = evaluate(model, test_x, test_y, transform)
    return {"test_acc": stats.accuracy, "test_loss": stats.loss, "test_images": len(test_y)}


def precompute_features(input_config: dict, inputs: dict) -> Splits:
    """Backbone features of every image, computed once (or read from the disk cache) on the
    device a trial would get; runs as a Ray task, its result stays in the object store."""
    return feature_splits(ray.get(inputs["splits"]), input_config, ray.get(inputs["pretrained_state"]), trial_device())


class TensorBoardCallback(tune.Callback):
    """Per-epoch scalars of every trial as TensorBoard event files in the trial's directory.

    Written by the driver straight into the experiment directory (not Ray's temporary
    staging folder), so ``tensorboard --logdir <run dir>`` shows every trial while it runs.
    """

    SCALARS = {
        "loss/train": "train_loss",
        "loss/val": "val_loss",
        "accuracy/train": "train_acc",
        "accuracy/val": "val_acc",
    }

    def __init__(self, print_progress: bool = True):
        self._writers = {}
        self._print_progress = print_progress

    def _writer(self, trial):
        from torch.utils.tensorboard import SummaryWriter

        if trial.trial_id not in self._writers:
            local = "://" not in str(trial.path)
            self._writers[trial.trial_id] = SummaryWriter(trial.path if local else trial.local_path, flush_secs=10)
        return self._writers[trial.trial_id]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        writer = self._writer(trial)
        step = result["epoch"]
        for tag, key in self.SCALARS.items():
            if _is_number(result.get(key)):
                writer.add_scalar(tag, result[key], global_step=step)
        writer.flush()
        if self._print_progress:
            varied = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items() if k in ("optimizer", "activation", "lr"))
            print(
                f"  {trial.trial_id} ({varied}) epoch {step}/{trial.config['epochs']}: "
                f"train_loss {result['train_loss']:.3f}  val_acc {100 * result['val_acc']:.2f}%",
                flush=True,
            )

    def _close(self, trial):
        """Write the trial's hyperparameters and final metrics for the HParams dashboard, then close."""
        from torch.utils.tensorboard.summary import hparams

        writer = self._writers.pop(trial.trial_id, None)
        if writer is None:
            return
        last = trial.last_result or {}
        metrics = {f"hparams/{k}": float(last[k]) for k in ("val_acc", "val_loss", "train_loss") if _is_number(last.get(k))}
        metrics["hparams/epochs_trained"] = float(last.get("training_iteration", 0))
        config = {k: _plain(v) for k, v in trial.config.items() if _plain(v) is not None}
        for summary in hparams(config, metrics):
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            if math.isfinite(value):
                writer.add_scalar(tag, value)
        writer.close()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._close(trial)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _plain(value):
    """Config values as the plain scalars TensorBoard's HParams accept (numpy types cast)."""
    if hasattr(value, "item"):
        value = value.item()
    return value if isinstance(value, (bool, int, float, str)) else None


def trial_dirname(trial) -> str:
    """``<trial id>-<the hyperparameters that vary>``: readable run names in TensorBoard."""
    parts = [str(trial.config[k]) for k in ("optimizer", "activation") if k in trial.config]
    parts += [f"lr{trial.config['lr']:.1e}", f"ep{trial.config['epochs']}"]
    return "-".join([trial.trial_id, *parts])


def _short(value):
    return f"{value:.2e}" if isinstance(value, float) else value


def trial_config(experiment: Experiment, settings: dict) -> tuple[dict, list[dict]]:
    """The Tune ``param_space`` and ``points_to_evaluate`` (the reference settings first)."""
    reference, space = settings["reference"], settings["space"]
    param_space = {
        **{k: v for k, v in reference.items() if k not in space},
        **{k: to_tune_domain(v) for k, v in space.items()},
        "dataset": settings["dataset"],
        "model": experiment.model,
        "mode": experiment.mode,
        "batch_size": settings["batch_size"],
        "seed": settings["seed"],
        "image_size": settings["image_size"],
        "channels": settings["channels"],
        "cached_features": settings["cached_features"],
    }
    # The reference is evaluated first, then the best configurations of a warm-start run;
    # points outside the (possibly narrowed) space are left out.
    points = []
    for point in [{k: reference[k] for k in space}, *settings.get("warm_start", [])]:
        point = {k: point.get(k) for k in space}
        if space and point not in points and all(v is not None and space[k].contains(v) for k, v in point.items()):
            points.append(point)
    return param_space, points


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that survives a crash between its own save and Tune's.

    After a kill -9, Tune's experiment state can list a trial the searcher's older saved state
    never suggested; stock OptunaSearch then fails the whole resumed sweep with a KeyError.
    Here such a trial's results are ignored while it runs, and its final score is given to
    Optuna as an evaluated point, so nothing learned is lost."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        config = (result or {}).get("config", {})
        value = (result or {}).get(self.metric)
        if not error and _is_number(value) and isinstance(self._space, dict):
            try:
                self.add_evaluated_point({k: config[k] for k in self._space}, value)
            except (KeyError, ValueError, TypeError, RuntimeError):
                pass


def new_tuner(experiment: Experiment, settings: dict, trainable, param_space: dict, points: list, run_dir: Path):
    """Optuna (seeded, the reference and warm-start points first) + ASHA, one iteration per epoch."""
    max_epochs = max(settings["max_epochs"], 1)
    search = ResumableOptunaSearch(points_to_evaluate=points or None, seed=settings["seed"]) if settings["space"] else None
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_epochs,
        grace_period=min(settings["grace_period"], max_epochs),
        reduction_factor=3,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=search,
            scheduler=scheduler,
            num_samples=settings["num_samples"],
            max_concurrent_trials=settings["max_concurrent_trials"],
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment.name,
            storage_path=str(run_dir),
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), TensorBoardCallback()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # a trial whose node dies goes on from its last checkpoint elsewhere
            failure_config=tune.FailureConfig(max_failures=settings.get("max_failures", 2)),
            verbose=0,
        ),
    )


def run_experiment(experiment: Experiment, settings: dict, inputs: dict, run_dir: Path) -> dict:
    """Run one experiment as a Tune sweep in ``run_dir/<experiment name>``; returns its summary."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # our own TensorBoard writer replaces Ray's
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # per-epoch checkpoints are intended
    exp_dir = run_dir / experiment.name
    resuming = tune.Tuner.can_restore(str(exp_dir))
    if not resuming:  # a new experiment, or one killed before Tune saved any state
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / EXPERIMENT_FILE).write_text(json.dumps(experiment_record(experiment, settings), indent=2, default=str))

    if settings["cached_features"]:
        started = time.time()
        task = ray.remote(num_cpus=settings["cpus_per_trial"], num_gpus=settings["gpus_per_trial"])(precompute_features)
        input_config = {
            "model": experiment.model,
            "activation": settings["reference"].get("activation", "relu"),
            "image_size": settings["image_size"],
            "channels": settings["channels"],
        }
        features = task.remote(input_config, inputs)
        ray.wait([features], fetch_local=False)
        inputs = {**inputs, "splits": features}
        print(f"backbone features ready in {time.time() - started:.1f}s (computed once, or from the cache)")
    param_space, points = trial_config(experiment, settings)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, inputs=inputs),
        {"cpu": settings["cpus_per_trial"], "gpu": settings["gpus_per_trial"]},
    )
    if resuming:  # keeps the searcher's and ASHA's state; unfinished trials go on from their checkpoints
        print(f"resuming {exp_dir}")
        try:
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
        except (ValueError, RuntimeError, OSError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot resume {exp_dir} ({first_line}): start a new run instead") from None
    else:
        tuner = new_tuner(experiment, settings, trainable, param_space, points, run_dir)
    started = time.time()
    results = tuner.fit()
    summary = {
        "experiment": experiment.name,
        "wall_s": round(time.time() - started, 1),
        "trials": len(results),
        "errored_trials": results.num_errors,
    }
    try:
        best = results.get_best_result(metric=METRIC, mode=MODE, scope="last")
    except RuntimeError:  # no trial reported a finite val_acc
        best = None
    if best is not None and best.checkpoint is not None:
        evaluate_remote = ray.remote(
            num_cpus=settings["cpus_per_trial"], num_gpus=settings["gpus_per_trial"], max_retries=1
        )(score_on_test_split)
        test = ray.get(evaluate_remote.remote(best.config, inputs, best.checkpoint))
        summary.update(
            best_trial=Path(best.path).name,
            config={k: best.config[k] for k in sorted(best.config)},
            epochs_trained=best.metrics["training_iteration"],
            val_acc=best.metrics[METRIC],
            **test,
        )
    (exp_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def experiment_record(experiment: Experiment, settings: dict) -> dict:
    random_init = experiment.mode in PRETRAINED_MODES and settings.get("pretrained") == "none"
    return {
        "name": experiment.name,
        "dataset": settings["dataset"],
        "model": experiment.model,
        "mode": experiment.mode,
        "label": experiment.label + (" (random init: no pretrained weights)" if random_init else ""),
        "reference": experiment.reference,
        "reference_accuracy": experiment.reference_accuracy if settings["dataset"] == experiment.dataset else None,
        "settings": {k: v for k, v in settings.items() if k not in ("space",)},
        "space": {k: repr(v) for k, v in settings["space"].items()},
    }
