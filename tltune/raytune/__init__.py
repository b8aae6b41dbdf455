"""The only code that imports Ray.

- ``address``: which cluster to join and whether it answers (imports no Ray).
- ``cluster``: start a local Ray on the loopback interface or join a cluster; size trials.
- ``trainable``: the trial (one configuration, a report per epoch) and its Ray tasks.
- ``callbacks``: TensorBoard event files and progress lines, written by the driver.
- ``sweep``: Optuna + ASHA Tuners, restore, and :func:`run_sweep`, which the planning core calls.

Importing this package imports none of them: ``tltune.plan`` checks an address through
``address`` before anything heavy is loaded.
"""

__all__ = ["run_sweep"]


def __getattr__(name: str):
    if name == "run_sweep":
        from tltune.raytune.sweep import run_sweep

        return run_sweep
    raise AttributeError(name)
