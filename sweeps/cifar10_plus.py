"""CIFAR-10 beyond the seed: the CNN with a third conv block and BatchNorm, searching what
practitioners tune besides optimizer, activation, lr and epochs: batch size, weight decay,
flip/crop augmentation, width, label smoothing and the learning-rate schedule, within 10 epochs.
Its first trial is a known-good recipe (SGD + one-cycle, flip+crop, width 2). Target: 75% test
accuracy in a sweep of 90 minutes on a 2-core CPU.

    python sweeps/cifar10_plus.py --quick         # minutes on a laptop CPU
    python sweeps/cifar10_plus.py                 # the full search (about 90 minutes on 2 CPU cores)
"""

import sys

from tltune.cli import main
from tltune.experiments import FAMILIES


if __name__ == "__main__":
    sys.exit(main(FAMILIES["cifar10_plus"], __doc__))
