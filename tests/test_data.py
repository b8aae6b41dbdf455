import numpy as np
import pytest
import torch

from conftest import write_class_folders, write_svhn_mat
from tltune.data import BatchTransform, Dataset, ImageArrays, as_tensors, channel_stats, iterate_batches, load_dataset, make_splits
from tltune.errors import UserError


def test_mnist_real_idx_files(real_data_root):
    ds = load_dataset("mnist", real_data_root)
    assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.images.shape == (10000, 28, 28, 1)
    assert ds.train.images.dtype == np.uint8
    assert np.bincount(ds.test.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(ds.train.images.mean() - 33.318) < 0.01


@pytest.mark.slow  # decodes the real 60k JPEGs (7 to 8.5 seconds here)
def test_cifar10_class_folders_and_disk_cache(real_data_root, monkeypatch):
    first = load_dataset("cifar10", real_data_root)
    assert first.train.images.shape == (50000, 32, 32, 3) and len(first.test) == 10000
    assert first.classes[0] == "airplane" and np.bincount(first.train.labels).tolist() == [5000] * 10

    def decode(*args):
        raise AssertionError("second load must come from the disk cache")

    monkeypatch.setattr("tltune.data.load_class_folders", decode)
    again = load_dataset("cifar10", real_data_root)  # would raise if it decoded again
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


def test_broken_image_and_empty_class_folder(tmp_path):
    root = write_class_folders(tmp_path / "pets")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        load_dataset("pets", tmp_path)
    (root / "train" / "cat" / "broken.png").unlink()
    (root / "train" / "cow").mkdir()
    with pytest.raises(UserError, match="cow is empty"):
        load_dataset("pets", tmp_path)


def test_hidden_and_non_image_files_and_hidden_folders_are_ignored(tmp_path):
    root = write_class_folders(tmp_path / "pets")
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
            (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
            (folder / "._0000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
            (folder / "desc.txt").write_text("photos of pets")
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / ".ipynb_checkpoints" / "x.png").write_bytes(b"not a class")
    ds = load_dataset("pets", tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds.train) == 12 and len(ds.test) == 12


def test_one_class_is_refused(tmp_path):
    write_class_folders(tmp_path / "cats", classes=("cat",))
    with pytest.raises(UserError, match="needs at least 2 classes") as error:
        load_dataset("cats", tmp_path)
    assert "\n" not in str(error.value)


@pytest.fixture
def offline(monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.mark.parametrize("name", ["mnist", "svhn", "pets"])
def test_missing_data_root_is_not_created(tmp_path, offline, name):
    missing = tmp_path / "no" / "data"
    with pytest.raises(UserError, match="does not exist.*--data-root") as error:
        load_dataset(name, missing)
    assert str(missing) in str(error.value) and not (tmp_path / "no").exists()


def test_split_without_training_images_is_refused():
    def arrays(n):
        return ImageArrays(np.arange(n * 16, dtype=np.uint8).reshape(n, 4, 4, 1), np.arange(n) % 2)

    tiny = Dataset("tiny", ["a", "b"], arrays(3), arrays(2))
    with pytest.raises(UserError, match="--val-fraction"):
        make_splits(tiny, val_fraction=0.95)
    with pytest.raises(UserError, match="--val-fraction"):
        make_splits(Dataset("one", ["a", "b"], arrays(1), arrays(2)), val_fraction=0.1, train_subset=5)
    assert len(make_splits(tiny, val_fraction=0.3).train) == 2


def test_truncated_idx_file_is_reported_as_corrupt(tmp_path, real_data_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (real_data_root / "MNIST" / "raw").iterdir():
        data = f.read_bytes()
        (raw / f.name).write_bytes(data[: len(data) // 2] if f.name.startswith("train-images") else data)
    with pytest.raises(UserError, match="incomplete or corrupt"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("name", ["mnist", "svhn", "cifar10"])
def test_missing_torchvision_dataset_offline_names_the_fix(tmp_path, offline, name):
    with pytest.raises(UserError, match="--data-root"):
        load_dataset(name, tmp_path)
    assert list(tmp_path.iterdir()) == [], "a failed download leaves nothing behind"


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


def test_channel_stats_are_the_pixels_mean_and_std():
    rng = np.random.default_rng(1)
    for shape in ((40, 5, 7, 3), (9, 4, 4, 1)):
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        pixels = images.reshape(-1, shape[-1]).astype(np.float64) / 255
        mean, std = channel_stats(images, chunk=7)  # chunks that do not divide the images
        assert np.allclose(mean, pixels.mean(0), atol=1e-12) and np.allclose(std, pixels.std(0), atol=1e-12)
