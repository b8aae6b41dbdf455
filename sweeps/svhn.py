"""SVHN: the vanilla CNN (reference 87% after 5 epochs), AlexNet fine-tuning and feature extraction.

SVHN is not bundled offline: pass --data-root DIR holding svhn/{train,test}_32x32.mat,
or let torchvision download it.

    python sweeps/svhn.py --quick
    python sweeps/svhn.py
"""

import sys

from tltune.cli import main
from tltune.experiments import FAMILIES

if __name__ == "__main__":
    sys.exit(main(FAMILIES["svhn"], __doc__))
