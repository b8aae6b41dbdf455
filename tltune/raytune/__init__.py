"""The only code that imports Ray.

- ``cluster``: start a local Ray on the loopback interface or join a cluster; size trials.
- ``trainable``: the trial (one configuration, a report per epoch) and its Ray tasks.
- ``callbacks``: TensorBoard event files and progress lines, written by the driver.
- ``sweep``: Optuna + ASHA Tuners, restore, and :func:`run_sweep`, which the CLI calls.
"""

from tltune.raytune.sweep import run_sweep

__all__ = ["run_sweep"]
