"""tltune: hyperparameter sweeps for transfer-learning experiments on Ray Tune.

    import tltune
    run = tltune.run("cifar10-cnn-search", quick=True)   # or: tltune sweep cifar10 --quick
    tltune.load("results/cifar10-20261127-041500").trials()

The training core (``data``, ``models``, ``train``) is plain PyTorch and imports no Ray;
``raytune`` is the only package that talks to Ray.
"""

from tltune.api import ExperimentRun, Run, experiments, load, run
from tltune.errors import TrialsFailed, UserError
from tltune.experiments import Choice, Experiment, IntRange, LogUniform, Uniform
from tltune.options import SweepOptions

__all__ = ["run", "load", "SweepOptions", "experiments", "Run", "ExperimentRun", "Experiment", "Choice", "LogUniform", "Uniform", "IntRange", "UserError", "TrialsFailed"]
