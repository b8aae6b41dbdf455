"""Cached features give the naive feature-extraction model's logits; the cache key tracks
weights and input size."""

import numpy as np
import torch
import torchvision

from dataclasses import replace

from tltune.config import ModelSpec, TrialConfig
from tltune.data import load_dataset, make_splits, as_tensors
from tltune.features import feature_key, feature_splits
from tltune.train import build_optimizer, evaluate, load_checkpoint, save_checkpoint, setup_model, train_one_epoch, seed_everything

ALEXNET_64 = ModelSpec("alexnet", image_size=64)


def small_splits(real_data_root, train_subset=200):
    """Real MNIST digits (read in a fraction of a second; CIFAR-10's 60k JPEGs take half a minute to decode)."""
    return make_splits(load_dataset("mnist", real_data_root), train_subset=train_subset, test_subset=50)


def test_cached_and_naive_feature_extraction_give_the_same_logits(real_data_root, tmp_path):
    splits = small_splits(real_data_root)
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    config = TrialConfig(dataset="mnist", model="alexnet", mode="feature_extract", optimizer="sgd", lr=0.01, epochs=1,
                         batch_size=64, seed=0, image_size=64)  # fmt: skip
    naive, transform = setup_model(config, splits, state)
    cached_splits = feature_splits(splits, config.model_spec, state)
    head, feature_transform = setup_model(replace(config, cached_features=True), cached_splits, None)
    head.head.load_state_dict(naive.head.state_dict())
    naive.eval(), head.eval()
    x, _ = as_tensors(splits.test)
    f, _ = as_tensors(cached_splits.test)
    with torch.no_grad():
        torch.testing.assert_close(head(feature_transform(f)), naive(transform(x)), atol=2e-3, rtol=1e-2)
    # A checkpoint of the head trained on features restores into the naive model, and back.
    seed_everything(0)
    fx, fy = as_tensors(cached_splits.train)
    optimizer = build_optimizer("sgd", head, 0.01)
    train_one_epoch(head, optimizer, fx, fy, feature_transform, 64)
    save_checkpoint(tmp_path, head, optimizer, 1, config)
    load_checkpoint(tmp_path, naive)
    xt, yt = as_tensors(splits.test)
    assert abs(evaluate(naive, xt, yt, transform).accuracy - evaluate(head, f, yt, feature_transform).accuracy) <= 0.02


def test_features_are_cached_on_disk_and_reused(real_data_root, tmp_path, monkeypatch):
    splits = small_splits(real_data_root)  # from the session's dataset cache
    monkeypatch.setenv("TLTUNE_CACHE_DIR", str(tmp_path))  # the features' cache starts empty
    state = torchvision.models.alexnet().state_dict()
    first = feature_splits(splits, ALEXNET_64, state)
    files = list((tmp_path / "features").glob("*.npz"))
    assert len(files) == 1 and first.train.images.dtype == np.float16 and first.train.images.shape == (200, 4096)
    mtime = files[0].stat().st_mtime_ns
    again = feature_splits(splits, ALEXNET_64, state)
    assert files[0].stat().st_mtime_ns == mtime and np.array_equal(first.val.images, again.val.images)


def test_cache_key_changes_with_weights_and_input_size(real_data_root):
    splits = small_splits(real_data_root)
    state = torchvision.models.alexnet().state_dict()
    key = feature_key(splits, state, ALEXNET_64)
    assert key == feature_key(splits, {k: v.clone() for k, v in state.items()}, ALEXNET_64)
    other = dict(state)
    other["features.0.bias"] = state["features.0.bias"] + 1e-3
    assert feature_key(splits, other, ALEXNET_64) != key
    assert feature_key(splits, state, replace(ALEXNET_64, image_size=96)) != key
    assert feature_key(small_splits(real_data_root, train_subset=201), state, ALEXNET_64) != key
