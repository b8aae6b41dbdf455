"""Transfer MNIST -> SVHN: train the vanilla CNN on MNIST, then on SVHN fine-tune it, train
only its last Linear, and train the same CNN from scratch as the control.

Both datasets are fed as 3-channel 32x32 images (SVHN's format: MNIST is resized and its gray
channel copied to RGB). SVHN is not bundled offline: --data-root DIR with svhn/{train,test}_32x32.mat.

    python sweeps/mnist_to_svhn.py --quick
    python sweeps/mnist_to_svhn.py --experiments mnist_to_svhn-finetune --source-run results/<earlier run>
"""

import sys

from tltune.cli import main
from tltune.experiments import FAMILIES


if __name__ == "__main__":
    sys.exit(main(FAMILIES["mnist_to_svhn"], __doc__))
