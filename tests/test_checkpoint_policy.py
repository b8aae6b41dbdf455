"""When a trial saves its checkpoint (issue 21 item 6): always where a trial may end (its last
epoch, ASHA's rungs, after the time budget), in between every N epochs or while a save costs
at most a tenth of the training since the last one."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import ASHAScheduler

import tltune.raytune.trainable as trainable
from tltune.data import ImageArrays, Splits
from tltune.train import CheckpointPolicy, asha_milestones


@pytest.mark.parametrize("grace_period, max_t", [(1, 1), (1, 3), (1, 9), (1, 10), (2, 10), (1, 27), (3, 20)])
def test_the_milestones_are_the_rungs_of_rays_asha(grace_period, max_t):
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_acc", mode="max", max_t=max_t, grace_period=grace_period, reduction_factor=3)
    rungs = sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs)  # private: what it compares trials at
    assert asha_milestones(grace_period, max_t, 3) == tuple(rungs)


def test_cheap_saves_every_epoch_dear_ones_when_they_are_a_tenth_of_the_training():
    assert CheckpointPolicy().epochs_saved(6, epoch_s=60.0, save_s=0.5) == [1, 2, 3, 4, 5, 6], "a CPU epoch: checkpoints cost nothing"
    # an H100 epoch of 5 s against a 0.7 GB checkpoint of 2 s: one save per 20 s of training
    assert CheckpointPolicy().epochs_saved(12, epoch_s=5.0, save_s=2.0) == [1, 5, 9, 12]
    assert CheckpointPolicy(milestones=(1, 3, 9)).epochs_saved(12, epoch_s=5.0, save_s=2.0) == [1, 3, 7, 9, 12]
    assert CheckpointPolicy(every=4).epochs_saved(10, epoch_s=5.0, save_s=0.0) == [4, 8, 10], "--checkpoint-every 4"


def test_after_the_time_budget_every_epoch_may_be_the_last():
    over = CheckpointPolicy(every=100, deadline=time.time() - 1)
    assert all(over.due(e, 10, 0.0, 1.0, time.time()) for e in range(1, 11))
    ahead = CheckpointPolicy(every=100, deadline=time.time() + 3600)
    assert [e for e in range(1, 11) if ahead.due(e, 10, 0.0, 1.0, time.time())] == [10]


def test_a_trial_reports_every_epoch_and_checkpoints_where_the_policy_says(monkeypatch):
    """The real trial loop (tltune.raytune.trainable._train) on a tiny dataset, Ray's calls
    stood in for: five epochs, ASHA rungs at 1 and 3, --checkpoint-every 100."""
    rng = np.random.default_rng(0)
    arrays = ImageArrays(rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8), rng.integers(0, 2, 64).astype(np.int64))
    splits = Splits("toy", ["a", "b"], arrays, arrays, arrays, (0.5,), (0.25,))
    reports = []
    fake_tune = SimpleNamespace(get_checkpoint=lambda: None, report=lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)),
                                Checkpoint=SimpleNamespace(from_directory=lambda directory: directory))  # fmt: skip
    monkeypatch.setattr(trainable, "tune", fake_tune)
    monkeypatch.setattr(trainable, "ray", SimpleNamespace(get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "node"), get_gpu_ids=list))
    monkeypatch.setattr(trainable, "trial_inputs", lambda config, inputs: (splits, None))
    config = {"dataset": "toy", "model": "cnn", "mode": "scratch", "optimizer": "adam", "lr": 1e-3, "epochs": 5, "batch_size": 16, "seed": 0}
    policy = CheckpointPolicy(milestones=(1, 3), every=100)
    trainable._train(trainable.TrialConfig.from_dict(config), {"checkpoints": policy}, trainable.torch.device("cpu"), time.time(), held={})
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3, 4, 5]
    assert [m["epoch"] for m, checkpoint in reports if checkpoint is not None] == [1, 3, 5]
    assert reports[0][0]["last_checkpoint_s"] is None and reports[1][0]["last_checkpoint_s"] > 0, "what the last save cost"
