"""Cached backbone features for feature extraction.

In ``feature_extract`` mode the backbone is frozen and in eval mode (Dropout off) and there
is no augmentation, so its output per image is the same in every epoch of every trial.
:func:`feature_splits` computes it once per (dataset split, weights, model input) and caches
it on disk as float16; trials then train only the head on it. A trial on cached features
builds ``BackboneHead(Identity, head)``: its checkpoint (the head) is the same as the
naive path's, and so is the model it describes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from tltune.data import ImageArrays, Splits, as_tensors, cache_dir, iterate_batches

FEATURE_CACHE_VERSION = 1


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    digest = hashlib.sha1()
    for array in arrays:
        digest.update(str((array.shape, array.dtype.str)).encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def fingerprint_state(state: dict | None) -> str:
    if state is None:
        return "random-init"
    digest = hashlib.sha1()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def feature_key(splits: Splits, pretrained_state: dict | None, input_config: dict) -> str:
    """Changes with the images, labels, weights, model, input size and channels."""
    parts = [
        f"v{FEATURE_CACHE_VERSION}",
        *(f"{k}={input_config.get(k)}" for k in ("model", "activation", "image_size", "channels")),
        fingerprint_state(pretrained_state),
        *(fingerprint_arrays(s.images, s.labels) for s in (splits.train, splits.val, splits.test)),
    ]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_features(backbone: nn.Module, arrays: ImageArrays, transform, device, batch_size: int = 256) -> np.ndarray:
    backbone.eval()
    images, labels = as_tensors(arrays)
    chunks = [
        backbone(transform(x.to(device))).to(torch.float16).cpu()
        for x, _ in iterate_batches(images, labels, batch_size, shuffle=False)
    ]
    return torch.cat(chunks).numpy()


def feature_splits(splits: Splits, input_config: dict, pretrained_state: dict | None, device="cpu") -> Splits:
    """``splits`` with every image replaced by its backbone features (float16 (N, D)),
    from the disk cache when they were computed before."""
    from tltune.train import setup_model

    key = feature_key(splits, pretrained_state, input_config)
    path = cache_dir() / "features" / f"{splits.name}-{key}.npz"
    names = ("train", "val", "test")
    if path.is_file():
        try:
            with np.load(path) as cached:
                features = [cached[n] for n in names]
        except (OSError, ValueError, KeyError):
            features = None
    else:
        features = None
    if features is None:
        model, transform = setup_model({**input_config, "mode": "feature_extract"}, splits, pretrained_state)
        model.to(device)
        features = [compute_features(model.backbone, getattr(splits, n), transform, device) for n in names]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(zip(names, features)))
        os.replace(tmp, path)  # atomic: concurrent writers leave one whole file
    return Splits(
        splits.name,
        splits.classes,
        *(ImageArrays(f, getattr(splits, n).labels) for f, n in zip(features, names)),
        mean=(),
        std=(),
    )


class FeatureTransform:
    """Cached float16 features -> float32 on the batch's device; the 'transform' of the head."""

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features.float()
