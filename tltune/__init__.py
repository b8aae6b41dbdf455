"""tltune: hyperparameter sweeps for transfer-learning experiments on Ray Tune.

The training core (``data``, ``models``, ``train``) is plain PyTorch and imports no Ray;
``raytune`` is the only package that talks to Ray.
"""

from tltune.errors import UserError

__all__ = ["UserError"]
