"""How torch's CPU threads wait in tltune's processes: the command's driver and every trial.

A sweep's processes share cores: trials beside the driver, Ray's daemons, other work. With
libgomp's default a thread out of work spins before it sleeps, and so burns a core another
process's thread is waiting for, at every barrier of a training step: three 2-thread trainings
on 2 cores spent 2.7× the CPU and time (``python bench/omp_wait.py``). So tltune asks for
OMP_WAIT_POLICY=PASSIVE, unless the environment already sets a policy. OpenMP reads it once,
as torch loads it: the command sets it before importing torch, and Tune hands the driver's
value to the trial actors as they start (:func:`tltune.raytune.sweep.tune_environment`).
"""

import os

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def wait_policy() -> str:
    """The environment's policy, else PASSIVE."""
    return os.environ.get(WAIT_POLICY_ENV) or "PASSIVE"


def wait_passively_unless_set() -> None:
    """For this process and those it starts; too late for this one if torch is imported."""
    os.environ[WAIT_POLICY_ENV] = wait_policy()
