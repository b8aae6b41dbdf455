"""The one command-line interface every ``sweeps/*.py`` script shares.

``main(experiment_names)`` parses the flags, checks everything a user can get wrong before
Ray starts (exit code 2 with one message), loads each dataset once, runs the experiments one
after another and prints the best configurations and the seed-format table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from tltune import signals, storage, trust
from tltune.config import MODEL_SHAPE_KEYS
from tltune.errors import TrialsFailed, UserError
from tltune.experiments import EXPERIMENTS, Experiment, IntRange, LogUniform, check_settings, get_experiment, max_epochs, validate
from tltune.models import ACTIVATIONS, PRETRAINED_MODES
from tltune.results import RUNS_FILE, best_checkpoint, top_configs
from tltune.settings import ExperimentSettings, SweepPlan
from tltune.train import OPTIMIZERS, PRECISION_CHOICES

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


def build_parser(description: str, experiment_names: list[str] | None = None, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser_class(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few-minute CPU run: %s" % ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    names = experiment_names or list(EXPERIMENTS)
    p.add_argument("--experiments", nargs="+", metavar="NAME", help=f"run only these: {', '.join(names)}")
    data = p.add_argument_group("data")
    data.add_argument("--data-root", help="dataset folder (else $TLTUNE_DATA_ROOT, else ./data)")
    data.add_argument("--dataset", help="run the experiments on another dataset: mnist, svhn, cifar10, or a class-folder dataset under the data root")
    data.add_argument("--train-subset", type=int, help="train on this many images (default: all)")
    data.add_argument("--test-subset", type=int, help="test on this many images (default: all)")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of the training set held out for validation (default 0.1)")
    data.add_argument("--image-size", type=int, help="model input size (default: 224 for AlexNet, native for the CNN)")
    model = p.add_argument_group("model and training")
    model.add_argument("--weights", help="AlexNet pretrained weights: 'imagenet' (download), 'none', or a state-dict file (default: imagenet)")
    model.add_argument("--optimizer", choices=list(OPTIMIZERS), help="fix the optimizer instead of searching it")
    model.add_argument("--activation", choices=list(ACTIVATIONS), help="fix the CNN activation instead of searching it")
    model.add_argument("--lr", type=float, help="fix the learning rate instead of searching it")
    model.add_argument("--epochs", type=int, help="fix the number of epochs instead of searching it")
    model.add_argument("--lr-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="search the learning rate log-uniformly in [LOW, HIGH]")
    model.add_argument("--epochs-range", type=int, nargs=2, metavar=("LOW", "HIGH"), help="search epochs in [LOW, HIGH]")
    model.add_argument("--max-epochs", type=int, help="cap every epoch count (reference and search)")
    model.add_argument("--batch-size", type=int, help=f"fix the batch size (default {DEFAULT_BATCH_SIZE}, or searched where an experiment searches it)")
    model.add_argument("--no-feature-cache", action="store_true", help="feature extraction: run the frozen backbone in every epoch instead of once")
    model.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                       help="(default) auto: bf16 on GPUs that have it (Ampere+), else fp16 with loss scaling; on a CPU bf16 where it is native (AVX512-BF16, AMX), else fp32")
    model.add_argument("--compile", action="store_true", help="torch.compile each trial's model: minutes of compiling per trial, pays only on long GPU trials (docs/PERFORMANCE.md)")
    model.add_argument("--seed", type=int, default=0, help="seeds the data split, the searcher and every trial (default 0)")
    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--num-samples", type=int, help="trials per experiment (default: each experiment's own)")
    sweep.add_argument("--max-concurrent-trials", type=int, help="default: as many as the cluster holds, its autoscaler's nodes included")
    sweep.add_argument("--cpus-per-trial", type=float, help="default: the CPUs of a node shared among the trials")
    sweep.add_argument("--gpus-per-trial", type=float, help="fractions pack trials on one GPU (default: 1 if the cluster has GPU nodes or its autoscaler can add them, else 0)")
    sweep.add_argument("--repeats", type=int, help=f"after the search, train the reference and the best configuration with this many seeds in all "
                       f"and report mean ± std (default {DEFAULT_REPEATS}; 1 with --quick: no re-training)")
    sweep.add_argument("--grace-period", type=int, help=f"ASHA: epochs before a trial may be stopped (default {DEFAULT_GRACE_PERIOD})")
    sweep.add_argument("--source-run", metavar="RUN_DIR", help="transfer experiments: take the source CNN from this run (default: this run)")
    sweep.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run with its original settings: finished experiments are kept, unfinished trials go on from their checkpoints")
    sweep.add_argument("--warm-start", metavar="RUN_DIR", help="first evaluate the best configurations of the same experiments in a previous run")
    sweep.add_argument("--address", help="join this Ray cluster (else $RAY_ADDRESS, else start a local Ray)")
    sweep.add_argument("--storage-path", default="results", help="where run directories go: a local folder (default ./results) or a URI (s3://bucket/prefix, gs://...)")
    sweep.add_argument("--name", help="run directory name (default: the experiments' common name, e.g. cifar10, then -<date>-<time>)")
    return p


def choose_experiments(experiments: list[str | Experiment], only: list[str] | None) -> list[Experiment]:
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


def experiment_settings(experiment: Experiment, args) -> ExperimentSettings:
    """The reference and search space of one experiment after the user's flags and presets."""
    reference = dict(experiment.reference)
    space = dict(experiment.space)
    if args.lr_range:
        space["lr"] = LogUniform(*args.lr_range)
    if args.epochs_range:
        space["epochs"] = IntRange(*args.epochs_range)
    for key in ("optimizer", "activation", "lr", "epochs", "batch_size"):
        value = getattr(args, key)
        if value is not None and (key != "activation" or experiment.model == "cnn"):
            reference[key] = value
            space.pop(key, None)
    # Never searched: every trial gets them in its config, through the fixed part of the reference.
    reference.update(precision=args.precision, compile=args.compile)
    for name, domain in space.items():
        domain.check(name)
    cap = _given(args.max_epochs, QUICK["max_epochs"] if args.quick else None)
    if cap is not None:
        if cap < 1:
            raise UserError(f"--max-epochs must be at least 1, got {cap}")
        reference["epochs"] = min(reference["epochs"], cap)
        if "epochs" in space:
            space["epochs"] = IntRange(min(space["epochs"].low, cap), min(space["epochs"].high, cap))
    outside = [f"{k}={reference[k]}" for k, domain in space.items() if not domain.contains(reference[k])]
    if outside:
        print(f"warning: {experiment.name}: the reference's {', '.join(outside)} lies outside the searched ranges, so the "
              "search has no reference trial and the table no number at the reference settings", file=sys.stderr)  # fmt: skip
    num_samples = _given(args.num_samples, min(experiment.num_samples, QUICK["num_samples"]) if args.quick else experiment.num_samples)
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    quick_size = QUICK["alexnet_image_size"] if args.quick and experiment.model == "alexnet" else None
    image_size = _given(args.image_size, experiment.input.get("image_size", quick_size))
    grace = _given(args.grace_period, QUICK["grace_period"] if args.quick else DEFAULT_GRACE_PERIOD)
    repeats = _given(args.repeats, QUICK["repeats"] if args.quick else DEFAULT_REPEATS)
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    return ExperimentSettings(
        dataset=args.dataset or experiment.dataset,
        reference=reference,
        space=space,
        num_samples=num_samples,
        max_epochs=max_epochs(reference, space),
        batch_size=_given(args.batch_size, DEFAULT_BATCH_SIZE),
        seed=args.seed,
        image_size=image_size,
        channels=experiment.input.get("channels"),
        cached_features=experiment.mode == "feature_extract" and backbone_output_is_fixed(reference, space) and not args.no_feature_cache,
        grace_period=grace,
        max_concurrent_trials=args.max_concurrent_trials,
        warm_start=tuple(top_configs(args.warm_start, experiment.name)) if args.warm_start else (),
        repeats=repeats,
    )


def backbone_output_is_fixed(reference: dict, space: dict) -> bool:
    """Whether a frozen backbone gives every trial the same output per image, so that it can be
    computed once: not if the network's shape is searched, or the images are augmented."""
    augmented = "augmentation" in space or reference.get("augmentation", "none") != "none"
    return not augmented and not set(MODEL_SHAPE_KEYS) & set(space)


def check_args(args) -> None:
    check_settings(
        {k: getattr(args, k) for k in ("lr", "epochs", "batch_size") if getattr(args, k) is not None}, where="command line"
    )
    if args.lr_range:
        LogUniform(*args.lr_range).check("--lr-range")
    if args.epochs_range:
        IntRange(*args.epochs_range).check("--epochs-range")
        if args.epochs_range[0] < 1:
            raise UserError(f"--epochs-range must start at 1 or more, got {args.epochs_range[0]}")
    for flag in ("cpus_per_trial", "gpus_per_trial"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value >= 0):  # nan: Ray would wait for "nan CPUs" forever
            raise UserError(f"--{flag.replace('_', '-')} must be a number >= 0, got {value}")
    if args.cpus_per_trial == 0:
        raise UserError("--cpus-per-trial must be > 0: a trial needs a CPU to run on")
    if args.max_concurrent_trials is not None and args.max_concurrent_trials < 1:
        raise UserError(f"--max-concurrent-trials must be at least 1, got {args.max_concurrent_trials}")
    if args.grace_period is not None and args.grace_period < 1:
        raise UserError(f"--grace-period must be at least 1, got {args.grace_period}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if not (math.isfinite(args.val_fraction) and 0 < args.val_fraction < 1):
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    for flag in ("train_subset", "test_subset", "image_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    check_device_flags(args)


def check_device_flags(args) -> None:
    """--precision and --compile against the device the trials will run on. A joined cluster
    (--address) may have GPUs this machine lacks: then only what the flags say is checked."""
    import torch

    from tltune.train import cpu_has_bf16, gpu_has_bf16

    joined = bool(args.address or os.environ.get("RAY_ADDRESS"))
    # Without --gpus-per-trial a local sweep gives trials a GPU when it has one (and torch sees it).
    on_cpu = args.gpus_per_trial == 0 or (not joined and not torch.cuda.is_available())
    if args.precision == "fp16" and on_cpu:
        why = "--gpus-per-trial 0" if args.gpus_per_trial == 0 else "no CUDA GPU is visible here"
        raise UserError(f"--precision fp16 needs a GPU and these trials run on the CPU ({why}): use bf16, fp32 or auto")
    if args.precision == "bf16" and not joined and not on_cpu:
        for index in range(torch.cuda.device_count()):
            if not gpu_has_bf16(index):
                name, (major, minor) = torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)
                raise UserError(f"--precision bf16: GPU {index} ({name}, compute capability {major}.{minor}) has no bf16 (needs 8.0+): use fp16 or auto")
    if args.precision == "bf16" and on_cpu and not joined and not cpu_has_bf16():
        print("warning: this CPU has no native bf16 (AVX512-BF16 or AMX): --precision bf16 emulates it, many times slower than fp32", file=sys.stderr)
    if args.compile:
        check_compile(None if joined else "cpu" if on_cpu else "cuda")


def check_compile(device: str | None) -> None:
    """torch.compile a trivial function on ``device`` (None: a joined cluster's, unknown
    here: only whether this Python and platform support torch.compile at all)."""
    import logging

    import torch
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError(f"--compile: torch.compile does not support this platform or Python {sys.version.split()[0]}: drop --compile")
    if device is None:
        return
    quiet = logging.getLogger("torch")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the error below says it in one line
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(2, device=device))
    except Exception as exc:  # no C++ compiler (CPU), no Triton (GPU)...
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UserError(f"--compile: torch.compile cannot run on this machine's {device} ({type(exc).__name__}: {lines[0] if lines else ''}): drop --compile") from None
    finally:
        quiet.setLevel(level)


def check_model_input(experiment: Experiment, settings: ExperimentSettings, splits) -> None:
    """Build the experiment's model as its reference trial would and run two real images
    through it: an input too small for the model fails here, not in every trial."""
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


def resolve_weights(args, needed: bool) -> dict | None:
    """ImageNet AlexNet weights if any experiment needs them; read once here, before Ray."""
    from tltune.models import load_imagenet_state

    if not needed or args.weights == "none":
        return None
    try:
        return load_imagenet_state(args.weights or "imagenet")
    except UserError as exc:
        if args.quick and args.weights is None:
            print(
                f"warning: {exc}\nwarning: --quick goes on with randomly initialised AlexNet: its accuracies "
                "say nothing about transfer learning. Pass --weights to use pretrained ones.",
                file=sys.stderr,
            )
            return None
        raise


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


def run_dir_for(args, chosen: list[Experiment], run_all: bool) -> str:
    """A new run directory (local path or URI), not created yet; with ``run_all`` the same one
    every time (``all``), added to."""
    name = args.name or ("all" if run_all else f"{run_label(chosen)}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = storage.join(storage.absolute(args.storage_path), name)
    if storage.exists(run_dir) and not run_all:
        raise UserError(f"{run_dir} already exists and is never overwritten: pass another --name")
    return run_dir


def skip_finished(chosen: list[Experiment], run_dir: str, set_aside: bool) -> list[Experiment]:
    """Experiments of ``run_dir`` that finished are skipped; an interrupted one is resumed, or
    with ``set_aside`` renamed (never deleted) and run again."""
    from tltune.results import SUMMARY_FILE

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


def main(experiments: list[str | Experiment], description: str, argv: list[str] | None = None, run_all: bool = False) -> int:
    """The command line of ``sweeps/*.py`` and ``tltune sweep``: run the experiments and print
    the best configurations; an exit code (2: bad input, 1: an experiment failed, 128 + signal)."""
    parser = build_parser(description, [e if isinstance(e, str) else e.name for e in experiments])
    args = parser.parse_args(argv)
    signals.install()
    try:
        run_dir = sweep(experiments, args, parser, run_all)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except signals.Interrupted as stop:
        if stop.run_dir:
            print(f"\ninterrupted ({stop}): finished trials are kept in {stop.run_dir}; continue with --resume {stop.run_dir}", file=sys.stderr)
        else:
            print(f"\ninterrupted ({stop}) before the run started: nothing was written", file=sys.stderr)
        return stop.exit_code
    except TrialsFailed as exc:
        print_report(exc.run_dir)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if run_dir:
        print_report(run_dir)
    return 0


def sweep(experiments: list[str | Experiment], args: argparse.Namespace, parser: argparse.ArgumentParser, run_all: bool = False) -> str | None:
    """Run ``experiments`` as ``args`` (parsed by ``parser``) say; the run directory (``None``:
    nothing left to run). ``run_all``: keep adding to one run directory, skip what finished,
    and skip (with a warning) experiments whose data or weights are not available.

    Raises :class:`UserError` (nothing ran), :class:`TrialsFailed` and
    :class:`signals.Interrupted`, both with ``run_dir`` (``None``: nothing was written)."""
    if args.resume:
        args = resumed_args(parser, args)
    return _run(experiments, args, run_all)


def resumed_args(parser: argparse.ArgumentParser, args):
    """The arguments a run directory was started with, so a resume continues the same sweep;
    where Ray runs (--address) may change."""
    run_dir = storage.absolute(args.resume)
    storage.check_writable(run_dir)
    runs = storage.join(run_dir, RUNS_FILE)
    if not storage.is_file(runs):
        raise UserError(f"{run_dir} is not a tltune run directory (no runs.jsonl): pass a directory a sweep printed as 'results: ...'")
    try:
        saved = json.loads(storage.read_text(runs).splitlines()[0])["args"]
    except (json.JSONDecodeError, IndexError, KeyError, TypeError):
        raise UserError(f"{runs} is damaged: cannot tell how the run was started") from None
    defaults = vars(parser.parse_args([]))
    changed = [k for k, v in vars(args).items() if k not in ("resume", "address") and v != defaults.get(k) and v != saved.get(k)]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise UserError(f"--resume continues {run_dir} with the settings it was started with: drop {flags} (only --address may change)")
    merged = {**defaults, **saved, "resume": run_dir, "address": args.address or saved.get("address")}
    return argparse.Namespace(**merged)


def prepare_inputs(chosen: list[Experiment], settings: dict, args, run_dir: str, run_all: bool):
    """Load each dataset once, the ImageNet weights if needed, and check transfer sources, all
    before Ray starts. What is missing is an error; with ``run_all`` its experiments are skipped."""
    from tltune.data import load_dataset, make_splits

    def skip_or_raise(exc: UserError, what: str, dropped) -> list[Experiment]:
        if not run_all:
            raise exc
        print(f"warning: skipping {what}: {exc}", file=sys.stderr)
        return [e for e in chosen if not dropped(e)]

    subset = {
        "train_subset": _given(args.train_subset, QUICK["train_subset"] if args.quick else None),
        "test_subset": _given(args.test_subset, QUICK["test_subset"] if args.quick else None),
    }
    splits = {}
    for dataset in dict.fromkeys(settings[e.name].dataset for e in chosen):
        started = time.time()
        print(f"{dataset}: loading...", flush=True)
        try:
            loaded = load_dataset(dataset, args.data_root)
        except UserError as exc:
            chosen = skip_or_raise(exc, f"the {dataset} experiments", lambda e: settings[e.name].dataset == dataset)
            continue
        s = splits[dataset] = make_splits(loaded, args.val_fraction, args.seed, **subset)
        print(f"{dataset}: {len(s.train)} train / {len(s.val)} val / {len(s.test)} test images, "
              f"{s.image_size}x{s.image_size}x{s.channels}, {s.num_classes} classes ({time.time() - started:.1f}s)")  # fmt: skip
    for experiment in chosen:
        if settings[experiment.name].dataset in splits:
            check_model_input(experiment, settings[experiment.name], splits[settings[experiment.name].dataset])

    def pretrained_alexnet(e: Experiment) -> bool:
        return e.model == "alexnet" and e.mode in PRETRAINED_MODES

    imagenet_state = None
    try:
        imagenet_state = resolve_weights(args, needed=any(pretrained_alexnet(e) for e in chosen))
    except UserError as exc:
        chosen = skip_or_raise(exc, "the pretrained AlexNet experiments", pretrained_alexnet)
    names = {e.name for e in chosen}
    for experiment in [e for e in chosen if e.source and e.source not in names]:
        try:  # fail now, not after hours of other experiments
            best_checkpoint(args.source_run or run_dir, experiment.source)
        except UserError as exc:
            chosen = skip_or_raise(exc, experiment.name, lambda e: e is experiment)
    return chosen, splits, imagenet_state


def _run(experiments: list[str | Experiment], args, run_all: bool = False) -> str | None:
    from tltune.raytune.cluster import check_reachable, cluster_address

    check_args(args)
    address = cluster_address(args.address)
    if address:
        check_reachable(address)
    chosen = choose_experiments(experiments, args.experiments)
    settings = {e.name: experiment_settings(e, args) for e in chosen}
    if args.resume:
        run_dir = args.resume
    else:
        storage.check_writable(args.storage_path)  # first: a bad URI must not hang a later call
        run_dir = run_dir_for(args, chosen, run_all)
    from tltune.data import cache_dir

    with storage.run_lock(run_dir, cache_dir() / "locks"):
        if args.resume or run_all:
            chosen = skip_finished(chosen, run_dir, set_aside=not args.resume)
        if args.resume:  # before anything is unpickled, and before Ray starts
            for experiment in chosen:
                trust.signed_state_files(storage.join(run_dir, experiment.name))
        return _run_locked(chosen, settings, args, run_dir, run_all, address)


def _run_locked(chosen: list[Experiment], settings: dict, args, run_dir: str, run_all: bool, address: str | None) -> str | None:
    try:
        chosen, splits, imagenet_state = prepare_inputs(chosen, settings, args, run_dir, run_all)
        if not chosen:
            print("nothing to run")
            return None
        plan = SweepPlan(
            experiments=chosen,
            settings=settings,
            splits=splits,
            imagenet_state=imagenet_state,
            weights=args.weights or "imagenet",
            run_dir=run_dir,
            record={"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "args": vars(args)},
            source_run=args.source_run,
            address=address,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
        )
        from tltune.raytune import run_sweep  # imports Ray: only once the input is known to be good

        run_sweep(plan)
    except (signals.Interrupted, TrialsFailed) as stop:
        stop.run_dir = run_dir if storage.is_file(storage.join(run_dir, RUNS_FILE)) else None
        raise
    return run_dir


def print_report(run_dir: str) -> None:
    from tltune.results import best_configs_text, load_run, markdown_table, table_rows

    rows = table_rows(load_run(run_dir))
    print("\nBest configuration of each experiment:")
    print(best_configs_text(rows))
    print()
    print(markdown_table(rows))
    if storage.is_uri(run_dir):  # TensorBoard reads cloud storage only with extra packages
        print(f"\nTensorBoard:  copy {run_dir} to a local folder, then tensorboard --logdir FOLDER --host 127.0.0.1")
    else:
        print(f"\nTensorBoard:  tensorboard --logdir {run_dir} --host 127.0.0.1")
    print(f"Table again:  python analysis/best_configs.py {run_dir}")
