"""MNIST: the vanilla CNN (reference 98% after 5 epochs), AlexNet fine-tuning and feature extraction.

    python sweeps/mnist.py --quick                          # minutes on a laptop CPU
    python sweeps/mnist.py --experiments mnist-cnn          # the full vanilla-CNN sweep, fine on a CPU
    python sweeps/mnist.py                                  # every row at the seed's settings (AlexNet: a GPU job)
"""

import sys

from tltune.cli import main

if __name__ == "__main__":
    sys.exit(main(["mnist-cnn", "mnist-alexnet-finetune", "mnist-alexnet-feature_extract"], __doc__))
