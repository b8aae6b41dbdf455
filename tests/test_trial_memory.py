"""A trial frees what it held however it ends: its model is collected after it completes and
after Ray stops it inside ``tune.report`` (ASHA) or it fails, so a reused actor or the next
trial on its GPU starts with the memory. On the CPU: the model is gone (a weak reference dies)."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

import tltune.raytune.trainable as trainable
from tltune.train import EVAL_BATCH, eval_batch_size

CONFIG = {"dataset": "tiny", "model": "cnn", "mode": "scratch", "optimizer": "adam", "lr": 1e-3, "epochs": 1, "batch_size": 8, "seed": 0}


class StopTrial(BaseException):
    """What Ray raises in the trial's thread to end it inside tune.report."""


@pytest.fixture
def outside_ray(monkeypatch):
    resources = SimpleNamespace(required_resources={"CPU": 1})
    monkeypatch.setattr(trainable.tune, "get_context", lambda: SimpleNamespace(get_trial_resources=lambda: resources))
    monkeypatch.setattr(trainable, "trial_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(trainable, "freeze_what_lives_as_long_as_the_process", lambda: None)  # not this test process's objects
    released = []
    real_release = trainable.release_memory
    monkeypatch.setattr(trainable, "release_memory", lambda device: (released.append(device), real_release(device)))
    return released


@pytest.mark.parametrize("ending", [None, StopTrial, RuntimeError])
def test_the_model_is_collected_however_the_trial_ends(outside_ray, monkeypatch, ending):
    alive = []

    def train(config, inputs, device, started_at, held):
        model = torch.nn.Linear(256, 256)
        optimizer = torch.optim.Adam(model.parameters())
        alive.append(weakref.ref(model))
        model(torch.ones(2, 256)).sum().backward()
        optimizer.step()
        if ending is not None:
            raise ending("stopped")

    monkeypatch.setattr(trainable, "_train", train)
    if ending is None:
        trainable.train_trial(CONFIG, {})
    else:
        with pytest.raises(ending):
            trainable.train_trial(CONFIG, {})
    assert alive[0]() is None, "the model was freed"
    assert len(outside_ray) == 2, "released at the start (an earlier trial's leftovers) and at the end"


def test_what_the_imports_made_is_frozen_once_and_later_garbage_is_still_collected():
    if gc.get_freeze_count():
        pytest.skip("something in this process froze its objects already")
    try:
        trainable.freeze_what_lives_as_long_as_the_process()
        frozen = gc.get_freeze_count()
        assert frozen > 1000, "the imports' objects are left out of later collections"
        later = [[n] for n in range(1000)]  # a later trial's objects (frozen ones may meanwhile be freed: the count only falls)
        trainable.freeze_what_lives_as_long_as_the_process()
        assert gc.get_freeze_count() <= frozen, "once a process: a later trial's leftovers are collected, not frozen"
        del later

        class Node:
            pass

        cycle = Node()
        cycle.me = cycle
        dead = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert dead() is None, "a trial's cyclic garbage is still collected"
    finally:
        gc.unfreeze()


def test_evaluation_batches_are_bounded_by_the_input_size():
    small, alexnet = SimpleNamespace(size=32), SimpleNamespace(size=224)
    assert eval_batch_size(small) == EVAL_BATCH == eval_batch_size(object()), "feature vectors: no image size"
    assert eval_batch_size(alexnet) == 41 and eval_batch_size(SimpleNamespace(size=64)) == EVAL_BATCH


def test_a_trial_out_of_gpu_memory_says_what_to_change(outside_ray, monkeypatch):
    """CUDA's own message names bytes, not the flags that made the trial too big for its share."""
    monkeypatch.setattr(trainable, "trial_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(trainable, "release_memory", lambda device: None)
    monkeypatch.setattr(trainable.tune, "get_context", lambda: SimpleNamespace(get_trial_resources=lambda: SimpleNamespace(required_resources={"CPU": 1, "GPU": 0.25})))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(name="Tesla T4", total_memory=15 * 2**30))

    def train(config, inputs, device, started_at, held):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 14.58 GiB of which 1.2 GiB is free.")

    monkeypatch.setattr(trainable, "_train", train)
    with pytest.raises(RuntimeError) as raised:
        trainable.train_trial(CONFIG, {})
    assert str(raised.value) == (
        "this trial ran out of GPU memory on Tesla T4 (15 GiB, shared by up to 4 trials at --gpus-per-trial 0.25; batch size 8): "
        "pass a larger --gpus-per-trial (fewer trials per GPU), a smaller --batch-size or --image-size (docs/PERFORMANCE.md, GPU memory per trial); "
        "torch: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
