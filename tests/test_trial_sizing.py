"""Trials per GPU counted as Ray packs them (fixed point), not with float floor division, and
the CPU share that follows from it. No Ray needed."""

import pytest

from tltune.raytune.cluster import NodeShape, cpu_share, fits


@pytest.mark.parametrize("fraction, per_gpu", [(0.1, 10), (0.2, 5), (0.25, 4), (1 / 3, 3), (0.5, 2), (1.0, 1)])
def test_trials_per_gpu_are_what_ray_packs(fraction, per_gpu):
    assert fits(1.0, fraction) == per_gpu
    assert NodeShape("g", cpus=16, gpus=1).trials(cpus=1, gpus=fraction) == per_gpu
    assert NodeShape("g", cpus=64, gpus=4, count=2).trials(cpus=1, gpus=fraction) == 8 * per_gpu
    assert 1.0 // fraction == per_gpu or fraction in (0.1, 0.2), "float floor division is one short exactly there"


@pytest.mark.parametrize("fraction, cpus", [(0.1, 1.0), (0.2, 3.0), (0.25, 4.0), (1 / 3, 5.0), (0.5, 8.0), (1.0, 16.0)])
def test_the_cpu_share_follows_the_trials_that_fit(fraction, cpus):
    assert cpu_share(NodeShape("g", cpus=16, gpus=1), fraction, num_samples=50) == cpus


def test_cpus_are_shared_among_no_more_trials_than_there_are():
    assert cpu_share(NodeShape("g", cpus=16, gpus=1), 0.25, num_samples=2) == 8.0
    assert cpu_share(NodeShape("c", cpus=2, gpus=0), 0, num_samples=8) == 1.0
    assert cpu_share(NodeShape("c", cpus=8, gpus=0), 0, num_samples=2) == 4.0
