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


# -- a GPU that CUDA cannot use: fail at once, never train on a CPU core while holding it ---------


@pytest.mark.parametrize(
    "arches, capability, runs",
    [
        (["sm_80", "sm_86", "sm_90"], (8, 9), True),  # Ada runs Ampere's sm_86 binary
        (["sm_80", "sm_90", "sm_100", "sm_120"], (7, 0), False),  # a V100 with a wheel that dropped Volta
        (["sm_75", "compute_75"], (8, 0), True),  # PTX compiles for later GPUs
        (["sm_90a", "sm_100"], (9, 0), False),
        (["sm_120"], (12, 0), True),
    ],
)
def test_which_builds_run_on_which_gpus(arches, capability, runs):
    from tltune.train import runs_on

    assert runs_on(arches, *capability) is runs


@pytest.fixture
def holding_a_gpu(monkeypatch):
    import torch

    import tltune.raytune.trainable as trainable

    monkeypatch.setattr(trainable.ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TLTUNE_LOGICAL_GPUS", raising=False)
    return trainable


def test_a_trial_holding_a_gpu_cuda_cannot_use_fails_at_once(holding_a_gpu, monkeypatch):
    with pytest.raises(RuntimeError, match=r"this trial holds GPU 0 but torch .* cannot use it: no NVIDIA driver.*install a driver"):
        holding_a_gpu.trial_device()
    monkeypatch.setenv("TLTUNE_LOGICAL_GPUS", "1")  # a test cluster's logical GPUs
    assert holding_a_gpu.trial_device().type == "cpu"


def test_the_same_check_before_ray_where_this_machine_has_gpus(holding_a_gpu, monkeypatch):
    import tltune.plan as plan
    from tltune.errors import UserError
    from tltune.options import parse

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(plan, "has_nvidia_gpu", lambda: True)
    with pytest.raises(UserError, match=r"this machine has NVIDIA GPUs but torch .* cannot use it.*--gpus-per-trial 0"):
        plan.check_device_options(parse([]))
    plan.check_device_options(parse(["--gpus-per-trial", "0"]))  # trials on the CPUs: fine
    monkeypatch.setattr(plan, "has_nvidia_gpu", lambda: False)
    plan.check_device_options(parse([]))  # no GPU here at all: nothing to hold


# -- a stopped sweep: the trial workers' shutdown is not printed, a caller's Ray gets it back ---


def test_worker_output_is_muted_on_a_stop_and_given_back():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from tltune.raytune import cluster

    printed = []
    dispatcher.add_handler("ray_print_logs", printed.append)
    try:
        cluster.mute_worker_output()
        dispatcher.emit({"lines": ["Traceback (most recent call last):"]})
        assert printed == []
        cluster.unmute_worker_output()
        dispatcher.emit({"lines": ["epoch 1"]})
        assert printed == [{"lines": ["epoch 1"]}]
        assert [name for name, _ in dispatcher.handlers].count("ray_print_logs") == 1
    finally:
        dispatcher.remove_handler("ray_print_logs")


# What a finished trial's worker printed when Ray's SIGTERM caught it in a weakref callback, in
# the middle of a running sweep (the slow suite's fault chain, on a busy machine).
TEARDOWN = [
    "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f04ef042520>",
    "Traceback (most recent call last):",
    '  File "/root/.pyenv/versions/3.11.7/lib/python3.11/_weakrefset.py", line 39, in _remove',
    "    def _remove(item, selfref=ref(self)):",
    "",
    '  File "/work/main/.venv/lib/python3.11/site-packages/ray/_private/worker.py", line 1063, in sigterm_handler',
    "    raise_sys_exit_with_custom_error_message(",
    '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit_with_custom_error_message',
    "SystemExit: 1",
]


def test_a_finished_workers_sigterm_traceback_is_not_printed_and_the_rest_is():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from tltune.raytune import cluster

    error = ["Exception ignored in: <function f at 0x1>", "Traceback (most recent call last):", '  File "x.py", line 1, in f', "ValueError: bad"]
    assert cluster.without_teardown_tracebacks(["epoch 1", *TEARDOWN, "epoch 2"]) == ["epoch 1", "epoch 2"]
    assert cluster.without_teardown_tracebacks(error) == error, "any other exception is shown"
    assert cluster.without_teardown_tracebacks(TEARDOWN[:4]) == TEARDOWN[:4], "a block cut before its end is shown"
    printed = []
    dispatcher.add_handler("ray_print_logs", printed.append)
    try:
        cluster.hide_teardown_tracebacks()
        dispatcher.emit({"pid": 7, "lines": TEARDOWN})
        dispatcher.emit({"pid": 7, "lines": ["epoch 1", *TEARDOWN]})
        assert printed == [{"pid": 7, "lines": ["epoch 1"]}]
        cluster.mute_worker_output()  # a stop still mutes, and gives the filtered printer back
        cluster.unmute_worker_output()
        assert [name for name, _ in dispatcher.handlers].count("ray_print_logs") == 1
    finally:
        dispatcher.remove_handler("ray_print_logs")
