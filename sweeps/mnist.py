"""MNIST: the vanilla CNN (reference 98% after 5 epochs), AlexNet fine-tuning and feature extraction.

    python sweeps/mnist.py --quick                          # minutes on a laptop CPU
    python sweeps/mnist.py --experiments mnist-cnn          # the full vanilla-CNN sweep, fine on a CPU
    python sweeps/mnist.py                                  # every row at the seed's settings (AlexNet: a GPU job)
"""

import sys

from tltune.cli import main
from tltune.experiments import FAMILIES

if __name__ == "__main__":
    sys.exit(main(FAMILIES["mnist"], __doc__))
