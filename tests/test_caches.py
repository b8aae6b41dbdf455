"""Dataset and feature caches: a damaged cache file is discarded and rebuilt with one warning
line, never used or unpickled; a write interrupted half-way leaves no file under the final name."""

import contextlib
import json
import os
import signal
import time
import zipfile

import numpy as np
import pytest
import torch

from conftest import write_class_folders
from tltune import signals
from tltune.config import ModelSpec
from tltune.errors import UserError
from tltune.data import Dataset, ImageArrays, load_dataset, make_splits
from tltune.features import feature_splits


class RunsOnUnpickle:
    """Unpickling this creates ``marker``: proof that a loader unpickled cache contents."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def pickled_array(marker) -> np.ndarray:
    array = np.empty(1, dtype=object)
    array[0] = RunsOnUnpickle(marker)
    return array


def save_npy(path, array):
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=True)


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def one_warning_line(err: str, what: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(f"warning: {what} ") and "was damaged (" in lines[0] and lines[0].endswith("; rebuilding it"), err
    return lines[0]


# ---------------------------------------------------------------------------- dataset cache


@pytest.fixture
def cached_pets(tmp_path, monkeypatch):
    """A class-folder dataset loaded once: (data root, its cache folder, the dataset)."""
    monkeypatch.setenv("TLTUNE_CACHE_DIR", str(tmp_path / "cache"))
    write_class_folders(tmp_path / "data" / "pets", per_class=5)
    dataset = load_dataset("pets", tmp_path / "data")
    (folder,) = (tmp_path / "cache" / "datasets").iterdir()
    return tmp_path / "data", folder, dataset


def shorter(path):
    np.save(path, np.load(path)[:-1])


def wrong_version(folder):
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "version": 999}))


DATASET_DAMAGE = {
    "truncated images": lambda f: truncate(f / "train_images.npy"),
    "truncated header": lambda f: truncate(f / "test_images.npy", keep=0.05),
    "zero-byte labels": lambda f: (f / "test_labels.npy").write_bytes(b""),
    "labels shorter than images": lambda f: shorter(f / "train_labels.npy"),
    "split shorter than recorded": lambda f: (shorter(f / "test_images.npy"), shorter(f / "test_labels.npy")),
    "images of another shape": lambda f: np.save(f / "train_images.npy", np.load(f / "train_images.npy")[:, :, :-1]),
    "labels of another dtype": lambda f: np.save(f / "train_labels.npy", np.load(f / "train_labels.npy").astype(np.float32)),
    "pickled labels": lambda f: save_npy(f / "train_labels.npy", pickled_array(f.parent / "UNPICKLED")),
    "garbage meta": lambda f: (f / "meta.json").write_text('{"name": "pe'),
    "zero-byte meta": lambda f: (f / "meta.json").write_bytes(b""),
    "wrong version": wrong_version,
}


@pytest.mark.parametrize("damage", list(DATASET_DAMAGE))
def test_damaged_dataset_cache_is_rebuilt_with_one_warning(cached_pets, capsys, damage):
    root, folder, dataset = cached_pets
    capsys.readouterr()
    DATASET_DAMAGE[damage](folder)
    again = load_dataset("pets", root)
    line = one_warning_line(capsys.readouterr().err, "dataset cache")
    assert str(folder) in line
    assert not (folder.parent / "UNPICKLED").exists(), "the cache was unpickled"
    for split in ("train", "test"):
        assert np.array_equal(getattr(again, split).images, getattr(dataset, split).images)
        assert np.array_equal(getattr(again, split).labels, getattr(dataset, split).labels)
    load_dataset("pets", root)
    assert capsys.readouterr().err == "", "the rebuilt cache is whole"


def load_losing_a_sigterm(*args, **kwargs):
    """``np.load`` as CI saw it once: a SIGTERM arrived while it ran, and numpy's C code replaced
    the handler's Interrupted with an error of its own."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler raises here
    except signals.Interrupted:
        pass
    raise TypeError("expected str, bytes or os.PathLike object, not BufferedReader")


def test_a_stop_whose_exception_numpy_replaced_stops_the_load_and_keeps_the_cache(cached_pets, capsys, monkeypatch):
    root, folder, dataset = cached_pets
    capsys.readouterr()
    monkeypatch.setattr(np, "load", load_losing_a_sigterm)
    with signals.installed(), pytest.raises(signals.Interrupted, match="SIGTERM"):
        load_dataset("pets", root)
    assert capsys.readouterr().err == "", "a stop is not damage"
    assert (folder / "meta.json").is_file() and (folder / "train_images.npy").is_file()


def test_a_stop_whose_exception_was_lost_ends_the_command_as_a_stop(cached_pets, command, monkeypatch, tmp_path):
    """The lost stop surfaces as the error it became (here: a dataset called corrupt), and the
    command still ends as a SIGTERM: 143, one line, nothing written."""
    root, _, _ = cached_pets

    def corrupt(*args, **kwargs):
        with contextlib.suppress(TypeError):
            load_losing_a_sigterm()
        raise UserError("dataset 'pets' is incomplete or corrupt")

    monkeypatch.setattr("tltune.data.load_dataset", corrupt)
    code, _, err = command("sweep", "cifar10", "--data-root", str(root), "--storage-path", str(tmp_path / "runs"), "--name", "run")
    assert code == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM) before the run started: nothing was written", err
    assert not (tmp_path / "runs" / "run").exists()


def test_dataset_cache_left_by_a_crash_is_not_picked_up(cached_pets, capsys):
    root, folder, dataset = cached_pets
    capsys.readouterr()
    (folder / "meta.json").unlink()  # killed before the cache was complete...
    truncate(folder / "train_images.npy")  # ...or by a writer that wrote in place
    (folder / ".train_labels.npy.x1y2z3.tmp").write_bytes(b"\x93NUMPY half")  # a temp file of a killed writer
    again = load_dataset("pets", root)
    assert np.array_equal(again.train.images, dataset.train.images)
    assert np.array_equal(again.train.labels, dataset.train.labels)
    load_dataset("pets", root)
    assert capsys.readouterr().err == "", "an incomplete cache is no news: it is written again"
    assert (folder / "meta.json").is_file() and np.array_equal(np.load(folder / "train_images.npy"), dataset.train.images)


def test_a_dataset_another_process_is_decoding_is_read_from_its_cache_not_decoded_again(tmp_path, monkeypatch, capsys):
    """Two sweeps started together on one machine (the lock is a file's: two threads with a file
    each hold it as two processes would)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tltune import data

    monkeypatch.setenv("TLTUNE_CACHE_DIR", str(tmp_path / "cache"))
    write_class_folders(tmp_path / "data" / "pets", per_class=5)
    decoding, go_on, decoded = threading.Event(), threading.Event(), []
    real = data.load_class_folders

    def slow_decode(name, folder):
        decoded.append(name)
        decoding.set()
        assert go_on.wait(30)
        return real(name, folder)

    monkeypatch.setattr(data, "load_class_folders", slow_decode)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(load_dataset, "pets", tmp_path / "data")
        assert decoding.wait(30)
        second = pool.submit(load_dataset, "pets", tmp_path / "data")
        deadline, out = time.time() + 30, ""
        while "waiting to read its cache" not in out and time.time() < deadline:
            out += capsys.readouterr().out
            time.sleep(0.05)
        go_on.set()
        first, second = first.result(timeout=60), second.result(timeout=60)
    assert out.strip() == "pets: another process on this machine is decoding it; waiting to read its cache"
    assert decoded == ["pets"], "decoded once"
    assert np.array_equal(first.train.images, second.train.images) and first.classes == second.classes


def test_dataset_cache_write_that_fails_half_way_leaves_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLTUNE_CACHE_DIR", str(tmp_path / "cache"))
    write_class_folders(tmp_path / "data" / "pets", per_class=5)
    real_save = np.save

    def save_half_then_fail(file, array, *args, **kwargs):
        file.write(b"\x93NUMPY")  # the first bytes of a .npy
        raise OSError(28, "No space left on device (test)")

    monkeypatch.setattr(np, "save", save_half_then_fail)
    dataset = load_dataset("pets", tmp_path / "data")
    assert len(dataset.train) == 10
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: could not cache dataset 'pets'") and "No space left" in line
    cache = tmp_path / "cache" / "datasets"
    left = [p.relative_to(cache) for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert left == [], f"left behind: {left}"
    monkeypatch.setattr(np, "save", real_save)
    again = load_dataset("pets", tmp_path / "data")
    assert np.array_equal(again.test.images, dataset.test.images)


# ---------------------------------------------------------------------------- feature cache


@pytest.fixture
def tiny_splits():
    rng = np.random.default_rng(0)

    def arrays(n):
        return ImageArrays(rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), np.arange(n) % 2)

    return make_splits(Dataset("tiny", ["a", "b"], arrays(20), arrays(6)), val_fraction=0.25)


CNN = ModelSpec("cnn", image_size=8)


def cnn_features(splits):
    torch.manual_seed(0)  # the same random-init backbone in every call
    return feature_splits(splits, CNN, None)


def rewrite_npz(path, **change):
    with np.load(path) as cached:
        arrays = {name: cached[name] for name in cached.files}
    with open(path, "wb") as f:
        np.savez(f, **{**arrays, **change})


def drop_from_npz(path, name):
    with np.load(path) as cached:
        arrays = {n: cached[n] for n in cached.files if n != name}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


FEATURE_DAMAGE = {
    "truncated": lambda p: truncate(p),
    "zero bytes": lambda p: p.write_bytes(b""),
    "not a zip": lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 100),
    "a .npy instead": lambda p: save_npy(p, np.zeros((3, 4), np.float16)),
    "1-d train": lambda p: rewrite_npz(p, train=np.zeros(14, np.float16)),
    "train shorter": lambda p: rewrite_npz(p, train=np.load(p)["train"][:-1]),
    "another width": lambda p: rewrite_npz(p, val=np.load(p)["val"][:, :-1]),
    "pickled": lambda p: rewrite_npz(p, test=pickled_array(p.parent / "UNPICKLED")),
    "wrong version": lambda p: rewrite_npz(p, version=np.array(999)),
    "no version": lambda p: drop_from_npz(p, "version"),
    "missing split": lambda p: drop_from_npz(p, "test"),
}


@pytest.mark.parametrize("damage", list(FEATURE_DAMAGE))
def test_damaged_feature_cache_is_rebuilt_with_one_warning(tiny_splits, tmp_path, monkeypatch, capsys, damage):
    monkeypatch.setenv("TLTUNE_CACHE_DIR", str(tmp_path))
    first = cnn_features(tiny_splits)
    (path,) = (tmp_path / "features").glob("*.npz")
    capsys.readouterr()
    FEATURE_DAMAGE[damage](path)
    again = cnn_features(tiny_splits)
    assert str(path) in one_warning_line(capsys.readouterr().err, "feature cache")
    assert not (tmp_path / "UNPICKLED").exists(), "the cache was unpickled"
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(again, split).images, getattr(first, split).images)
    cnn_features(tiny_splits)
    assert capsys.readouterr().err == "", "the rebuilt cache is whole"
    assert zipfile.is_zipfile(path)


def test_feature_cache_write_that_fails_half_way_leaves_no_file(tiny_splits, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLTUNE_CACHE_DIR", str(tmp_path))

    def savez_half_then_fail(file, *args, **kwargs):
        file.write(b"PK\x03\x04")  # the first bytes of a zip
        raise OSError(28, "No space left on device (test)")

    monkeypatch.setattr(np, "savez", savez_half_then_fail)
    features = cnn_features(tiny_splits)
    assert features.train.images.shape == (len(tiny_splits.train), 128)
    assert [p.name for p in (tmp_path / "features").iterdir()] == []
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: could not cache features") and "No space left" in line
