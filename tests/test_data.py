import time

import numpy as np
import pytest
import torch

from conftest import write_class_folders, write_svhn_mat
from tltune.data import BatchTransform, as_tensors, iterate_batches, load_dataset, make_splits
from tltune.errors import UserError


def test_mnist_real_idx_files(real_data_root):
    ds = load_dataset("mnist", real_data_root)
    assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.images.shape == (10000, 28, 28, 1)
    assert ds.train.images.dtype == np.uint8
    assert np.bincount(ds.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(ds.train.images.mean() - 33.318) < 0.01


def test_cifar10_class_folders_and_disk_cache(real_data_root):
    first = load_dataset("cifar10", real_data_root)
    assert first.train.images.shape == (50000, 32, 32, 3) and len(first.test) == 10000
    assert first.classes[0] == "airplane" and np.bincount(first.train.labels).tolist() == [5000] * 10
    started = time.perf_counter()
    again = load_dataset("cifar10", real_data_root)
    assert time.perf_counter() - started < 1.0, "second load must come from the disk cache"
    assert np.array_equal(first.train.images, again.train.images)


def test_class_folder_dataset_by_name_and_cache_invalidation(tmp_path):
    write_class_folders(tmp_path / "pets")
    ds = load_dataset("pets", tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.train.images.shape == (12, 10, 12, 3)
    assert set(ds.train.labels.tolist()) == {0, 1}
    write_class_folders(tmp_path / "pets", per_class=7)  # the dataset changed: decode again
    assert len(load_dataset("pets", tmp_path).train) == 14


def test_grayscale_class_folders_keep_one_channel(tmp_path):
    write_class_folders(tmp_path / "digits", mode="L")
    assert load_dataset("digits", tmp_path).channels == 1


def test_svhn_from_a_real_format_mat_file(tmp_path):
    X, digits = write_svhn_mat(tmp_path / "svhn" / "train_32x32.mat", 20)
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", 8, seed=1)
    ds = load_dataset("svhn", tmp_path)
    assert ds.train.images.shape == (20, 32, 32, 3)
    assert np.array_equal(ds.train.images[3], X[:, :, :, 3])
    assert ds.train.labels.tolist() == digits.tolist()  # label 10 means digit 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "unknown dataset 'nosuch'"),
        (lambda root: (root / "nosuch" / "train").mkdir(parents=True) or (root / "nosuch" / "test").mkdir(), "no class folders"),
    ],
)
def test_unknown_or_malformed_dataset(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UserError, match=message):
        load_dataset("nosuch", tmp_path)


def test_non_image_file_and_empty_class_folder(tmp_path):
    root = write_class_folders(tmp_path / "pets")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match="notes.txt is not an image"):
        load_dataset("pets", tmp_path)
    (root / "train" / "cat" / "notes.txt").unlink()
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        load_dataset("pets", tmp_path)
    (root / "train" / "cat" / "broken.png").unlink()
    (root / "train" / "cow").mkdir()
    with pytest.raises(UserError, match="cow is empty"):
        load_dataset("pets", tmp_path)


def test_truncated_idx_file_is_reported_as_corrupt(tmp_path, real_data_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (real_data_root / "MNIST" / "raw").iterdir():
        data = f.read_bytes()
        (raw / f.name).write_bytes(data[: len(data) // 2] if f.name.startswith("train-images") else data)
    with pytest.raises(UserError, match="incomplete or corrupt"):
        load_dataset("mnist", tmp_path)


def test_missing_torchvision_dataset_offline_names_the_fix(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(UserError, match="--data-root"):
        load_dataset("svhn", tmp_path)


def test_splits_are_seeded_disjoint_and_subset_stable(real_data_root):
    ds = load_dataset("mnist", real_data_root)
    a = make_splits(ds, val_fraction=0.1, seed=0)
    b = make_splits(ds, val_fraction=0.1, seed=0, train_subset=1000, test_subset=500)
    assert len(a.val) == 6000 and len(a.train) == 54000 and len(b.train) == 1000 and len(b.test) == 500
    assert np.array_equal(a.val.labels, make_splits(ds, 0.1, seed=0).val.labels)
    assert len(np.unique(b.val.labels)) == 10, "a validation subset must be a random sample, not one class"
    assert abs(a.mean[0] - 0.1307) < 0.002 and abs(a.std[0] - 0.3081) < 0.002
    with pytest.raises(UserError):
        make_splits(ds, val_fraction=1.5)


def test_batch_transform_converts_channels_resizes_and_normalises():
    gray = torch.full((2, 28, 28, 1), 255, dtype=torch.uint8)
    out = BatchTransform(3, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(gray)
    assert out.shape == (2, 3, 64, 64) and torch.allclose(out, torch.ones_like(out))
    rgb = torch.zeros((4, 32, 32, 3), dtype=torch.uint8)
    out = BatchTransform(1, 28, (0.0,), (1.0,))(rgb)
    assert out.shape == (4, 1, 28, 28) and out.abs().max() == 0


def test_batches_cover_every_sample_once():
    images = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8)
    labels = torch.arange(10)
    seen = torch.cat([y for _, y in iterate_batches(images, labels, 3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))


def test_read_only_arrays_become_tensors_without_copy(real_data_root):
    ds = load_dataset("mnist", real_data_root)
    arrays = ds.test
    arrays.images.setflags(write=False)
    images, _ = as_tensors(arrays)
    assert images.data_ptr() == arrays.images.ctypes.data
