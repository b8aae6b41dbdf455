"""Options + experiments -> a sweep: the one core under the command line and ``tltune.run``.

``sweep(experiments, options)`` checks everything a user can get wrong before Ray starts
(a :class:`UserError`, nothing written), picks the run directory (or the one to resume),
loads each dataset once, builds the :class:`SweepPlan` and hands it to ``tltune.raytune``.
Torch is imported only once the options are known to be good; Ray only to run the plan.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tltune import signals, storage, trust
from tltune.catalog import LOGICAL_GPUS_ENV, PRETRAINED_MODES
from tltune.config import MODEL_SHAPE_KEYS
from tltune.errors import TrialsFailed, UserError
from tltune.experiments import Experiment, IntRange, LogUniform, get_experiment, max_epochs, validate
from tltune.options import DEFAULT_BATCH_SIZE, DEFAULT_GRACE_PERIOD, DEFAULT_REPEATS, QUICK, SweepOptions, flag
from tltune.records import RunRecord
from tltune.results import RUNS_FILE, SUMMARY_FILE, best_checkpoint, top_configs
from tltune.settings import ExperimentSettings, SweepPlan


def choose_experiments(experiments: list[str | Experiment], only: tuple[str, ...] | None) -> list[Experiment]:
    chosen = [e if isinstance(e, Experiment) else get_experiment(e) for e in experiments]
    if only:
        unknown = [n for n in only if n not in {e.name for e in chosen}]
        if unknown:
            raise UserError(f"unknown experiment(s) {', '.join(unknown)} here: use {', '.join(e.name for e in chosen)}")
        chosen = [e for e in chosen if e.name in only]
    for experiment in chosen:
        validate(experiment)
    return chosen


def _given(value, default):
    """The user's value if they gave one (0 included), else the default."""
    return default if value is None else value


def experiment_settings(experiment: Experiment, options: SweepOptions) -> ExperimentSettings:
    """The reference and search space of one experiment after the user's options and presets."""
    o = options
    reference = dict(experiment.reference)
    space = dict(experiment.space)
    if o.lr_range:
        space["lr"] = LogUniform(*o.lr_range)
    if o.epochs_range:
        space["epochs"] = IntRange(*o.epochs_range)
    for key in ("optimizer", "activation", "lr", "epochs", "batch_size"):
        value = getattr(o, key)
        if value is not None and (key != "activation" or experiment.model == "cnn"):
            reference[key] = value
            space.pop(key, None)
    # Never searched: every trial gets them in its config, through the fixed part of the reference.
    reference.update(precision=o.precision, compile=o.compile)
    for name, domain in space.items():
        domain.check(name)
    cap = _given(o.max_epochs, QUICK["max_epochs"] if o.quick else None)
    if cap is not None:
        reference["epochs"] = min(reference["epochs"], cap)
        if "epochs" in space:
            space["epochs"] = IntRange(min(space["epochs"].low, cap), min(space["epochs"].high, cap))
    outside = [f"{k}={reference[k]}" for k, domain in space.items() if not domain.contains(reference[k])]
    if outside:
        print(f"warning: {experiment.name}: the reference's {', '.join(outside)} lies outside the searched ranges, so the "
              "search has no reference trial and the table no number at the reference settings", file=sys.stderr)  # fmt: skip
    num_samples = _given(o.num_samples, min(experiment.num_samples, QUICK["num_samples"]) if o.quick else experiment.num_samples)
    quick_size = QUICK["alexnet_image_size"] if o.quick and experiment.model == "alexnet" else None
    return ExperimentSettings(
        dataset=o.dataset or experiment.dataset,
        reference=reference,
        space=space,
        num_samples=num_samples,
        max_epochs=max_epochs(reference, space),
        batch_size=_given(o.batch_size, DEFAULT_BATCH_SIZE),
        seed=o.seed,
        image_size=_given(o.image_size, experiment.input.get("image_size", quick_size)),
        channels=experiment.input.get("channels"),
        cached_features=experiment.mode == "feature_extract" and backbone_output_is_fixed(reference, space) and not o.no_feature_cache,
        grace_period=_given(o.grace_period, QUICK["grace_period"] if o.quick else DEFAULT_GRACE_PERIOD),
        max_concurrent_trials=o.max_concurrent_trials,
        warm_start=tuple(top_configs(o.warm_start, experiment.name)) if o.warm_start else (),
        repeats=_given(o.repeats, QUICK["repeats"] if o.quick else DEFAULT_REPEATS),
    )


def backbone_output_is_fixed(reference: dict, space: dict) -> bool:
    """Whether a frozen backbone gives every trial the same output per image, so that it can be
    computed once: not if the network's shape is searched, or the images are augmented."""
    augmented = "augmentation" in space or reference.get("augmentation", "none") != "none"
    return not augmented and not set(MODEL_SHAPE_KEYS) & set(space)


def check_device_options(options: SweepOptions) -> None:
    """--precision and --compile against the device the trials will run on. A joined cluster
    (--address) may have GPUs this machine lacks: then only what the options say is checked."""
    import torch

    from tltune.train import cpu_has_bf16, cuda_problem, gpu_has_bf16

    o = options
    joined = bool(o.address or os.environ.get("RAY_ADDRESS"))
    if not joined and o.gpus_per_trial != 0 and has_nvidia_gpu() and os.environ.get(LOGICAL_GPUS_ENV) != "1":
        problem = cuda_problem()
        if problem:  # Ray would still give trials this node's GPUs, and every trial would fail
            raise UserError(f"this machine has NVIDIA GPUs but {problem} (or pass --gpus-per-trial 0 to train on the CPUs)")
    # Without --gpus-per-trial a local sweep gives trials a GPU when it has one (and torch sees it).
    on_cpu = o.gpus_per_trial == 0 or (not joined and not torch.cuda.is_available())
    if o.precision == "fp16" and on_cpu:
        why = "--gpus-per-trial 0" if o.gpus_per_trial == 0 else "no CUDA GPU is visible here"
        raise UserError(f"--precision fp16 needs a GPU and these trials run on the CPU ({why}): use bf16, fp32 or auto")
    if o.precision == "bf16" and not joined and not on_cpu:
        for index in range(torch.cuda.device_count()):
            if not gpu_has_bf16(index):
                name, (major, minor) = torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)
                raise UserError(f"--precision bf16: GPU {index} ({name}, compute capability {major}.{minor}) has no bf16 (needs 8.0+): use fp16 or auto")
    if o.precision == "bf16" and on_cpu and not joined and not cpu_has_bf16():
        print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): --precision bf16 emulates it, many times slower than fp32", file=sys.stderr)
    if o.compile:
        check_compile(None if joined else "cpu" if on_cpu else "cuda")


def has_nvidia_gpu() -> bool:
    """The NVIDIA driver lists a GPU on this machine (what Ray counts as its GPUs)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


COMPILE_PROBE = """
import logging, sys
import torch
logging.getLogger("torch").setLevel(logging.CRITICAL)
try:
    torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(2, device=sys.argv[1]))
except Exception as exc:  # no C++ compiler (CPU), no Triton (GPU)...
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    print(f"{type(exc).__name__}: {lines[0] if lines else ''}")
    sys.exit(1)
"""


def check_compile(device: str | None) -> None:
    """torch.compile a trivial function on ``device`` (None: a joined cluster's, unknown
    here: only whether this Python and platform support torch.compile at all). The probe runs
    in a child process, so the driver holds no CUDA context and no compile-worker pool for the
    whole sweep."""
    import subprocess

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError(f"--compile: torch.compile does not support this platform or Python {sys.version.split()[0]}: drop --compile")
    if device is None:
        return
    probe = subprocess.run([sys.executable, "-c", COMPILE_PROBE, device], capture_output=True, text=True)
    if probe.returncode != 0:
        why = (probe.stdout.strip().splitlines() or probe.stderr.strip().splitlines()[-1:] or ["no reason given"])[-1]
        raise UserError(f"--compile: torch.compile cannot run on this machine's {device} ({why}): drop --compile")


def check_model_input(experiment: Experiment, settings: ExperimentSettings, splits) -> None:
    """Build the experiment's model as its reference trial would and run two real images
    through it: an input too small for the model fails here, not in every trial."""
    import numpy as np
    import torch

    from tltune.data import as_tensors
    from tltune.train import setup_image_model

    try:
        model, transform = setup_image_model(settings.reference_model_spec(experiment.model), experiment.mode, splits, None)
        images, _ = as_tensors(splits.train.subset(np.arange(min(2, len(splits.train)))))
        with torch.no_grad():
            model.eval()(transform(images))
    except (RuntimeError, ValueError) as exc:
        size = settings.image_size or splits.image_size
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{experiment.name}: a {size}x{size} input does not fit the {experiment.model} model ({first}): pass a larger --image-size") from None


def pretrained_alexnet(experiment: Experiment) -> bool:
    return experiment.model == "alexnet" and experiment.mode in PRETRAINED_MODES


def resolve_weights(options: SweepOptions) -> dict | None:
    """The ImageNet AlexNet weights the pretrained AlexNet experiments start from (None: random
    init), read once here, before Ray."""
    from tltune.models import load_imagenet_state

    if options.weights == "none":
        return None
    return load_imagenet_state(options.weights or "imagenet")


def run_label(chosen: list[Experiment]) -> str:
    """What the experiments' names share: ``cifar10`` for cifar10-alexnet-finetune and
    cifar10-cnn-search, the name itself for one experiment, else ``sweep``."""
    parts = [e.name.split("-") for e in chosen]
    common = []
    for words in zip(*parts):
        if len(set(words)) > 1:
            break
        common.append(words[0])
    return "-".join(common) or "sweep"


def new_run_dir(options: SweepOptions, chosen: list[Experiment], run_all: bool) -> str:
    """A new run directory (local path or URI), not created yet; with ``run_all`` the same one
    every time (``all``), added to."""
    name = options.name or ("all" if run_all else f"{run_label(chosen)}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = storage.join(storage.absolute(options.storage_path), name)
    if storage.exists(run_dir) and not run_all:
        raise UserError(f"{run_dir} already exists and is never overwritten: pass another --name")
    return run_dir


def skip_finished(chosen: list[Experiment], run_dir: str, set_aside: bool) -> list[Experiment]:
    """Experiments of ``run_dir`` that finished are skipped; an interrupted one is resumed, or
    with ``set_aside`` renamed (never deleted) and run again."""
    remaining = []
    for experiment in chosen:
        exp_dir = storage.join(run_dir, experiment.name)
        if storage.is_file(storage.join(exp_dir, SUMMARY_FILE)):
            print(f"{experiment.name}: finished in {exp_dir}, skipped")
            continue
        if storage.exists(exp_dir) and set_aside:
            aside = f"{exp_dir}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"
            storage.move(exp_dir, aside)
            print(f"{experiment.name}: unfinished results moved to {aside}; running it again")
        remaining.append(experiment)
    return remaining


def resumed_options(options: SweepOptions) -> SweepOptions:
    """The options a run directory was started with (read back through SweepOptions, so they
    are checked like fresh ones), so a resume continues the same sweep; where Ray runs
    (--address) may change."""
    run_dir = storage.absolute(options.resume)
    storage.check_writable(run_dir)
    runs = storage.join(run_dir, RUNS_FILE)
    if not storage.is_file(runs):
        raise UserError(f"{run_dir} is not a tltune run directory (no runs.jsonl): pass a directory a sweep printed as 'results: ...'")
    try:
        saved = RunRecord.from_dict(json.loads(storage.read_text(runs).splitlines()[0]), runs).saved_options()
    except (ValueError, IndexError, AttributeError):
        saved = None
    if saved is None:
        raise UserError(f"{runs} is damaged: cannot tell how the run was started")
    try:
        started = SweepOptions.from_record(saved)
    except UserError as exc:
        raise UserError(f"{runs}: its recorded options are not valid ({exc})") from None
    changed = [k for k, v in options.changed().items() if k not in ("resume", "address") and v != getattr(started, k)]
    if changed:
        raise UserError(f"--resume continues {run_dir} with the settings it was started with: drop {', '.join(map(flag, changed))} (only --address may change)")
    return replace(started, resume=run_dir, address=options.address or started.address)


@dataclass
class SweepOutcome:
    run_dir: str | None  # None: nothing was left to run
    skipped: dict[str, str] = field(default_factory=dict)  # experiment -> why it was not run


def prepare_inputs(chosen: list[Experiment], settings: dict, options: SweepOptions, run_dir: str, run_all: bool, skipped: dict):
    """Load each dataset once, the ImageNet weights if needed, and check transfer sources, all
    before Ray starts. What is missing is an error; with ``run_all`` its experiments are skipped
    (named in ``skipped``, with why)."""
    from tltune.data import load_dataset, make_splits

    def skip_or_raise(exc: UserError, what: str, dropped) -> list[Experiment]:
        if not run_all:
            raise exc
        print(f"warning: skipping {what}: {exc}", file=sys.stderr)
        skipped.update({e.name: str(exc) for e in chosen if dropped(e)})
        return [e for e in chosen if not dropped(e)]

    o = options
    subset = {
        "train_subset": _given(o.train_subset, QUICK["train_subset"] if o.quick else None),
        "test_subset": _given(o.test_subset, QUICK["test_subset"] if o.quick else None),
    }
    splits = {}
    for dataset in dict.fromkeys(settings[e.name].dataset for e in chosen):
        started = time.time()
        print(f"{dataset}: loading...", flush=True)
        try:
            loaded = load_dataset(dataset, o.data_root)
        except UserError as exc:
            chosen = skip_or_raise(exc, f"the {dataset} experiments", lambda e: settings[e.name].dataset == dataset)
            continue
        s = splits[dataset] = make_splits(loaded, o.val_fraction, o.seed, **subset)
        print(f"{dataset}: {len(s.train)} train / {len(s.val)} val / {len(s.test)} test images, "
              f"{s.image_size}x{s.image_size}x{s.channels}, {s.num_classes} classes ({time.time() - started:.1f}s)")  # fmt: skip
    for experiment in chosen:
        if settings[experiment.name].dataset in splits:
            check_model_input(experiment, settings[experiment.name], splits[settings[experiment.name].dataset])

    imagenet_state = None
    if any(pretrained_alexnet(e) for e in chosen):
        try:
            imagenet_state = resolve_weights(o)
        except UserError as exc:
            if o.quick and o.weights is None:
                # Training a randomly initialised AlexNet says nothing about transfer learning
                # and would take most of a quick run: leave those rows out, and say so.
                print(f"warning: {exc}\nwarning: --quick skips {', '.join(e.name for e in chosen if pretrained_alexnet(e))}: "
                      "without pretrained weights they would measure nothing. Pass --weights FILE (or --weights none "
                      "to train AlexNet from random weights anyway).", file=sys.stderr)  # fmt: skip
                why = "--quick without pretrained AlexNet weights: pass --weights FILE"
                skipped.update({e.name: why for e in chosen if pretrained_alexnet(e)})
                chosen = [e for e in chosen if not pretrained_alexnet(e)]
            else:
                chosen = skip_or_raise(exc, "the pretrained AlexNet experiments", pretrained_alexnet)
    names = {e.name for e in chosen}
    for experiment in [e for e in chosen if e.source and e.source not in names]:
        try:  # fail now, not after hours of other experiments
            best_checkpoint(o.source_run or run_dir, experiment.source)
        except UserError as exc:
            chosen = skip_or_raise(exc, experiment.name, lambda e: e is experiment)
    return chosen, splits, imagenet_state


def sweep(experiments: list[str | Experiment], options: SweepOptions, run_all: bool = False, argv: list[str] | None = None) -> SweepOutcome:
    """Run ``experiments`` as ``options`` say; the run directory (``None``: nothing left to
    run) and the experiments left out. ``run_all``: keep adding to one run directory, skip what finished, and skip (with a
    warning) experiments whose data or weights are not available. ``argv``: the command line,
    recorded in runs.jsonl.

    Raises :class:`UserError` (nothing ran), :class:`TrialsFailed` and
    :class:`signals.Interrupted`, both with ``run_dir`` (``None``: nothing was written)."""
    if options.resume:
        options = resumed_options(options)
    chosen = choose_experiments(experiments, options.experiments)
    check_device_options(options)
    from tltune.raytune.address import check_reachable, cluster_address

    address = cluster_address(options.address)
    if address:
        check_reachable(address)
    settings = {e.name: experiment_settings(e, options) for e in chosen}
    if options.resume:
        run_dir = options.resume
    else:
        storage.check_writable(options.storage_path)  # first: a bad URI must not hang a later call
        run_dir = new_run_dir(options, chosen, run_all)
    from tltune.data import cache_dir

    with storage.run_lock(run_dir, cache_dir() / "locks"):
        if options.resume or run_all:
            chosen = skip_finished(chosen, run_dir, set_aside=not options.resume)
        if options.resume:  # before anything is unpickled, and before Ray starts
            for experiment in chosen:
                trust.signed_state_files(storage.join(run_dir, experiment.name))
        return _run_locked(chosen, settings, options, run_dir, run_all, address, argv)


def _run_locked(chosen, settings, options: SweepOptions, run_dir: str, run_all: bool, address: str | None, argv) -> SweepOutcome:
    outcome = SweepOutcome(run_dir)
    try:
        chosen, splits, imagenet_state = prepare_inputs(chosen, settings, options, run_dir, run_all, outcome.skipped)
        if not chosen:
            print("nothing to run")
            return SweepOutcome(None, outcome.skipped)
        plan = SweepPlan(
            experiments=chosen,
            settings=settings,
            splits=splits,
            imagenet_state=imagenet_state,
            weights=options.weights or "imagenet",
            run_dir=run_dir,
            record=RunRecord(started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=list(argv if argv is not None else sys.argv), options=options.record()),
            source_run=options.source_run,
            address=address,
            cpus_per_trial=options.cpus_per_trial,
            gpus_per_trial=options.gpus_per_trial,
        )
        from tltune.raytune.sweep import run_sweep  # imports Ray: only once the input is known to be good

        run_sweep(plan)
    except (signals.Interrupted, TrialsFailed) as stop:
        stop.run_dir = run_dir if storage.is_file(storage.join(run_dir, RUNS_FILE)) else None
        raise
    return outcome

