"""The sweep: experiments as Ray Tune runs, Optuna searching and ASHA stopping, one after another.

:func:`run_sweep` is the one entry the command line calls: it connects to Ray, sizes the
trials, records the run, puts the inputs in the object store and runs each experiment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment.trial import Trial
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from tltune import console, openmp, signals, storage, trust
from tltune.errors import TrialsFailed, UserError, is_storage_full
from tltune.catalog import PRETRAINED_MODES
from tltune.config import factory_params
from tltune.experiments import Choice, Experiment, IntRange, LogUniform, Uniform
from tltune.models import model_kind
from tltune.raytune import budget, cluster
from tltune.raytune.callbacks import CsvResults, JsonResults, TensorBoardCallback, write_run_hparams
from tltune.raytune.full_storage import stopping_when_full
from tltune.raytune.live_study import LiveStudy
from tltune.raytune.progress import ProgressCallback
from tltune.raytune.trackers import record_outcome, tracker_callbacks
from tltune.raytune.trainable import precompute_features, score_on_test_split, train_trial
from tltune.records import ExperimentRecord, ExperimentSummary, FailureRecord, TimeRecord, is_finite_number
from tltune.results import EXPERIMENT_FILE, FAILED_FILE, METRIC, RUNS_FILE, SUMMARY_FILE, best_checkpoint
from tltune.settings import ExperimentSettings, SweepPlan
from tltune.studies import write_study
from tltune.train import CheckpointPolicy, asha_milestones, load_model_state, optimizer_extras

MODE = "max"
REPEATS_DIR = "repeats"  # in an experiment directory: the re-trainings with other seeds


def to_tune_domain(domain):
    if isinstance(domain, Choice):
        return tune.choice(list(domain.options))
    if isinstance(domain, LogUniform):
        return tune.loguniform(domain.low, domain.high)
    if isinstance(domain, Uniform):
        return tune.uniform(domain.low, domain.high)
    if isinstance(domain, IntRange):
        return tune.randint(domain.low, domain.high + 1)  # randint's upper bound is exclusive
    raise TypeError(f"unknown search domain {domain!r}")


def trial_dirname(trial) -> str:
    """``<trial id>-<the hyperparameters that vary>``: readable run names in TensorBoard.
    The model and mode are named where an experiment searches them (they are Tune domains there)."""
    searched = getattr(trial, "evaluated_params", {}) or {}
    parts = [str(trial.config[k]) for k in ("model", "mode") if k in searched]
    parts += [str(trial.config[k]) for k in ("optimizer", "activation") if k in trial.config]
    parts += [f"lr{trial.config['lr']:.1e}", f"ep{trial.config['epochs']}"]
    return "-".join([trial.trial_id, *parts])


def trial_config(experiment: Experiment, settings: ExperimentSettings) -> tuple[dict, list[dict]]:
    """The Tune ``param_space`` and ``points_to_evaluate`` (the reference settings first)."""
    reference, space = settings.reference, settings.space
    fixed = {
        "dataset": settings.dataset,
        "model": experiment.model,
        "mode": experiment.mode,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "image_size": settings.image_size,
        "channels": settings.channels,
        "cached_features": settings.cached_features,
    }
    keywords = sorted(factory_params({**reference, **space}))
    if keywords:  # a user factory's keyword arguments: TrialConfig tells them from mistakes by this list
        fixed["factory_keys"] = ",".join(keywords)
    # A searched hyperparameter (e.g. the extended search's batch size) is never overridden by a fixed setting.
    param_space = {
        **{k: v for k, v in reference.items() if k not in space},
        **{k: to_tune_domain(v) for k, v in space.items()},
        **{k: v for k, v in fixed.items() if k not in space},
    }
    # The reference is evaluated first, then the best configurations of a warm-start run;
    # points outside the (possibly narrowed) space are left out.
    points = []
    for point in [reference_point(settings), *settings.warm_start]:
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

    budget_key: str | None = None  # the experiment folder whose time budget ends the search (tltune.raytune.budget)

    def suggest(self, trial_id: str):
        if self.budget_key is not None and budget.is_over(self.budget_key):
            return Searcher.FINISHED
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials:
            with warnings.catch_warnings():
                # a resumed trial repeats the epochs after its last checkpoint: Optuna keeps a step's first value and warns
                warnings.filterwarnings("ignore", message="The reported value is ignored because this `step", category=UserWarning)
                super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        config = (result or {}).get("config", {})
        value = (result or {}).get(self.metric)
        if not error and is_finite_number(value) and isinstance(self._space, dict):
            try:
                self.add_evaluated_point({k: config[k] for k in self._space}, value)
            except (KeyError, ValueError, TypeError, RuntimeError):
                pass


def reference_point(settings: ExperimentSettings) -> dict:
    """The reference's values of the searched hyperparameters."""
    return {k: settings.reference[k] for k in settings.space}


def has_values(config: dict, values: dict) -> bool:
    return all(config.get(k) == v for k, v in values.items())


def is_reference(config: dict, settings: ExperimentSettings) -> bool:
    """Whether a trial's config holds the reference's values of every searched hyperparameter."""
    return has_values(config, reference_point(settings))


class ReferenceExemptASHA(ASHAScheduler):
    """ASHA that never stops the reference trial early: the seed's settings always train their
    full epochs and get a test accuracy, beside the search's best."""

    def __init__(self, settings: ExperimentSettings, **kwargs):
        super().__init__(**kwargs)
        self.reference = reference_point(settings)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # its rungs still see the result
        if has_values(trial.config, self.reference):
            return self.CONTINUE
        return decision


def tune_callbacks(experiment: str, name: str, exp_dir: str, settings: ExperimentSettings, run_root_up: int) -> list:
    """Tune's own CSV and JSON results, TensorBoard, the progress lines, the live Optuna study
    (the search only: the repeats are no search) and the trackers of --log-to."""
    callbacks = [CsvResults(), JsonResults(), TensorBoardCallback(run_root_up=run_root_up), ProgressCallback(name, exp_dir=exp_dir)]
    if run_root_up == 0 and settings.space:
        callbacks.append(LiveStudy(exp_dir, settings.space))
    return callbacks + tracker_callbacks(settings.log_to, experiment, exp_dir, group=name)


def run_config(experiment: str, name: str, storage_path: str, settings: ExperimentSettings, run_root_up: int = 0) -> tune.RunConfig:
    """Tune's run ``name`` (the experiment's, or its repeats') in ``storage_path``, which lies
    ``run_root_up`` levels below the run directory."""
    remote = storage.is_uri(storage_path)
    exp_dir = storage.join(storage_path, name) if run_root_up == 0 else storage_path
    return tune.RunConfig(
        name=name,
        storage_path=storage_path,
        callbacks=tune_callbacks(experiment, name, exp_dir, settings, run_root_up),
        # Ray saves its experiment state only now and then (on a bucket every sync_period) but
        # deletes superseded checkpoints at once: after a kill -9 the saved state can name a
        # checkpoint already gone. Every checkpoint is kept until the experiment has finished
        # (keep_only_latest_checkpoints).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        sync_config=tune.SyncConfig(sync_period=5) if remote else None,
        # a trial whose node dies goes on from its last checkpoint elsewhere
        failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        stop=budget.TimeBudgetStopper(exp_dir) if run_root_up == 0 else None,  # the search's; the repeats have none
        verbose=0,
    )


ASHA_REDUCTION_FACTOR = 3


def asha_rungs(settings: ExperimentSettings) -> dict:
    """ASHA's max_t and grace period for an experiment: one iteration per epoch."""
    max_epochs = max(settings.max_epochs, 1)
    return {"max_t": max_epochs, "grace_period": min(settings.grace_period, max_epochs), "reduction_factor": ASHA_REDUCTION_FACTOR}


def checkpoint_policy(settings: ExperimentSettings, exp_dir: str) -> CheckpointPolicy:
    """When the experiment's trials save checkpoints: at ASHA's rungs, at their last epoch, once
    the time budget is over, and between as --checkpoint-every says."""
    return CheckpointPolicy(milestones=asha_milestones(**asha_rungs(settings)), every=settings.checkpoint_every, deadline=budget.deadline(exp_dir))


def new_tuner(experiment: Experiment, settings: ExperimentSettings, trainable, param_space: dict, points: list, run_dir: str):
    """Optuna (seeded, the reference and warm-start points first) + ASHA (never stopping the
    reference), one iteration per epoch."""
    search = ResumableOptunaSearch(points_to_evaluate=points or None, seed=settings.seed) if settings.space else None
    if search is not None:
        search.budget_key = storage.join(run_dir, experiment.name)
    scheduler = ReferenceExemptASHA(settings, time_attr="training_iteration", **asha_rungs(settings))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=search,
            scheduler=scheduler,
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent_trials,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=run_config(experiment.name, experiment.name, run_dir, settings),
    )


def repeats_tuner(experiment: str, settings: ExperimentSettings, trainable, param_space: dict, points: list, exp_dir: str):
    """The given configurations (seeds included) trained to the end, no search, no early stop."""
    return tune.Tuner(
        trainable,
        # domains, so that each point sets its own without a warning (every trial is a point)
        param_space={**param_space, "seed": tune.randint(0, 2**31 - 1), "stop_epoch": tune.choice([None, *range(1, settings.max_epochs + 1)])},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=BasicVariantGenerator(points_to_evaluate=points),
            num_samples=len(points),
            max_concurrent_trials=settings.max_concurrent_trials,
            reuse_actors=True,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=run_config(experiment, REPEATS_DIR, exp_dir, settings, run_root_up=1),
    )


def fit(tune_dir: str, trainable, make_tuner) -> tune.ResultGrid:
    """``make_tuner()``'s sweep in ``tune_dir``, or the one saved there resumed, with Tune's
    state signed as it is saved (:mod:`tltune.trust`)."""
    # tuner.pkl alone (killed before Tune saved any state): nothing ran, start it anew
    if tune.Tuner.can_restore(tune_dir) and trust.has_saved_state(storage.list_dir(tune_dir)):
        print(f"resuming {tune_dir}")
        trust.signed_state_files(tune_dir)  # checked before (cli), again just before Ray unpickles
        try:  # keeps the searcher's and ASHA's state; unfinished trials go on from their checkpoints
            with console.quiet_logger("ray.tune.analysis.experiment_analysis"):  # "Failed to fetch metrics": trials stopped before epoch 1
                tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_errored=True)
        except (ValueError, RuntimeError, OSError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot resume {tune_dir} ({first_line}): start a new run instead") from None
    else:
        tuner = make_tuner()
        trust.sign(tune_dir, {"tuner.pkl": storage.read_bytes(storage.join(tune_dir, "tuner.pkl"))})
    # A signal makes Tune stop its trials and save its state one last time (Tune's own
    # SIGUSR1 handler), then Interrupted is raised: no summary, the experiment stays resumable.
    with signals.graceful(stop_tune), signing_saved_state(tune_dir), stopping_when_full(tune_dir):
        results = tuner.fit()
    keep_only_latest_checkpoints(results)
    return results


def keep_only_latest_checkpoints(results: tune.ResultGrid) -> None:
    """Once an experiment has finished (nothing of it is resumed from an older checkpoint),
    each trial keeps only its latest checkpoint, the one its test accuracy and a longer time
    budget's resume use. A checkpoint that cannot be deleted costs space, never results."""
    for result in results:
        latest = result.checkpoint
        if latest is None:
            continue
        latest_path = latest.path.rstrip("/")
        try:
            for info in latest.filesystem.get_file_info(pafs.FileSelector(latest_path.rpartition("/")[0])):
                if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_") and info.path.rstrip("/") != latest_path:
                    latest.filesystem.delete_dir(info.path)
        except OSError:
            pass


def stop_tune() -> None:
    """The first stop signal: Tune stops its trials (its own SIGUSR1 handler), whose workers end quietly."""
    cluster.mute_worker_output()
    os.kill(os.getpid(), signal.SIGUSR1)


def run_experiment(experiment: Experiment, settings: ExperimentSettings, inputs: dict, run_dir: str) -> dict:
    """Run one experiment as a Tune sweep in ``run_dir/<experiment name>``, then test its best
    trial and the reference's, and re-train both with ``settings.repeats`` seeds; its summary."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)  # its stop notices name Tuner.restore; ours names --resume
    exp_dir = storage.join(run_dir, experiment.name)
    if not storage.is_file(storage.join(exp_dir, EXPERIMENT_FILE)):
        storage.write_text(storage.join(exp_dir, EXPERIMENT_FILE), experiment_record(experiment, settings).to_json())

    if settings.cached_features:
        inputs = {**inputs, "features": backbone_features(experiment, settings, inputs)}
    param_space, points = trial_config(experiment, settings)
    with ExperimentClock(exp_dir) as clock:
        budget.start(exp_dir, settings.time_budget_s, spent_s=clock.before_s)
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, inputs={**inputs, "checkpoints": checkpoint_policy(settings, exp_dir)}),
            {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
        )
        try:
            results = fit(exp_dir, trainable, lambda: new_tuner(experiment, settings, trainable, param_space, points, run_dir))
        finally:  # finished, failed or interrupted: the Optuna study says so
            keep_study(exp_dir, settings.space)
        check_no_failures(experiment.name, results, exp_dir)
        summary = {"experiment": experiment.name, "trials": len(results), "errored_trials": results.num_errors}
        if settings.time_budget_s is not None:
            summary["time_budget"] = budget_record(settings, exp_dir, results, clock.spent_s(), clock.budget_stopped_trials)
        try:
            best = results.get_best_result(metric=METRIC, mode=MODE, scope="last")
        except RuntimeError:  # no trial reported a finite val_acc
            best = None
        to_test = {}
        if best is not None and best.checkpoint is not None:
            to_test["best"] = best
        reference = [r for r in results if is_reference(r.config, settings) and r.checkpoint is not None and METRIC in r.metrics]
        if reference:  # one trial, unless a space-less experiment ran several
            ref = to_test["reference"] = max(reference, key=lambda r: r.metrics["training_iteration"])
        if to_test:  # side by side, and the same trial once
            names = {role: trial_name(r) for role, r in to_test.items()}
            if len(set(names.values())) < len(names):
                what = f"the best trial ({names['best']}, the reference trial)"
            else:
                what = " and ".join(f"the {role} trial ({name})" for role, name in names.items())
            print(f"testing {what} on the test split", flush=True)
        scored = score(settings, inputs, {trial_name(r): r for r in to_test.values()}) if to_test else {}
        if "best" in to_test:
            summary.update(
                best_trial=trial_name(best),
                config={k: best.config[k] for k in sorted(best.config)},
                epochs_trained=best.metrics["training_iteration"],
                val_acc=best.metrics[METRIC],
                **scored[trial_name(best)],
            )
        if "reference" in to_test:
            summary["reference_trial"] = {"trial": trial_name(ref), "epochs_trained": ref.metrics["training_iteration"],
                                          "val_acc": ref.metrics[METRIC], **scored[trial_name(ref)]}  # fmt: skip
        if settings.repeats > 1 and "reference_trial" in summary and best is not None:
            summary["repeats"] = run_repeats(experiment, settings, trainable, param_space, exp_dir, inputs, ref, best, scored)
        search_epochs = sum(r.metrics.get("training_iteration", 0) for r in results)
        summary.update(epochs_spent=search_epochs + summary.get("repeats", {}).get("epochs_spent", 0), wall_s=round(clock.spent_s(), 1))
        storage.write_text(storage.join(exp_dir, SUMMARY_FILE), ExperimentSummary(**summary).to_json())
        with signals.finishing():  # the experiment is finished: a stop now keeps the next one from starting
            keep_study(exp_dir, settings.space)  # again, with the summary: the rebuild tells ASHA's stops from interruptions
            record_outcome(settings.log_to, experiment.name, exp_dir, summary)
    return summary


def backbone_features(experiment: Experiment, settings: ExperimentSettings, inputs: dict) -> dict:
    """model -> its frozen backbone's features of every image (object refs), computed once per
    backbone (or read from the disk cache) for the experiment's feature-extraction trials."""
    started = time.time()
    specs = {model: asdict(settings.reference_model_spec(model)) for model in experiment.models()}
    if settings.gpus_per_trial:  # on GPUs, as trials would, side by side
        task = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial)(precompute_features)
        features = {model: task.remote(spec, inputs) for model, spec in specs.items()}
        ray.wait(list(features.values()), num_returns=len(features), fetch_local=False)
    else:  # CPU trials: here, as the test scoring (see score)
        features = {model: ray.put(precompute_features(spec, inputs)) for model, spec in specs.items()}
    print(f"backbone features of {', '.join(specs)} ready in {time.time() - started:.1f}s (computed once, or from the cache)")
    return features


def budget_record(settings: ExperimentSettings, exp_dir: str, results: tune.ResultGrid, search_s: float, earlier: list[str]) -> dict:
    """What the time budget did to the search: whether it ended it, and the trials it stopped
    (with those of earlier invocations, read back from the summary a resume set aside)."""
    stopped_ids = budget.stopped_trials(exp_dir)
    stopped = {trial_name(r) for r in results if r.metrics.get("trial_id") in stopped_ids}
    return {"seconds": settings.time_budget_s, "search_s": round(search_s, 1), "ended_search": budget.is_over(exp_dir),
            "stopped_trials": sorted(stopped | set(earlier))}  # fmt: skip


class ExperimentClock:
    """Seconds an experiment has run over all its invocations: one that is interrupted records
    its part in ````tltune_time.json``, and the resume adds it (a SIGKILL loses that part)."""

    def __init__(self, exp_dir: str):
        self.path = storage.join(exp_dir, TimeRecord.FILE)
        self.budget_stopped_trials: list[str] = []
        try:
            record = TimeRecord.from_dict(json.loads(storage.read_text(self.path)), self.path)
            self.before_s = float(record.spent_s)
            self.budget_stopped_trials = [t for t in record.budget_stopped_trials or [] if isinstance(t, str)]
        except (OSError, ValueError, TypeError, AttributeError):  # none yet (a first run), or damaged: count from now
            self.before_s = 0.0
        self.started = time.time()

    def spent_s(self) -> float:
        return self.before_s + time.time() - self.started

    def __enter__(self) -> "ExperimentClock":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            with contextlib.suppress(OSError):  # never hides how the experiment ended
                record = TimeRecord(spent_s=round(self.spent_s(), 1), budget_stopped_trials=self.budget_stopped_trials or None)
                storage.write_text(self.path, record.to_json())


def trial_name(result) -> str:
    return result.path.rstrip("/").rsplit("/", 1)[-1]


def check_no_failures(name: str, results: tune.ResultGrid, exp_dir: str) -> None:
    failed = [r for r in results if r.error is not None]
    if failed:  # each failed every retry: the same error again, or a check on its inputs
        reason = f"{len(failed)} of {len(results)} trials failed; the first: {root_cause(failed[0].error)}"
        storage.write_text(storage.join(exp_dir, FAILED_FILE), FailureRecord(experiment=name, reason=reason).to_json())
        raise TrialsFailed(f"{name}: {reason}")


def score(settings: ExperimentSettings, inputs: dict, results: dict) -> dict[str, dict]:
    """Test accuracy of each result's checkpoint (name → scores). Trials on GPUs: as Ray tasks
    side by side, with a trial's resources. Trials on CPUs: here in the driver, which has torch
    loaded and the data at hand; a fresh Ray worker would spend longer importing torch than a
    CPU spends on one pass over the test split."""
    if not settings.gpus_per_trial:
        return {name: score_on_test_split(r.config, inputs, r.checkpoint) for name, r in results.items()}
    evaluate_remote = ray.remote(num_cpus=settings.cpus_per_trial, num_gpus=settings.gpus_per_trial, max_retries=1)(score_on_test_split)
    refs = {name: evaluate_remote.remote(r.config, inputs, r.checkpoint) for name, r in results.items()}
    return {name: ray.get(ref) for name, ref in refs.items()}


def repeat_values(config: dict, epochs_trained: int, space: dict) -> dict:
    """What a repeat of a trial sets: its searched values, and for a trial ASHA stopped, the
    epoch it stopped at. Its learning-rate schedule stays planned over its configured epochs,
    so the repeat trains what the trial trained."""
    return {**{k: config[k] for k in space}, "stop_epoch": epochs_trained if epochs_trained < config["epochs"] else None}


def run_repeats(experiment, settings, trainable, param_space, exp_dir, inputs, reference, best, scored) -> dict:
    """The reference's and the best trial's configurations trained again with ``repeats - 1``
    more seeds (the search's own trial is the first), each tested: accuracies per seed."""
    groups = {"reference": reference, "best": best}
    seeds = [settings.seed + i for i in range(1, settings.repeats)]

    def as_trained(result) -> dict:
        return repeat_values(result.config, result.metrics["training_iteration"], settings.space)

    configs = [as_trained(r) for r in groups.values()]
    points = [{**config, "seed": seed} for i, config in enumerate(configs) if config not in configs[:i] for seed in seeds]
    repeats_dir = storage.join(exp_dir, REPEATS_DIR)
    print(f"\n== {experiment.name}: the reference and the best configuration again with seeds {seeds}", flush=True)
    results = fit(repeats_dir, trainable, lambda: repeats_tuner(experiment.name, settings, trainable, param_space, points, exp_dir))
    check_no_failures(f"{experiment.name} (repeats)", results, exp_dir)
    done = [r for r in results if r.checkpoint is not None]
    tested = score(settings, inputs, {trial_name(r): r for r in done})
    summary = {"seeds": [settings.seed, *seeds], "epochs_spent": sum(r.metrics.get("training_iteration", 0) for r in results)}
    for group, original in groups.items():
        runs = [original, *(r for r in done if has_values(r.config, as_trained(original)))]
        tests = [scored[trial_name(original)]["test_acc"], *(tested[trial_name(r)]["test_acc"] for r in runs[1:])]
        summary[group] = {
            "trials": [trial_name(r) for r in runs],
            "seeds": [r.config["seed"] for r in runs],
            "epochs": [r.metrics["training_iteration"] for r in runs],
            "val_acc": [r.metrics[METRIC] for r in runs],
            "test_acc": tests,
        }
    return summary


THREAD_TIMEOUT_ENV = "TUNE_FUNCTION_THREAD_TIMEOUT_S"
TUNE_ENVIRONMENT = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # our own TensorBoard writer replaces Ray's
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",  # frequent checkpoints are intended (train.CheckpointPolicy)
    "TUNE_DISABLE_SIGINT_HANDLER": "1",  # tltune.signals decides what a signal does
    "RAY_AIR_NEW_OUTPUT": "0",  # its reporter prints a banner even when silent; ours reports
    # A reused trial actor waits this long for the last trial's thread to end, which frees the
    # trial's memory as it ends; Ray's 2 s was too short on a loaded 2-core machine ("Trainable
    # runner reuse requires reset_config() to be implemented and return True": a failed trial).
    THREAD_TIMEOUT_ENV: "30",
}


@contextlib.contextmanager
def tune_environment():
    """Tune reads these from the environment; set only while tltune's sweeps run, so a caller's
    own Tune runs in the same process (a notebook) keep Tune's defaults.

    Nor does Tune count the classes of tltune's callbacks for its usage statistics: to count
    them it imports its MLflow, W&B, Comet and Aim integrations, and with them mlflow and wandb
    where installed, 1.5 CPU-s of each sweep's driver that wants none of them."""
    from ray.air._internal import usage as air_usage
    from ray.tune.execution import class_cache

    # read in the trial actors: Tune hands them the driver's values as they start
    class_cache.ENV_VARS_TO_PROPAGATE.update((THREAD_TIMEOUT_ENV, openmp.WAIT_POLICY_ENV))
    environment = {**TUNE_ENVIRONMENT, openmp.WAIT_POLICY_ENV: openmp.wait_policy()}
    before = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    tag_callbacks = air_usage.tag_callbacks
    air_usage.tag_callbacks = lambda callbacks: False  # "no usage recorded", as Tune's own returns without callbacks
    try:
        yield
    finally:
        air_usage.tag_callbacks = tag_callbacks
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def signing_saved_state(exp_dir: str):
    """Tune saves its state to a local staging folder, then uploads it to ``exp_dir``; here
    each saved version is signed (:mod:`tltune.trust`) before that upload starts, so the
    state in ``exp_dir`` is always one tltune signed, whenever the driver dies. So is the
    ``error.pkl`` Ray pickles into a failed trial's folder, as soon as Ray wrote it; and Ray
    unpickles a trial's ``error.pkl`` (the ResultGrid ``fit`` returns) only if it is signed."""
    save = TuneController.save_to_dir
    handle_error = Trial.handle_error
    get_pickled_error = Trial.get_pickled_error
    signed = set()

    def sign_new(files: dict[str, bytes]) -> None:
        unsigned = {name: data for name, data in files.items() if (name, data) not in signed}
        trust.sign(exp_dir, unsigned)
        signed.update(unsigned.items())

    def save_and_sign(controller: TuneController) -> None:
        save(controller)
        staging = Path(controller._storage.experiment_driver_staging_path)
        saved = {}
        for path in staging.iterdir():
            if trust.is_pickled_state(path.name):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):  # a temporary file Ray just renamed
                    saved[path.name] = path.read_bytes()
        sign_new(saved)

    def handle_and_sign_error(trial: Trial, exc=None) -> None:
        handle_error(trial, exc)
        pickled = trial.pickled_error_file  # the trial's error.pkl in the driver's staging folder, if Ray pickled one
        if pickled:
            with contextlib.suppress(FileNotFoundError):
                sign_new({f"{Path(pickled).parent.name}/{Path(pickled).name}": Path(pickled).read_bytes()})

    def signed_pickled_error(trial: Trial):
        name = trial.run_metadata.pickled_error_filename
        if name is None:
            return None
        try:
            with trial.storage.storage_filesystem.open_input_stream(Path(trial.storage.trial_fs_path, name).as_posix()) as f:
                data = f.readall()
        except FileNotFoundError:
            return None
        if not trust.is_signed(exp_dir, data):  # replaced since Ray wrote it: Ray's text of the error instead
            return None
        return get_pickled_error(trial)

    TuneController.save_to_dir = save_and_sign
    Trial.handle_error = handle_and_sign_error
    Trial.get_pickled_error = signed_pickled_error
    try:
        yield
    finally:
        TuneController.save_to_dir = save
        Trial.handle_error = handle_error
        Trial.get_pickled_error = get_pickled_error


def keep_study(exp_dir: str, space: dict) -> None:
    """Write the experiment's Optuna study beside its results (:mod:`tltune.studies`); a
    failure to do so never hides how the sweep itself ended."""
    try:
        write_study(exp_dir, space)
    except Exception as exc:  # noqa: BLE001  the study is a by-product
        if not is_storage_full(exc):  # a full disk ends the sweep with its own line; the resume writes the study
            print(f"warning: the Optuna study of {exp_dir} was not written: {type(exc).__name__}: {exc}", file=sys.stderr)


def result_grid(exp_dir: str) -> tune.ResultGrid:
    """Ray's view of a finished or interrupted experiment (unpickles its state: check it first)."""
    from ray.tune import ExperimentAnalysis

    return tune.ResultGrid(ExperimentAnalysis(exp_dir, default_metric=METRIC, default_mode=MODE))


def root_cause(error: BaseException) -> str:
    """``Type: message`` of the exception a trial raised, out of Ray's wrappers, on one line."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def experiment_record(experiment: Experiment, settings: ExperimentSettings) -> ExperimentRecord:
    pretrained_models = [m for m in experiment.models() if model_kind(m) in ("alexnet", "torchvision")]
    random_init = bool(set(experiment.modes()) & set(PRETRAINED_MODES) and pretrained_models) and settings.pretrained == "none"
    searched = settings.space.get("optimizer")
    optimizers = sorted({settings.reference["optimizer"], *(searched.options if searched else ())})
    return ExperimentRecord(
        name=experiment.name,
        dataset=settings.dataset,
        model=experiment.model,
        mode=experiment.mode,
        label=experiment.label + (" (random init: no pretrained weights)" if random_init else ""),
        reference=experiment.reference,
        reference_accuracy=experiment.reference_accuracy if settings.dataset == experiment.dataset else None,
        settings=json.loads(json.dumps(settings.record(), default=str)),
        space={k: repr(v) for k, v in settings.space.items()},
        optimizer_extras={name: optimizer_extras(name) for name in optimizers},  # e.g. SGD's momentum
    )


def pretrained_label(weights: dict[str, str]) -> str:
    """Where an experiment's models start: 'imagenet', or 'resnet18=imagenet, alexnet=FILE'."""
    if len(set(weights.values())) == 1:
        return next(iter(weights.values()))
    return ", ".join(f"{model}={source}" for model, source in weights.items())


def run_sweep(plan: SweepPlan) -> None:
    """Connect to Ray, size the trials, record the run and run its experiments in order.

    Resources are checked against the cluster before anything is written to the run
    directory, so a sweep that cannot run leaves nothing behind."""
    own_ray = not ray.is_initialized()  # tltune.run after the caller's own ray.init(): sweep on the caller's Ray, leave it running
    if own_ray:
        cluster.connect(plan.address, plan.py_modules)
    elif plan.py_modules and not ray.get_runtime_context().runtime_env.get("py_modules"):
        raise UserError(f"the Ray of this process's own ray.init() does not ship the models' code to its workers, whose trials "
                        f"could not import it: call ray.init(runtime_env={{'py_modules': {list(plan.py_modules)!r}}}) instead, "
                        "or let tltune.run start Ray")  # fmt: skip
    signals.install(keep_received=True)  # again: Ray's core worker replaced the SIGTERM handler
    signals.raise_if_stopped()
    stopped = False  # by the user: the trial workers' shutdown is not printed
    try:
        settings = {}
        for experiment in plan.experiments:
            s = plan.settings[experiment.name]
            size = cluster.size_trials(plan.cpus_per_trial, plan.gpus_per_trial, s.num_samples, s.max_concurrent_trials, joined=plan.address is not None)
            settings[experiment.name] = replace(s, cpus_per_trial=size.cpus, gpus_per_trial=size.gpus, max_concurrent_trials=size.concurrent)
        storage.append_line(storage.join(plan.run_dir, RUNS_FILE), json.dumps(trust.sign_record(plan.record.to_dict())))
        write_run_hparams(plan.run_dir, [(trial_config(e, settings[e.name])[0], settings[e.name].space) for e in plan.experiments])
        state_refs = {key: ray.put(state) for key, state in plan.pretrained_states.items()}
        split_refs = {name: ray.put(s) for name, s in plan.splits.items()}
        print(f"results: {plan.run_dir}")
        failures = []
        for experiment in plan.experiments:
            signals.raise_if_stopped()
            s = settings[experiment.name]
            weights = plan.weights.get(experiment.name, {})
            pretrained = {model: state_refs[(model, source)] for model, source in weights.items()}
            if weights:
                s = replace(s, pretrained=pretrained_label(weights))
            if experiment.source:  # the CNN takes the architecture, and maybe the weights, of the source's best trial
                source_config, checkpoint = best_checkpoint(plan.source_run or plan.run_dir, experiment.source)
                s = replace(s, reference={**s.reference, "activation": source_config["activation"]}, pretrained=str(checkpoint))
                if set(experiment.modes()) & set(PRETRAINED_MODES):
                    pretrained["cnn"] = ray.put(load_model_state(checkpoint))
            print(f"\n== {experiment.name}: {s.num_samples} trial(s), up to {s.max_epochs} epochs, "
                  f"{s.cpus_per_trial:g} CPU / {s.gpus_per_trial:g} GPU per trial, up to {s.max_concurrent_trials} at once")  # fmt: skip
            inputs = {"splits": split_refs[s.dataset], "pretrained": pretrained}
            try:
                with tune_environment():
                    run_experiment(experiment, s, inputs, plan.run_dir)
            except TrialsFailed as exc:  # the next experiments may still succeed
                failures.append(str(exc))
                print(f"error: {exc}", file=sys.stderr)
        if failures:
            raise TrialsFailed("; ".join(failures))
    except signals.Interrupted:
        stopped = True
        raise
    finally:
        with contextlib.nullcontext() if stopped else signals.finishing():  # a finished run stays finished
            if own_ray:
                cluster.disconnect(stopped=stopped)
            elif ray.is_initialized():
                cluster.unmute_worker_output()
