"""Experiments as data: what to train, the reference settings, and the space searched around them.

Each :class:`Experiment` is one row of the seed exercise's tables. A sweep always evaluates
the reference settings first (so the reproduction is part of every sweep) and then searches
``space``. The space is declared with one hierarchy of plain types (``Choice``,
``LogUniform``, ``Uniform``, ``IntRange``), translated once per target: to Ray Tune domains in
``tltune.raytune.sweep.to_tune_domain``, to Optuna distributions in
``tltune.studies.distribution``, to TensorBoard HParams domains by ``hparams_domain()``.

The built-in experiments are spec files, ``tltune/specs/*.yaml`` (one per family), read by
:mod:`tltune.specs`, which also defines the types above; they are re-exported here. A new
experiment is a few lines of YAML: ``tltune spec cifar10`` prints one to copy.
"""

from __future__ import annotations

from tltune.catalog import MODES
from tltune.errors import UserError
from tltune.specs import (  # noqa: F401  (re-exported: tltune.experiments is where the rest of tltune looks)
    Choice,
    Experiment,
    IntRange,
    LogUniform,
    Uniform,
    builtin_experiments,
    check_settings,
)


def max_epochs(reference: dict, space: dict) -> int:
    """The most epochs a trial of ``reference`` and ``space`` can train."""
    epochs = space.get("epochs")
    return max(reference["epochs"], epochs.high if isinstance(epochs, IntRange) else 0)


# Every built-in experiment by name, in file order; and what ``tltune sweep FAMILY`` and each
# ``sweeps/FAMILY.py`` run, in order ("all": the seed's rows, every family but cifar10_plus).
EXPERIMENTS, FAMILIES = builtin_experiments()

CNN_SEARCH_SPACE = EXPERIMENTS["cifar10-cnn-search"].space  # the seed's CNN search, as tests compare with

# What the seed never states, what tltune chose, and why (the report and docs/RESULTS.md show it)
ASSUMPTIONS = [
    ("the 53% small CNN of the CIFAR-10 search", "the vanilla CNN of the MNIST/SVHN rows: two 3x3 conv blocks (32, 64 channels, max-pool) and a hidden Linear of 128",
     "the seed names only the searched optimizer, activation, lr and epochs; one CNN for every row keeps the rows comparable"),
    ("optimizer and activation of the vanilla CNN rows", "Adam, ReLU, lr 1e-3, 5 epochs",
     "the seed gives 5 epochs only; Adam at 1e-3 with ReLU is PyTorch's usual default, and the search tries the others"),
    ("SGD of the AlexNet rows (lr 0.001)", "momentum 0.9, also wherever a search tries SGD", "the transfer-learning tutorial the exercise follows uses SGD with momentum 0.9; plain SGD at 1e-3 barely moves in 5-10 epochs"),
    ("the other optimizers' settings", "PyTorch's defaults: AdamW weight decay 0.01, none for Adam, RMSprop, Adagrad", "the seed names the optimizers only"),
    ("loss", "cross-entropy (label smoothing only where the extended search tries it)", "the usual classification loss; the seed names none"),
    ("batch size", "64", "the seed gives none; 64 is the tutorials' value and fits every model in CPU memory"),
    ("data augmentation", "none", "the seed mentions none; the extended search (issue #12) searches it"),
    ("learning-rate schedule", "none (constant)", "the seed gives one learning rate per row"),
    ("model selection", "10% of the training set held out (seeded), so every model trains on the other 90%; trials compete on their last epoch's validation accuracy; the test set scores only the best and the reference trial, at their last epoch",
     "the seed reports test accuracy; choosing on the test set would overstate it"),
    ("ours, best of the search, with repeats", "mean ± std over the search's own trial (seed 0) and re-trainings with seeds 1, 2; a trial ASHA stopped is re-trained with the same schedule, stopped at the same epoch",
     "the seed-0 trial won a selection on validation accuracy, so its mean leans high by that selection; the re-trained seeds do not"),
    ("AlexNet input", "224x224 (64x64 with --quick); MNIST's gray channel copied to RGB", "torchvision's ImageNet weights expect 3x224x224"),
    ("normalisation", "AlexNet: ImageNet's mean and std; the CNN: each dataset's own per-channel mean and std", "pretrained weights expect the statistics they were trained with; the seed gives none"),
    ("the CNN's input", "each dataset's own size and channels (MNIST 1x28x28, CIFAR-10 and SVHN 3x32x32); MNIST resized to 3x32x32 for the MNIST -> SVHN transfer rows", "the transfer needs one input format on both datasets"),
    ("initial weights", "PyTorch's default initialisation, drawn from the trial's seed (0 for the search, 1, 2 for the repeats); AlexNet rows: ImageNet weights, a new last Linear", "the seed gives none; one seed per trial makes every number reproducible"),
    ("the search", "Optuna TPE (seeded), the reference as its first trial; ASHA over epochs with grace period 2 and reduction factor 3; two trials at a time on this 2-core machine",
     "the exercise searches by hand; TPE and ASHA spend the same time on more promising settings"),
    ("feature extraction", "every layer frozen but the last Linear (AlexNet's Dropouts inactive); the frozen part's output computed once",
     "the seed's definition; computing it once changes the time, not the result"),
    ("the reference trial", "always trained to its full epochs (ASHA never stops it) and tested", "so the seed's settings get a number of ours"),
    ("precision", "--precision auto: bf16 autocast where the hardware has it natively (this CPU: AVX512-BF16; GPUs from Ampere), else fp32 on a CPU and fp16 with loss scaling on a GPU; each trial records what it used", "1.8x the fp32 speed for the small CNN on one thread of this CPU (docs/PERFORMANCE.md), same accuracy; the seed states none"),
    ("the extended search's CNN (cifar10-cnn-search-plus)", "three conv blocks (32, 64, 128 channels times the searched width 1 or 2) with BatchNorm, hidden Linear of 128 times the width",
     "the 75% target within 10 CPU epochs; a third block and BatchNorm are the usual first additions to a small CNN, and the seed's rows keep the vanilla CNN"),
    ("the extended search's reference", "SGD momentum 0.9, lr 0.05 one-cycle, batch 128, weight decay 5e-4, flip + 4-px crop, label smoothing 0.1, width 2, 10 epochs",
     "a known-good CIFAR-10 recipe, so the search starts from a strong point"),
    ("learning-rate schedules", "stepped per batch; one-cycle rises linearly from lr/25 over 30% of the steps, then cosine to 0; cosine runs from lr to 0 over the trial's epochs",
     "torch's OneCycleLR defaults, without momentum cycling; recomputed from the epoch, so a resumed trial continues it exactly"),
]

def validate(experiment: Experiment, declared: dict[str, Experiment] | None = None) -> None:
    """Every name known, every range well-formed; raises UserError otherwise. ``declared``: the
    experiments a source may name (default the built-in ones; a spec file's sweep adds its own).
    Model names are checked against torchvision's registry, and a user factory is imported:
    call this only once torch may load."""
    from tltune.config import TRIAL_CONFIG_KEYS
    from tltune.models import check_factory_keywords, check_model_name, is_factory

    e = experiment
    where = f"{e.spec_file}: experiment {e.name}" if e.spec_file else f"experiment {e.name}"
    declared = EXPERIMENTS if declared is None else declared
    for model in e.models():
        check_model_name(model, where)
    for mode in e.modes():
        if mode not in MODES:
            raise UserError(f"{where}: unknown mode '{mode}' (use {', '.join(MODES)})")
    for name, domain in e.space.items():
        domain.check(f"{e.name}.{name}")
    cnn_only = e.models() == ("cnn",)
    if e.source is not None and (not cnn_only or e.source not in declared or declared[e.source].models() != ("cnn",)):
        raise UserError(f"{where}: source '{e.source}' must be a declared CNN experiment, and {e.name} a CNN")
    if "cnn" in e.models() and set(e.modes()) - {"scratch"} and e.source is None:
        raise UserError(f"{where}: a pretrained CNN needs a source experiment to take its weights from")
    missing = set(e.space) - set(e.reference)
    if missing:
        raise UserError(f"{where}: searched {sorted(missing)} without a reference value: add them to reference")
    keywords = sorted((set(e.reference) | set(e.space)) - TRIAL_CONFIG_KEYS)
    if keywords and not any(is_factory(m) for m in e.models()):
        raise UserError(f"{where}: {', '.join(keywords)} is no hyperparameter tltune knows, and only a user factory "
                        "('package.module:function') takes keyword arguments")  # fmt: skip
    for model in e.models():
        if is_factory(model):
            check_factory_keywords(model, keywords, where)
    check_settings({k: v for k, v in e.reference.items() if k not in ("model", "mode")}, where=where)
    for name, domain in e.space.items():
        if isinstance(domain, Choice) and name not in ("model", "mode"):
            for option in domain.options:
                check_settings({name: option}, where=f"{where} search space")


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment '{name}': use one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]
