"""A trial frees what it held however it ends: its model is collected after it completes and
after Ray stops it inside ``tune.report`` (ASHA) or it fails, so a reused actor or the next
trial on its GPU starts with the memory. On the CPU: the model is gone (a weak reference dies)."""

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


def test_evaluation_batches_are_bounded_by_the_input_size():
    small, alexnet = SimpleNamespace(size=32), SimpleNamespace(size=224)
    assert eval_batch_size(small) == EVAL_BATCH == eval_batch_size(object()), "feature vectors: no image size"
    assert eval_batch_size(alexnet) == 41 and eval_batch_size(SimpleNamespace(size=64)) == EVAL_BATCH
