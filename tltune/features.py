"""Cached backbone features for feature extraction.

In ``feature_extract`` mode the backbone is frozen and in eval mode (Dropout off) and there
is no augmentation, so its output per image is the same in every epoch of every trial.
:func:`feature_splits` computes it once per (dataset split, weights, model input) and caches
it on disk as float16; trials then train only the head on it. The backbone always runs in
fp32 (TF32 convolutions on Ampere and later GPUs, torch's default), whatever ``--precision``
says: the precision applies to the trials' training of the head, so it is no part of the
cache key and one cache serves every precision. A trial on cached features
builds ``BackboneHead(Identity, head)``: its checkpoint (the head) is the same as the
naive path's, and so is the model it describes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from tltune import signals
from tltune.config import ModelSpec
from tltune.data import DamagedCache, ImageArrays, Splits, as_tensors, atomic_write, cache_dir, iterate_batches, to_device, warn
from tltune.train import Runtime, setup_image_model

FEATURE_CACHE_VERSION = 2
SPLIT_NAMES = ("train", "val", "test")


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


def feature_key(splits: Splits, pretrained_state: dict | None, spec: ModelSpec) -> str:
    """Changes with the images, labels, weights and every field of the model spec."""
    parts = [
        f"v{FEATURE_CACHE_VERSION}",
        *(f"{k}={v}" for k, v in dataclasses.asdict(spec).items()),
        fingerprint_state(pretrained_state),
        *(fingerprint_arrays(s.images, s.labels) for s in (splits.train, splits.val, splits.test)),
    ]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_features(backbone: nn.Module, arrays: ImageArrays, transform, device, batch_size: int = 256) -> np.ndarray:
    """The backbone's float16 output per image. The split stays on the host; each uint8
    batch goes to the device through pinned memory and is transformed there. The features
    stay on the device until the end, so the host never waits for a batch."""
    backbone.eval()
    images, labels = as_tensors(arrays)
    chunks = [
        backbone(transform(to_device(x, device))).to(torch.float16)
        for x, _ in iterate_batches(images, labels, batch_size, shuffle=False)
    ]
    return torch.cat(chunks).cpu().numpy()


def load_feature_cache(path: Path, splits: Splits) -> list[np.ndarray]:
    """The cached features of ``splits``; raises DamagedCache when the file is unreadable, of
    another version, or not one float16 (N, D) array per split of ``splits``' lengths."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            version = cached["version"] if "version" in cached.files else None
            if version is None or version.shape != () or int(version) != FEATURE_CACHE_VERSION:
                raise ValueError(f"cache version {version}, expected {FEATURE_CACHE_VERSION}")
            features = [cached[name] for name in SPLIT_NAMES]
    except Exception as exc:  # BadZipFile, EOFError, ValueError (a pickle), KeyError...: whatever the damage, rebuild
        raise DamagedCache(path, exc) from None
    for name, array in zip(SPLIT_NAMES, features):
        n = len(getattr(splits, name))
        if array.dtype != np.float16 or array.ndim != 2 or len(array) != n or array.shape[1] != features[0].shape[1]:
            raise DamagedCache(path, f"{name} features are {array.dtype} {array.shape}, expected float16 ({n}, D) like train")
    return features


def feature_splits(splits: Splits, spec: ModelSpec, pretrained_state: dict | None, device="cpu") -> Splits:
    """``splits`` with every image replaced by the features of ``spec``'s backbone (float16
    (N, D)), from the disk cache when they were computed before."""
    key = feature_key(splits, pretrained_state, spec)
    path = cache_dir() / "features" / f"{splits.name}-{key}.npz"
    features = None
    if path.exists():
        try:
            features = load_feature_cache(path, splits)
        except DamagedCache as exc:
            signals.raise_if_stopped()  # the error may be a stop signal's, replaced by numpy: the cache is fine
            warn(f"feature cache {exc.path} was damaged ({exc}); rebuilding it")
            path.unlink(missing_ok=True)
    if features is None:
        model, transform = setup_image_model(spec, "feature_extract", splits, pretrained_state)
        # fp32, as the naive path's default; channels_last only changes the layout.
        Runtime(device, "fp32", channels_last=True).prepare(model, transform)
        features = [compute_features(model.backbone, getattr(splits, n), transform, device) for n in SPLIT_NAMES]
        arrays = {"version": np.array(FEATURE_CACHE_VERSION), **dict(zip(SPLIT_NAMES, features))}
        try:
            atomic_write(path, lambda f: np.savez(f, **arrays))
        except OSError as exc:
            warn(f"could not cache features in {path.parent}: {exc}")
    return Splits(
        splits.name,
        splits.classes,
        *(ImageArrays(f, getattr(splits, n).labels) for f, n in zip(features, SPLIT_NAMES)),
        mean=(),
        std=(),
    )
