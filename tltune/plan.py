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

from tltune import console, signals, storage, trust
from tltune.catalog import LOGICAL_GPUS_ENV, PRETRAINED_MODES, looks_like_path
from tltune.config import model_shape_keys
from tltune.errors import StorageFull, TrialsFailed, UserError, is_storage_full
from tltune.experiments import EXPERIMENTS, Experiment, IntRange, LogUniform, get_experiment, max_epochs, validate
from tltune.options import DEFAULT_BATCH_SIZE, DEFAULT_GRACE_PERIOD, DEFAULT_REPEATS, QUICK, SweepOptions, flag
from tltune.records import ExperimentSummary, RunRecord, TimeRecord, is_number
from tltune.results import RUNS_FILE, SUMMARY_FILE, best_checkpoint, top_configs
from tltune.settings import ExperimentSettings, SweepPlan
from tltune.specs import duration_text, parse_duration
from tltune.trackers import check_trackers


def choose_experiments(experiments: list[str | Experiment], only: tuple[str, ...] | None) -> list[Experiment]:
    chosen = [e if isinstance(e, Experiment) else get_experiment(e) for e in experiments]
    if only:
        unknown = [n for n in only if n not in {e.name for e in chosen}]
        if unknown:
            raise UserError(f"unknown experiment(s) {', '.join(unknown)} here: use {', '.join(e.name for e in chosen)}")
        chosen = [e for e in chosen if e.name in only]
    make_factories_importable(chosen)
    declared = {**EXPERIMENTS, **{e.name: e for e in chosen}}  # a spec's transfer may name an experiment of its own file
    for experiment in chosen:
        validate(experiment, declared)
    return chosen


def check_cache_dir(folder: Path) -> None:
    """The cache (decoded datasets, backbone features, run locks) must be a writable folder."""
    try:
        (folder / "locks").mkdir(parents=True, exist_ok=True)
        probe = folder / "locks" / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"the cache folder {folder} is not writable ({exc.strerror or exc}): set TLTUNE_CACHE_DIR to a writable folder") from None


def make_factories_importable(chosen: list[Experiment]) -> None:
    """A user factory's module is looked up as Python would from where the user stands: the
    current directory, then the folder of the spec file naming it (as ``python -m`` would,
    which the ``tltune`` script alone does not). In a process that swept before (a notebook,
    ``tltune.run`` twice), the module is looked up again, as the trials' fresh workers will:
    an edited file, or another spec's ``model.py``, is not answered by the one imported then."""
    factories = [m for e in chosen for m in e.models() if ":" in m]
    if not factories:
        return
    folders = [os.getcwd(), *(str(Path(e.spec_file).resolve().parent) for e in chosen if e.spec_file)]
    for folder in reversed(dict.fromkeys(folders)):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    for top in dict.fromkeys(m.split(":")[0].split(".")[0] for m in factories):
        if is_local_code(sys.modules.get(top)):
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                del sys.modules[name]


def is_local_code(module) -> bool:
    """Whether ``module`` is the user's own code, not an installed package's (site-packages)."""
    file = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or ()), None)
    return file is not None and not {"site-packages", "dist-packages"} & set(Path(file).parts)


def factory_modules(chosen: list[Experiment]) -> tuple[str, ...]:
    """The local code of the experiments' model factories, for Ray to ship to every node: the
    folder of each factory's top-level package (or its ``.py`` file), unless it is installed
    (site-packages: the nodes' environment is expected to have it too)."""
    import importlib

    paths = []
    for model in dict.fromkeys(m for e in chosen for m in e.models() if ":" in m):
        top = importlib.import_module(model.split(":")[0].split(".")[0])  # imported already by the model check
        file = getattr(top, "__file__", None)
        if file is not None:
            path = Path(file).parent if Path(file).name == "__init__.py" else Path(file)
        elif getattr(top, "__path__", None):  # a namespace package
            path = Path(list(top.__path__)[0])
        else:
            continue
        if is_local_code(top):
            paths.append(str(path))
    return tuple(dict.fromkeys(paths))


def _given(value, default):
    """The user's value if they gave one (0 included), else the default."""
    return default if value is None else value


def experiment_settings(experiment: Experiment, options: SweepOptions) -> ExperimentSettings:
    """The reference and search space of one experiment after the user's options and presets:
    a flag wins over --quick's presets, which win over the experiment's own values."""
    from tltune.models import model_kind

    o = options
    reference = dict(experiment.reference)
    space = dict(experiment.space)
    if o.lr_range:
        space["lr"] = LogUniform(*o.lr_range)
    if o.epochs_range:
        space["epochs"] = IntRange(*o.epochs_range)
    for key in ("optimizer", "activation", "lr", "epochs", "batch_size"):
        value = getattr(o, key)
        if value is not None and (key != "activation" or "cnn" in experiment.models()):
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
    # --quick feeds ImageNet models (AlexNet and torchvision's) small images, unless the
    # experiment also builds a model that takes the dataset's own size.
    imagenet_models = all(model_kind(m) in ("alexnet", "torchvision") for m in experiment.models())
    quick_size = QUICK["alexnet_image_size"] if o.quick and imagenet_models else None
    return ExperimentSettings(
        dataset=o.dataset or experiment.dataset,
        reference=reference,
        space=space,
        num_samples=num_samples,
        max_epochs=max_epochs(reference, space),
        batch_size=_given(o.batch_size, _given(experiment.batch_size, DEFAULT_BATCH_SIZE)),
        seed=o.seed,
        image_size=_given(o.image_size, experiment.input.get("image_size", quick_size)),
        channels=experiment.input.get("channels"),
        cached_features="feature_extract" in experiment.modes() and backbone_output_is_fixed(reference, space) and not o.no_feature_cache,
        grace_period=_given(o.grace_period, QUICK["grace_period"] if o.quick else _given(experiment.grace_period, DEFAULT_GRACE_PERIOD)),
        max_concurrent_trials=o.max_concurrent_trials,
        warm_start=warm_start_points(o.warm_start, experiment.name, space) if o.warm_start else (),
        repeats=_given(o.repeats, QUICK["repeats"] if o.quick else _given(experiment.repeats, DEFAULT_REPEATS)),
        log_to=o.log_to or (),
        time_budget_s=parse_duration(o.time_budget or experiment.time_budget, "--time-budget") if o.time_budget or experiment.time_budget else None,
        quiet=o.quiet,
        checkpoint_every=o.checkpoint_every,
    )


def warm_start_points(run_dir: str, experiment: str, space: dict) -> tuple[dict, ...]:
    """The best configurations of ``experiment`` in ``run_dir`` that can start this search:
    one whose searched values are missing, of the wrong type or outside the space (a damaged
    or edited params.json, a narrowed space) is skipped with a warning."""
    usable = []
    for config in top_configs(run_dir, experiment):
        problem = next((f"its {k} {config.get(k)!r} is not in the space searched" for k, domain in space.items() if not _contains(domain, config.get(k))), None)
        if problem:
            print(f"warning: --warm-start: skipping a configuration of {experiment} in {run_dir}: {problem}", file=sys.stderr)
            continue
        usable.append(config)
    return tuple(usable)


def _contains(domain, value) -> bool:
    if value is None or isinstance(value, (dict, list)):
        return False
    try:
        return bool(domain.contains(value))
    except TypeError:  # a string where a number belongs
        return False


def backbone_output_is_fixed(reference: dict, space: dict) -> bool:
    """Whether a frozen backbone gives every trial the same output per image, so that it can be
    computed once: not if the network's shape is searched, or the images are augmented."""
    augmented = "augmentation" in space or reference.get("augmentation", "none") != "none"
    return not augmented and not model_shape_keys(space)


def check_device_options(options: SweepOptions) -> None:
    """--precision and --compile against the device the trials will run on. A joined cluster
    (--address) may have GPUs this machine lacks: then only what the options say is checked."""
    import torch

    from tltune.train import bf16_problem, cpu_has_bf16, cuda_problem

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
            if problem := bf16_problem(index):
                raise UserError(problem)
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


def where(experiment: Experiment) -> str:
    """How errors name an experiment: with the spec file that declared it, if any."""
    return f"{experiment.spec_file}: experiment {experiment.name}" if experiment.spec_file else experiment.name


def check_model_input(experiment: Experiment, settings: ExperimentSettings, splits) -> None:
    """Build each of the experiment's models as its reference trial would (a user factory is
    imported and called here, once) and run two real images through it: an input too small
    for a model, a factory that fails or gives the wrong output fail here, not in every trial."""
    import numpy as np
    import torch

    from tltune.data import as_tensors
    from tltune.models import is_factory
    from tltune.train import setup_image_model

    images, _ = as_tensors(splits.train.subset(np.arange(min(2, len(splits.train)))))
    for model_name in experiment.models():
        what = f"the model factory {model_name}" if is_factory(model_name) else f"the {model_name} model"
        try:
            model, transform = setup_image_model(settings.reference_model_spec(model_name), experiment.mode, splits, None)
            with torch.no_grad():
                output = model.eval()(transform(images))
        except UserError as exc:
            raise UserError(f"{where(experiment)}: {exc}") from None
        except Exception as exc:  # noqa: BLE001  a user's model may raise anything
            size = settings.image_size or splits.image_size
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            too_big = isinstance(exc, torch.OutOfMemoryError) or any(w in first.lower() for w in ("out of memory", "can't allocate", "cannot allocate"))
            hint = ": pass a smaller --image-size (image_size in a spec)" if too_big else \
                "" if is_factory(model_name) else ": pass a larger --image-size (image_size in a spec)"  # fmt: skip
            raise UserError(f"{where(experiment)}: a {size}x{size} input does not fit {what} ({type(exc).__name__}: {first}){hint}") from None
        expected = (len(images), splits.num_classes)
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise UserError(f"{where(experiment)}: {what} gives outputs of shape {got} for {len(images)} images, expected {expected}")


def weights_source(experiment: Experiment, model: str, options: SweepOptions) -> str:
    """Where ``model`` of ``experiment`` starts in a pretrained mode: --weights, else the spec's
    ``weights``, else each model's ImageNet weights (a mapping names models one by one)."""
    given = parse_weights(options.weights) if options.weights is not None else experiment.weights
    if isinstance(given, dict):
        return given.get(model, "imagenet")
    return given or "imagenet"


def parse_weights(value: str) -> str | dict:
    """``--weights``: 'imagenet', 'none', a torchvision weights name, a file, or
    'model=SOURCE,model=SOURCE' naming one per model."""
    if "=" in value and not Path(value).expanduser().exists():
        pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
        return {model.strip(): source.strip() for model, source in pairs}
    return value


def pretrained_weights(experiment: Experiment, options: SweepOptions) -> dict[str, str]:
    """model -> where its pretrained weights come from, for each of the experiment's models that
    starts from weights tltune loads: AlexNet and torchvision models (ImageNet by default), a
    user factory given a weights file (else it loads its own, or starts random). None for the
    CNN: a transfer source gives its weights."""
    from tltune.models import model_kind

    if not set(experiment.modes()) & set(PRETRAINED_MODES):
        return {}
    weights = {}
    for model in experiment.models():
        kind, source = model_kind(model), weights_source(experiment, model, options)
        if kind == "cnn" or source == "none" or (kind == "factory" and source == "imagenet"):
            continue
        weights[model] = source
    return weights


def load_weights(chosen: list[Experiment], options: SweepOptions, run_all: bool, skipped: dict):
    """Each pretrained model's weights, read once before Ray: (experiments still to run,
    experiment -> model -> source, (model, source) -> state dict). Weights that cannot be had
    are an error; with --quick and no weights given anywhere, or with ``run_all``, their
    experiments are skipped (named in ``skipped``, with why)."""
    from tltune.models import load_pretrained_state

    weights, states, kept = {}, {}, []
    for experiment in chosen:
        wanted = pretrained_weights(experiment, options)
        try:
            for model, source in wanted.items():
                if (model, source) not in states:
                    states[model, source] = load_pretrained_state(model, source)
        except UserError as exc:
            if options.quick and options.weights is None and experiment.weights is None:
                # Training a randomly initialised AlexNet says nothing about transfer learning
                # and would take most of a quick run: leave such rows out, and say so.
                print(f"warning: {exc}\nwarning: --quick skips {experiment.name}: without pretrained weights it would "
                      "measure nothing. Pass --weights FILE (or --weights none to train from random weights anyway).", file=sys.stderr)  # fmt: skip
                skipped[experiment.name] = "--quick without pretrained weights: pass --weights FILE"
                continue
            if not run_all:
                raise UserError(f"{where(experiment)}: {exc}") from None
            print(f"warning: skipping {experiment.name}: {exc}", file=sys.stderr)
            skipped[experiment.name] = str(exc)
            continue
        weights[experiment.name] = wanted
        kept.append(experiment)
    return kept, weights, states


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


def skip_finished(chosen: list[Experiment], run_dir: str, set_aside: bool, settings: dict[str, ExperimentSettings]) -> list[Experiment]:
    """Experiments of ``run_dir`` that finished are skipped; an interrupted one is resumed, or
    with ``set_aside`` renamed (never deleted) and run again. One whose search its time budget
    ended goes on where a larger budget is given (``settings``), else it is skipped too."""
    remaining = []
    for experiment in chosen:
        exp_dir = storage.join(run_dir, experiment.name)
        summary_path = storage.join(exp_dir, SUMMARY_FILE)
        if storage.is_file(summary_path):
            budget = budget_that_ended(summary_path)
            given = settings[experiment.name].time_budget_s
            if budget is None:
                print(f"{experiment.name}: finished in {exp_dir}, skipped")
            elif given is not None and given > budget["seconds"]:
                reopen_budget_ended(exp_dir, budget)
                print(f"{experiment.name}: its time budget of {duration_text(budget['seconds'])} ended the search; "
                      f"going on to {duration_text(given)}")  # fmt: skip
                remaining.append(experiment)
            else:
                print(f"{experiment.name}: its time budget of {duration_text(budget['seconds'])} ended the search in {exp_dir}: "
                      "skipped (pass a larger --time-budget to go on)")  # fmt: skip
            continue
        if storage.exists(exp_dir) and set_aside:
            aside = f"{exp_dir}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"
            storage.move(exp_dir, aside)
            print(f"{experiment.name}: unfinished results moved to {aside}; running it again")
        remaining.append(experiment)
    return remaining


def budget_that_ended(summary_path: str) -> dict | None:
    """The time budget recorded in a finished experiment's summary, if it ended its search."""
    try:
        summary = ExperimentSummary.from_dict(json.loads(storage.read_text(summary_path)), summary_path)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    budget = summary.time_budget
    if isinstance(budget, dict) and budget.get("ended_search") and is_number(budget.get("seconds")):
        return budget
    return None


def reopen_budget_ended(exp_dir: str, budget: dict) -> None:
    """Make an experiment whose time budget ended its search resumable again: its summary set
    aside (kept, renamed), the search time it spent and the trials the budget stopped carried
    over, and Tune's search generator told it is not finished (it marked itself finished when
    the searcher stopped suggesting), re-signed as tltune signs Tune's state."""
    from ray import cloudpickle  # what Tune pickles its search generator's state with

    trust.signed_state_files(exp_dir)  # checked before anything of Tune's is unpickled
    aside = storage.join(exp_dir, f"{SUMMARY_FILE.removesuffix('.json')}.budget-{int(budget['seconds'])}s.json")
    storage.move(storage.join(exp_dir, SUMMARY_FILE), aside)
    stopped = [t for t in budget.get("stopped_trials") or [] if isinstance(t, str)]
    spent = budget["search_s"] if is_number(budget.get("search_s")) else budget["seconds"]
    storage.write_text(storage.join(exp_dir, TimeRecord.FILE), TimeRecord(spent_s=spent, budget_stopped_trials=stopped).to_json())
    for name in storage.list_dir(exp_dir):
        if name.startswith("search_gen_state-") and name.endswith(".json"):
            path = storage.join(exp_dir, name)
            state = cloudpickle.loads(storage.read_bytes(path))
            state["finished"] = False
            data = cloudpickle.dumps(state)
            trust.sign(exp_dir, {name: data})
            storage.write_bytes(path, data)


def with_absolute_paths(options: SweepOptions) -> SweepOptions:
    """``options`` with each local path absolute, as a run records them, so that a resume from
    another folder finds the same data root (``./data`` or ``$TLTUNE_DATA_ROOT`` included),
    dataset folder, weights file and runs."""
    from tltune.data import resolve_data_root

    def local_file(value: str | None) -> str | None:  # a path; names (imagenet, mnist, a folder under the data root) stay
        if not value:
            return value
        path = Path(value).expanduser()
        is_path = looks_like_path(value) or path.is_file()
        return str(path.resolve()) if is_path and path.exists() else value

    return replace(
        options,
        data_root=str(resolve_data_root(options.data_root)),
        dataset=local_file(options.dataset),
        weights=local_file(options.weights),
        source_run=storage.absolute(options.source_run) if options.source_run else None,
        warm_start=storage.absolute(options.warm_start) if options.warm_start else None,
        storage_path=storage.absolute(options.storage_path),
    )


def first_run_record(run_dir: str) -> tuple[RunRecord, bool]:
    """How ``run_dir`` was started (the first line of its runs.jsonl), and whether that line is
    signed (False: a run from before lines were signed). UserError for no run, a damaged line,
    or a signature that does not match (a record someone else wrote or edited)."""
    runs = storage.join(run_dir, RUNS_FILE)
    if not storage.is_file(runs):
        raise UserError(f"{run_dir} is not a tltune run directory (no runs.jsonl): pass a directory a sweep printed as 'results: ...'")
    try:
        first = json.loads(storage.read_text(runs).splitlines()[0])
        record = RunRecord.from_dict(first, runs)
    except (ValueError, IndexError, AttributeError):
        record = None
    if record is None or record.saved_options() is None:
        raise UserError(f"{runs} is damaged: cannot tell how the run was started")
    return record, trust.check_record(first, runs)


def resumed_options(options: SweepOptions) -> SweepOptions:
    """The options a run directory was started with (read back through SweepOptions, so they
    are checked like fresh ones), so a resume continues the same sweep; where Ray runs
    (--address) may change."""
    run_dir = storage.absolute(options.resume)
    storage.check_writable(run_dir)
    record, signed = first_run_record(run_dir)
    runs, saved = storage.join(run_dir, RUNS_FILE), record.saved_options()
    try:
        started = SweepOptions.from_record(saved)
    except UserError as exc:
        raise UserError(f"{runs}: its recorded options are not valid ({exc})") from None
    if not signed:  # a run from before records were signed: its settings are followed, and said
        pointing = {flag(k): saved.get(k) for k in ("address", "data_root", "weights", "source_run", "warm_start") if saved.get(k)}
        print(f"warning: {runs} was written before tltune signed it: resuming with its recorded settings, checked like flags"
              + "".join(f"; {name} {value}" for name, value in pointing.items()), file=sys.stderr)  # fmt: skip
    if options.time_budget and started.time_budget and parse_duration(options.time_budget, "--time-budget") <= parse_duration(started.time_budget, "--time-budget"):
        raise UserError(f"--resume with --time-budget {options.time_budget}: the run had {started.time_budget} already; pass a larger one to go on")
    given, recorded = with_absolute_paths(options), with_absolute_paths(started)  # --data-root data is the run's /home/me/data
    changed = [k for k in options.changed() if k not in RESUME_MAY_CHANGE and getattr(given, k) != getattr(recorded, k)]
    if changed:
        raise UserError(f"--resume continues {run_dir} with the settings it was started with: drop {', '.join(map(flag, changed))} "
                        f"(only {', '.join(map(flag, RESUME_MAY_CHANGE[1:]))} may change)")  # fmt: skip
    return replace(started, resume=run_dir, address=options.address or started.address, quiet=options.quiet,
                   log_to=options.log_to if options.log_to is not None else started.log_to,
                   time_budget=options.time_budget or started.time_budget,
                   checkpoint_every=options.checkpoint_every or started.checkpoint_every)  # fmt: skip


# Where and how a resumed run goes on may change, and its time budget may grow (skip_finished
# reopens what the budget ended); what it computes may not.
RESUME_MAY_CHANGE = ("resume", "address", "quiet", "log_to", "time_budget", "checkpoint_every")


@dataclass
class SweepOutcome:
    run_dir: str | None  # None: nothing was left to run
    skipped: dict[str, str] = field(default_factory=dict)  # experiment -> why it was not run


def prepare_inputs(chosen: list[Experiment], settings: dict, options: SweepOptions, run_dir: str, run_all: bool, skipped: dict):
    """Load each dataset once, the pretrained weights if needed, and check transfer sources, all
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

    chosen, weights, states = load_weights(chosen, o, run_all, skipped)
    names = {e.name for e in chosen}
    for experiment in [e for e in chosen if e.source and e.source not in names]:
        try:  # fail now, not after hours of other experiments
            best_checkpoint(o.source_run or run_dir, experiment.source)
        except UserError as exc:
            chosen = skip_or_raise(exc, experiment.name, lambda e: e is experiment)
    return chosen, splits, weights, states


def sweep(experiments: list[str | Experiment], options: SweepOptions, run_all: bool = False, argv: list[str] | None = None) -> SweepOutcome:
    """Run ``experiments`` as ``options`` say; the run directory (``None``: nothing left to
    run) and the experiments left out. ``run_all``: keep adding to one run directory, skip what finished, and skip (with a
    warning) experiments whose data or weights are not available. ``argv``: the command line,
    recorded in runs.jsonl.

    Raises :class:`UserError` (nothing ran), :class:`TrialsFailed` and
    :class:`signals.Interrupted`, both with ``run_dir`` (``None``: nothing was written)."""
    options = resumed_options(options) if options.resume else with_absolute_paths(options)
    with console.quiet(options.quiet):
        return _sweep(experiments, options, run_all, argv)


def _sweep(experiments, options: SweepOptions, run_all: bool, argv) -> SweepOutcome:
    chosen = choose_experiments(experiments, options.experiments)
    check_device_options(options)
    check_trackers(options.log_to)
    from tltune.raytune.address import check_reachable, cluster_address

    address = cluster_address(options.address)
    if address:
        check_reachable(address)
    settings = {e.name: experiment_settings(e, options) for e in chosen}
    targets = sweep_targets(chosen, run_all)
    if options.resume:
        run_dir = options.resume
    else:
        storage.check_writable(options.storage_path)  # first: a bad URI must not hang a later call
        run_dir = new_run_dir(options, chosen, run_all)
    from tltune.data import cache_dir

    trust.check_key_file()  # a key that cannot be used is one line now, not after Ray started
    check_cache_dir(cache_dir())
    with storage.run_lock(run_dir, cache_dir() / "locks"):
        if options.resume or run_all:
            chosen = skip_finished(chosen, run_dir, set_aside=not options.resume, settings=settings)
        if options.resume:  # before anything is unpickled, and before Ray starts
            for experiment in chosen:
                trust.signed_state_files(storage.join(run_dir, experiment.name))
        return _run_locked(chosen, settings, options, run_dir, run_all, address, argv, targets)


def sweep_targets(chosen: list[Experiment], run_all: bool) -> list[str] | None:
    """What a run sweeps, as ``tltune sweep`` takes it: ``["all"]``, else each built-in
    experiment's name and each spec file's absolute path; None where an experiment was made in
    Python (nothing names it)."""
    if run_all:
        return ["all"]
    targets: list[str] = []
    for experiment in chosen:
        if experiment.spec_file is not None:
            target = str(Path(experiment.spec_file).resolve())
        elif EXPERIMENTS.get(experiment.name) == experiment:
            target = experiment.name
        else:
            return None
        if target not in targets:
            targets.append(target)
    return targets


def recorded_targets(run_dir: str) -> list[str]:
    """What ``run_dir`` swept (:func:`sweep_targets`), read from its signed first record, for
    ``tltune sweep --resume RUN`` without a family, experiment or spec file."""
    run_dir = storage.absolute(run_dir)
    record, signed = first_run_record(run_dir)
    targets = record.targets  # a spec file's path leads to code (its factories): followed only from a signed record
    if not signed or not targets or not all(isinstance(t, str) for t in targets):
        raise UserError(f"{run_dir} does not record what it swept (experiments made in Python, or a run from an older tltune): "
                        f"name it again, tltune sweep FAMILY|EXPERIMENT|SPEC.yaml --resume {run_dir}")  # fmt: skip
    for target in targets:
        if target.startswith("/") and not Path(target).is_file():
            raise UserError(f"{run_dir} swept the spec file {target}, which is not there any more: put it back, "
                            f"or name the file it moved to, tltune sweep SPEC.yaml --resume {run_dir}")  # fmt: skip
    return targets


def _run_locked(chosen, settings, options: SweepOptions, run_dir: str, run_all: bool, address: str | None, argv,
                targets: list[str] | None = None) -> SweepOutcome:  # fmt: skip
    outcome = SweepOutcome(run_dir)
    try:
        try:
            chosen, splits, weights, states = prepare_inputs(chosen, settings, options, run_dir, run_all, outcome.skipped)
        except UserError:
            signals.raise_if_stopped()  # the error may be a stop signal's, replaced by C code (see tltune.signals)
            raise
        if not chosen:
            print("nothing to run")
            ran_before = storage.is_file(storage.join(run_dir, RUNS_FILE))  # its finished experiments' table is printed
            return SweepOutcome(run_dir if ran_before else None, outcome.skipped)
        signals.raise_if_stopped()
        plan = SweepPlan(
            experiments=chosen,
            settings=settings,
            splits=splits,
            weights=weights,
            pretrained_states=states,
            run_dir=run_dir,
            record=RunRecord(started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=list(argv if argv is not None else sys.argv), options=options.record(),
                             targets=targets),  # fmt: skip
            source_run=options.source_run,
            address=address,
            cpus_per_trial=options.cpus_per_trial,
            gpus_per_trial=options.gpus_per_trial,
            py_modules=factory_modules(chosen),
        )
        from tltune.raytune.sweep import run_sweep  # imports Ray: only once the input is known to be good

        run_sweep(plan)
    except (signals.Interrupted, TrialsFailed, StorageFull) as stop:
        stop.run_dir = run_dir if storage.is_file(storage.join(run_dir, RUNS_FILE)) else None
        raise
    except OSError as exc:  # a full disk outside a Tune experiment (a record, a test score): files are replaced whole
        if not is_storage_full(exc):
            raise
        if not storage.is_file(storage.join(run_dir, RUNS_FILE)):
            raise UserError(f"no space left where the run would be stored ({run_dir}): nothing ran; free some space and start again") from None
        full = StorageFull.at(run_dir)
        full.run_dir = run_dir
        raise full from None
    return outcome

