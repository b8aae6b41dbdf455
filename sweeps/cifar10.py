"""CIFAR-10: AlexNet fine-tuning vs feature extraction, and the small-CNN hyperparameter search.

    python sweeps/cifar10.py --quick              # minutes on a laptop CPU
    python sweeps/cifar10.py                      # the seed's full settings (a GPU job)
"""

import sys

from tltune.cli import main
from tltune.experiments import FAMILIES


if __name__ == "__main__":
    sys.exit(main(FAMILIES["cifar10"], __doc__))
