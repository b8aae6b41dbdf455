"""Datasets as uint8 arrays: load once, cache on disk, split, and transform whole batches.

A dataset is decoded once into ``uint8`` arrays of shape (N, H, W, C) and cached as ``.npy``
files, so the next load is a file read. Everything per-image after that (channel conversion,
resizing, normalisation) happens on batches of tensors in :class:`BatchTransform`.
No Ray here: the sweep code hands these arrays to trials through Ray's object store.

Class-folder datasets (``{train,test}/<class>/<images>``) follow these rules, so that a dataset
whose files disagree loads the same way whatever order its files come in:

* Colour: the dataset is RGB if any of its images (train or test) is colour, else grayscale (L);
  each image is converted to it on its own, and a warning counts the grayscale images of a
  colour dataset. An image is colour by its mode: RGB, RGBA, CMYK, YCbCr..., or a palette (P)
  with a non-gray entry; 1, L, LA, I;16, I, F and gray palettes are grayscale.
* Bit depth: 16-bit grayscale (I;16, I;16B, I) keeps its top 8 bits (value >> 8, so 65535 is
  255, not everything above 255); 32-bit float (F) is read as [0, 1] (as [0, 255] if any value
  is above 1), clipped. 16-bit RGB PNGs are read at 8 bits by Pillow already.
* Transparency (RGBA, LA, a palette's or a PNG's transparent colour): composited over white,
  as a viewer shows it, rather than exposing the colour stored under transparent pixels.
* Size: every image takes the most common size among all the images (ties: the median area
  among the tied sizes, never the largest), and one warning counts the images resized to it
  and names one; a single large image cannot decide the size of the dataset.
* A file that cannot be decoded (a broken symbolic link, a truncated file, an image over
  Pillow's ``MAX_IMAGE_PIXELS``, a decompression bomb) is a :class:`UserError` naming it.

A channel that is constant over the training images (std below ``MIN_STD``) cannot be scaled:
:func:`make_splits` refuses a dataset whose channels are all constant and warns about (and only
centres) one constant channel among others; :class:`BatchTransform` never divides by a std
below ``MIN_STD`` either, so no NaN or inf comes out of a constant channel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from tltune import signals
from tltune.catalog import DATASET_SHAPES, looks_like_path
from tltune.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}
CACHE_VERSION = 3  # 3: per-image colour, bit-depth, transparency and size rules (module docstring)
MIN_STD = 1e-3  # a channel's std in [0, 1] below this (a quarter of a grey level) is constant
CACHE_ARRAYS = [(split, part) for split in ("train", "test") for part in ("images", "labels")]


@dataclass
class ImageArrays:
    """One split: ``images`` uint8 (N, H, W, C), ``labels`` int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "ImageArrays":
        return ImageArrays(self.images[indices], self.labels[indices])


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: ImageArrays
    test: ImageArrays

    @property
    def channels(self) -> int:
        return self.train.images.shape[3]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[1]


@dataclass
class Splits:
    """What a trial trains on: train/val carved from the training set, and the test set."""

    name: str
    classes: list[str]
    train: ImageArrays
    val: ImageArrays
    test: ImageArrays
    mean: tuple[float, ...]  # per channel, of the training images, in [0, 1]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.train.images.shape[3]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve_data_root(data_root: str | None) -> Path:
    """``--data-root``, else ``$TLTUNE_DATA_ROOT``, else ``./data``."""
    return Path(data_root or os.environ.get("TLTUNE_DATA_ROOT") or "data").expanduser().resolve()


def cache_dir() -> Path:
    return Path(os.environ.get("TLTUNE_CACHE_DIR") or Path.home() / ".cache" / "tltune").expanduser()


class DamagedCache(Exception):
    """A cache file that cannot be used as it is; ``path`` names it."""

    def __init__(self, path: Path, reason: str | BaseException):
        if isinstance(reason, BaseException):
            reason = f"{type(reason).__name__}: {reason}"
        super().__init__(" ".join(str(reason).split()))  # one line
        self.path = path


def warn(message: str) -> None:
    """One line on stderr, as the CLI prints its warnings."""
    print(f"warning: {message}", file=sys.stderr)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` with ``write(file)`` into a temporary file beside it, then rename it into
    place, so that no reader, and no process killed mid-write, sees half a file under ``path``.
    (No fsync: a power cut may still leave a short file, which the cache loaders detect.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.load`` that never unpickles, checked against the shape and dtype recorded when it was saved."""
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # EOFError, ValueError (a pickle), OSError...: whatever the damage, rebuild
        raise DamagedCache(path, exc) from None
    if array.shape != shape or array.dtype != dtype:
        raise DamagedCache(path, f"{array.dtype} {array.shape}, recorded {dtype} {shape}")
    return array


# ---------------------------------------------------------------------------- loaders


def _find_class_folder_root(name: str, root: Path) -> Path | None:
    """The folder holding ``train/`` and ``test/`` class folders for ``name``, if any. A folder
    with only one of the two is a UserError naming the missing one, as is a path given as
    ``name`` that exists but holds neither."""
    known = TORCHVISION_DATASETS.get(name)
    if known is not None and known.class_folders is not None:
        candidates = [root / folder for folder in known.class_folders]
    else:
        candidates = [Path(name).expanduser(), root / name]
    for candidate in candidates:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate.resolve()
    for candidate in candidates:
        present = [split for split in ("train", "test") if (candidate / split).is_dir()]
        if len(present) == 1:
            missing = "test" if present == ["train"] else "train"
            raise UserError(
                f"dataset folder {candidate.resolve()} has a {present[0]}/ folder but no {missing}/ folder: "
                f"a class-folder dataset needs both, as {candidate.resolve()}/{{train,test}}/<class>/<images>"
            )
    given = Path(name).expanduser()
    if known is None and looks_like_path(name) and given.is_dir():
        raise UserError(
            f"dataset folder {given.resolve()} has no train/ and test/ folders: "
            f"a class-folder dataset is {given.resolve()}/{{train,test}}/<class>/<images>"
        )
    return None


def _is_image_file(entry: os.DirEntry) -> bool:
    """Skips hidden files (.DS_Store, macOS' ._name.jpg) and others (Thumbs.db, notes.txt)."""
    return entry.is_file() and not entry.name.startswith(".") and _suffix(entry.name) in IMAGE_SUFFIXES


def _suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()  # not Path(name).suffix: 60,000 Paths take seconds


def _scandir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise UserError(f"cannot list {folder} ({type(exc).__name__}: {exc.strerror or exc}): check its permissions") from None


def _list_class_folder(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names, and (path, label) of each image file."""
    classes = sorted(e.name for e in _scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        found = f"only one class folder ({classes[0]})" if classes else "no class folders"
        raise UserError(f"{split_dir} has {found}: a dataset needs at least 2 classes, as {split_dir}/<class>/<image files>")
    files = []
    for label, cls in enumerate(classes):
        entries = _scandir(split_dir / cls)
        for entry in entries:  # a dangling link named like an image: an error, not silently one image fewer
            named_like_an_image = not entry.name.startswith(".") and _suffix(entry.name) in IMAGE_SUFFIXES
            if named_like_an_image and entry.is_symlink() and not os.path.exists(entry.path):
                raise UserError(f"image {entry.path} is a broken symbolic link (to {os.readlink(entry.path)}): fix or remove it")
        names = sorted(entry.name for entry in entries if _is_image_file(entry))
        if not names:
            raise UserError(
                f"class folder {split_dir / cls} is empty (no {', '.join(sorted(IMAGE_SUFFIXES))} files): "
                "remove it or add its images"
            )
        folder = str(split_dir / cls)
        files.extend((os.path.join(folder, file_name), label) for file_name in names)
    return classes, files


def _composite_over_white(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C + 1) uint8 with alpha last -> (H, W, C) over a white background, rounded."""
    alpha = pixels[..., -1:].astype(np.uint32)
    colour = pixels[..., :-1].astype(np.uint32)
    return ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _gray_palette(img) -> bool:
    palette = img.getpalette()
    if not palette:
        return True
    rgb = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return bool(np.all(rgb == rgb[:, :1]))


def _to_uint8(img) -> tuple[np.ndarray, bool]:
    """One image as uint8 (H, W, 1) if grayscale or (H, W, 3) if colour, and whether it is
    colour, by the rules of the module docstring."""
    mode = img.mode
    transparent = "transparency" in img.info
    if mode == "L" and not transparent:
        return np.asarray(img)[..., None], False
    if mode == "RGB" and not transparent:
        return np.asarray(img), True
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.int64)  # I;16B is big-endian; astype reads it right
        return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)[..., None], False
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)[..., None], False
    if mode == "1":
        return np.asarray(img.convert("L"))[..., None], False
    if mode in ("P", "PA"):
        gray = _gray_palette(img)
        img = img.convert("RGBA" if mode == "PA" or transparent else "RGB")
        pixels = _composite_over_white(np.asarray(img)) if img.mode == "RGBA" else np.asarray(img)
        return (pixels[..., :1], False) if gray else (pixels, True)
    if mode in ("L", "LA", "La"):
        return _composite_over_white(np.asarray(img.convert("LA"))), False
    if mode in ("RGB", "RGBA", "RGBa"):
        return _composite_over_white(np.asarray(img.convert("RGBA"))), True
    return np.asarray(img.convert("RGB")), True  # CMYK, YCbCr, RGBX, HSV...; a ValueError if Pillow cannot


def _read_error(path: str, exc: BaseException) -> UserError:
    from PIL import Image

    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        what = f"is too large to decode safely ({' '.join(str(exc).split())})"
        return UserError(f"image {path} {what}: shrink or remove the file")
    if isinstance(exc, FileNotFoundError) and os.path.islink(path):
        return UserError(f"image {path} is a broken symbolic link (to {os.readlink(path)}): fix or remove it")
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return UserError(f"cannot read image {path} ({detail}): replace or remove the file")


def _common_size(counts: dict[tuple[int, int], int]) -> tuple[int, int]:
    """The most common (width, height); among tied sizes, the one of median area (the smaller
    of the two middle ones), so that neither the largest nor the smallest outlier decides."""
    top = max(counts.values())
    tied = sorted((w * h, (w, h)) for (w, h), count in counts.items() if count == top)
    return tied[(len(tied) - 1) // 2][1]


def _allocate(name: str, n: int, size: tuple[int, int], channels: int) -> np.ndarray:
    needed = n * size[0] * size[1] * channels
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    if memory and needed > 0.8 * memory:
        raise UserError(
            f"dataset '{name}': {n} images of {size[0]}x{size[1]} take {needed / 1e9:.1f} GB decoded, more than this "
            f"machine's memory ({memory / 1e9:.1f} GB) allows: resize the image files (to 256 px, say) first"
        )
    return np.empty((n, size[1], size[0], channels), dtype=np.uint8)


@dataclass
class _Decoded:
    images: np.ndarray
    sizes: dict[tuple[int, int], int]  # each image's own size -> how many
    resized: tuple[str, tuple[int, int]] | None  # an image resized, and its own size
    gray: int  # grayscale images (converted to RGB if the dataset turned out colour)
    gray_example: str | None


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the frame header of a baseline, extended or progressive
    8-bit JPEG of 1 or 3 components without an Adobe marker (whose colour transform Pillow reads
    its own way); None for any other file, which Pillow decodes."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker in (0xC0, 0xC1, 0xC2):
            if i + 10 > len(data):
                return None
            precision, components = data[i + 4], data[i + 9]
            height, width = int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height, components) if precision == 8 and components in (1, 3) else None
        if marker == 0xEE or marker in (0xD9, 0xDA) or (0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return None  # Adobe; the image's end or scan before a frame; lossless, arithmetic or hierarchical
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _decode_plain_jpeg(path: str, size: tuple[int, int]) -> np.ndarray | None:
    """The (H, W, 1 or 3) pixels of ``path`` if it is a JPEG file of ``size`` that
    :func:`_jpeg_header` accepts, by Pillow's JPEG decoder without Pillow's reading of the
    file's markers in Python (two thirds of a small image's decoding time): the same pixels as
    ``Image.open`` (tests/test_dataset_lies.py). None for any other file, or one that does not
    decode, which :func:`_decode_one` then reads (and names, if it cannot)."""
    from PIL import Image

    if _suffix(path) not in (".jpg", ".jpeg"):
        return None
    try:
        with open(path, "rb") as file:
            raw = file.read()
        header = _jpeg_header(raw)
        if header is None or header[:2] != size:
            return None
        mode = "RGB" if header[2] == 3 else "L"
        pixels = np.asarray(Image.frombytes(mode, size, raw, "jpeg", mode, ""))
    except (OSError, ValueError):
        return None
    return pixels.reshape(size[1], size[0], -1)


def _decode_pass(name: str, paths: list[str], size: tuple[int, int]) -> _Decoded:
    """Decode every image into an (N, H, W, C) array at ``size``. C starts at 1 and becomes 3
    at the first colour image (the grayscale images before it are copied to three channels,
    as Pillow's L -> RGB does)."""
    from PIL import Image

    width, height = size
    images = _allocate(name, len(paths), size, 1)
    sizes: dict[tuple[int, int], int] = {}
    resized, gray, gray_example = None, 0, None
    for i, path in enumerate(paths):
        pixels = _decode_plain_jpeg(path, size)
        if pixels is not None:  # L or RGB, of the size wanted
            sizes[size] = sizes.get(size, 0) + 1
            colour, own = pixels.shape[2] == 3, size
        else:
            pixels, colour, own = _decode_one(path, sizes)
        if colour and images.shape[3] == 1:
            coloured = _allocate(name, len(paths), size, 3)
            coloured[:i] = images[:i]
            images = coloured
        if not colour:
            gray += 1
            gray_example = gray_example or path
        if own != size:
            image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
            pixels = np.asarray(image.resize(size, Image.BILINEAR)).reshape(height, width, -1)
            resized = resized or (path, own)
        images[i] = pixels  # (H, W, 1) broadcasts to the three channels of a colour dataset
    return _Decoded(images, sizes, resized, gray, gray_example)


def _decode_one(path: str, sizes: dict[tuple[int, int], int]) -> tuple[np.ndarray, bool, tuple[int, int]]:
    """One image by Pillow: (pixels (H, W, 1 or 3) at its own size, whether it is colour, its
    own size), counted in ``sizes``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            own = img.size
            sizes[own] = sizes.get(own, 0) + 1
            pixels, colour = _to_uint8(img)
            return pixels, colour, own
    except Exception as exc:  # noqa: BLE001  whatever a file does to a decoder, name the file
        raise _read_error(path, exc) from None


def _decode_images(name: str, paths: list[str]) -> np.ndarray:
    """All ``paths`` as one uint8 (N, H, W, C) array, by the rules of the module docstring."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over MAX_IMAGE_PIXELS: refused, not decoded
        sample: dict[tuple[int, int], int] = {}  # a first guess of the common size, from a few headers
        for index in sorted(set(np.linspace(0, len(paths) - 1, min(len(paths), 25)).astype(int).tolist())):
            try:
                with Image.open(paths[index]) as img:
                    sample[img.size] = sample.get(img.size, 0) + 1
            except Exception as exc:  # noqa: BLE001
                raise _read_error(paths[index], exc) from None
        decoded = _decode_pass(name, paths, _common_size(sample))
        size = _common_size(decoded.sizes)
        if size != decoded.images.shape[2:0:-1]:  # the sample misled: decode again at the right size
            decoded = _decode_pass(name, paths, size)
    n = len(paths)
    if decoded.resized is not None:
        example, own = decoded.resized
        warn(
            f"dataset '{name}': {n - decoded.sizes[size]} of {n} images are not {size[0]}x{size[1]}, the most common "
            f"size, and were resized to it (e.g. {example}, {own[0]}x{own[1]}); resize the files to choose another size"
        )
    if decoded.images.shape[3] == 3 and decoded.gray:
        warn(
            f"dataset '{name}': {decoded.gray} of {n} images are grayscale (e.g. {decoded.gray_example}) "
            "and were converted to RGB, as the others are colour"
        )
    return decoded.images


def load_class_folders(name: str, folder: Path) -> Dataset:
    """``folder/{train,test}/<class>/<images>``; colour, bit depth and size by the rules of the
    module docstring, decided over the train and test images together."""
    train_classes, train_files = _list_class_folder(folder / "train")
    test_classes, test_files = _list_class_folder(folder / "test")
    if train_classes != test_classes:
        raise UserError(
            f"{folder}: train and test have different class folders "
            f"({sorted(set(train_classes) ^ set(test_classes))}): make them match"
        )
    files = train_files + test_files
    images = _decode_images(name, [path for path, _ in files])
    labels = np.fromiter((label for _, label in files), dtype=np.int64, count=len(files))
    n = len(train_files)
    return Dataset(name, train_classes, ImageArrays(images[:n], labels[:n]), ImageArrays(images[n:], labels[n:]))


def _svhn_from_mat(path: Path) -> ImageArrays:
    """Read an SVHN ``*_32x32.mat`` as torchvision does, minus its MD5 check (so that any
    valid file in the official format loads, not just the exact official bytes)."""
    import scipy.io

    mat = scipy.io.loadmat(str(path))
    labels = mat["y"].astype(np.int64).squeeze(1)
    labels[labels == 10] = 0  # SVHN writes digit 0 as label 10
    return ImageArrays(np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2)), labels)


def _arrays(images, labels) -> ImageArrays:
    return ImageArrays(np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64))


def _read_mnist(root: Path, train: bool, download: bool) -> ImageArrays:
    import torchvision.datasets as tvd

    split = tvd.MNIST(str(root), train=train, download=download)
    return _arrays(split.data.numpy()[..., None], split.targets.numpy())


def _read_cifar10(root: Path, train: bool, download: bool) -> ImageArrays:
    import torchvision.datasets as tvd

    split = tvd.CIFAR10(str(root), train=train, download=download)
    return _arrays(split.data, split.targets)


def _read_svhn(root: Path, train: bool, download: bool) -> ImageArrays:
    import torchvision.datasets as tvd

    split_name = "train" if train else "test"
    if not download:
        return _svhn_from_mat(root / "svhn" / f"{split_name}_32x32.mat")
    split = tvd.SVHN(str(root / "svhn"), split=split_name, download=True)
    return _arrays(split.data.transpose(0, 2, 3, 1), split.labels)  # from (N, 3, H, W); label 10 already mapped to 0


@dataclass(frozen=True)
class TorchvisionDataset:
    """What tltune knows of a dataset torchvision downloads."""

    classes: tuple[str, ...]
    channels: int
    image_size: int
    local: str  # the folder under the data root that holds a downloaded (or copied) copy
    layout: str  # what the data root holds, for error messages ({root}: the data root)
    read_split: Callable[[Path, bool, bool], ImageArrays]  # (data root, train split?, download?)
    # Where a class-folder copy under the data root is looked for first; None: <root>/<name>
    # or <name> as a path, as for any dataset.
    class_folders: tuple[str, ...] | None = None


DIGITS = tuple(str(d) for d in range(10))
TORCHVISION_DATASETS = {
    "cifar10": TorchvisionDataset(
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        channels=3,
        image_size=32,
        local="cifar-10-batches-py",
        layout="{root}/cifar-10-batches-py/ or {root}/cifar10/{{train,test}}/<class>/*.jpg",
        read_split=_read_cifar10,
        class_folders=("cifar10", "CIFAR10"),
    ),
    "mnist": TorchvisionDataset(
        classes=DIGITS,
        channels=1,
        image_size=28,
        local="MNIST/raw",
        layout="{root}/MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte",
        read_split=_read_mnist,
    ),
    "svhn": TorchvisionDataset(
        classes=DIGITS,
        channels=3,
        image_size=32,
        local="svhn",
        layout="{root}/svhn/{{train,test}}_32x32.mat",
        read_split=_read_svhn,
    ),
}
if {name: (d.channels, d.image_size) for name, d in TORCHVISION_DATASETS.items()} != DATASET_SHAPES:
    raise RuntimeError("tltune.catalog.DATASET_SHAPES and tltune.data.TORCHVISION_DATASETS disagree")


def load_torchvision(name: str, root: Path, local: Path | None) -> Dataset:
    """Read the local copy at ``local``; without one, download with torchvision (needs internet)."""
    known = TORCHVISION_DATASETS[name]
    if local is not None:
        try:
            splits = [known.read_split(root, train, False) for train in (True, False)]
        except Exception as exc:  # a truncated IDX file, a corrupt .mat, a missing batch file...
            raise UserError(
                f"dataset '{name}' under {local} is incomplete or corrupt ({type(exc).__name__}: {exc}): "
                f"delete it and download or copy it again (expected layout: {known.layout.format(root=root)})"
            ) from None
    else:
        existing = set(root.iterdir())
        try:
            splits = [known.read_split(root, train, True) for train in (True, False)]
        except Exception as exc:  # URLError, OSError, checksum RuntimeError...
            for path in set(root.iterdir()) - existing:  # the folders and partial files of the failed download
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            raise UserError(
                f"dataset '{name}' is not under {root} and could not be downloaded "
                f"({type(exc).__name__}: {exc}). When offline, pass --data-root DIR "
                f"(or set TLTUNE_DATA_ROOT) to a folder holding {known.layout.format(root=root)}"
            ) from None
    return Dataset(name, list(known.classes), *splits)


# ---------------------------------------------------------------------------- disk cache


def _source_signature(source: Path) -> str:
    """Cheap fingerprint of the source files, so an edited dataset is decoded again."""
    parts = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for file_name in sorted(f for f in filenames if not f.startswith(".")):
            path = os.path.join(dirpath, file_name)
            try:
                stat = os.stat(path)
            except OSError:  # a broken symbolic link (reported when the images are listed), a file just removed
                try:
                    stat = os.lstat(path)
                except OSError:
                    continue
            parts.append(f"{path}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _source_of(name: str, root: Path) -> tuple[str, Path | None]:
    """('folder', path) for class-folder data, ('torchvision', path or None) otherwise."""
    folder = _find_class_folder_root(name, root)
    if folder is not None:
        return "folder", folder
    if not root.is_dir():
        raise UserError(
            f"data root {root} {'is not a folder' if root.exists() else 'does not exist'}: pass --data-root DIR "
            "(or set TLTUNE_DATA_ROOT) to the folder holding the datasets, or create it to download mnist, cifar10 or svhn into it"
        )
    if name in TORCHVISION_DATASETS:
        local = root / TORCHVISION_DATASETS[name].local
        return "torchvision", local if local.is_dir() and any(local.iterdir()) else None
    raise UserError(
        f"unknown dataset '{name}': use one of {', '.join(TORCHVISION_DATASETS)}, "
        f"or a class-folder dataset at {root}/{name}/{{train,test}}/<class>/<images> (or a path to one)"
    )


def dataset_on_disk(name: str, data_root: str | Path | None = None) -> bool:
    """Whether ``name`` loads from ``data_root`` without a download."""
    try:
        return _source_of(name, resolve_data_root(str(data_root) if data_root else None))[1] is not None
    except UserError:
        return False


def _save_cache(dataset: Dataset, target: Path) -> None:
    """One ``.npy`` per array, then meta.json with their shapes and dtypes: a cache folder
    without meta.json is incomplete (its writer was killed, or is still writing)."""
    arrays = {f"{split}_{part}": getattr(getattr(dataset, split), part) for split, part in CACHE_ARRAYS}
    for file_name, array in arrays.items():
        atomic_write(target / f"{file_name}.npy", lambda f, array=array: np.save(f, array, allow_pickle=False))
    meta = {
        "version": CACHE_VERSION,
        "name": dataset.name,
        "classes": dataset.classes,
        "arrays": {file_name: {"shape": a.shape, "dtype": a.dtype.str} for file_name, a in arrays.items()},
    }
    atomic_write(target / "meta.json", lambda f: f.write(json.dumps(meta).encode()))


def _load_cache(target: Path) -> Dataset:
    """Raises DamagedCache when a file is unreadable or differs from what meta.json recorded."""
    meta_path = target / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION:
            raise ValueError(f"cache version {meta.get('version')}, expected {CACHE_VERSION}")
        name, classes = meta["name"], meta["classes"]
        recorded = {}  # (split, part) -> (shape, dtype)
        for split, part in CACHE_ARRAYS:
            record = meta["arrays"][f"{split}_{part}"]
            recorded[split, part] = (tuple(record["shape"]), np.dtype(record["dtype"]))
        for split in ("train", "test"):  # the record itself must be consistent
            if recorded[split, "images"][0][:1] != recorded[split, "labels"][0][:1]:
                raise ValueError(f"{split} images and labels recorded with different lengths")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedCache(meta_path, exc) from None
    arrays = {key: load_npy(target / f"{key[0]}_{key[1]}.npy", *recorded[key]) for key in CACHE_ARRAYS}
    splits = [ImageArrays(arrays[split, "images"], arrays[split, "labels"]) for split in ("train", "test")]
    return Dataset(name, classes, *splits)


def load_dataset(name: str, data_root: str | Path | None = None, use_cache: bool = True) -> Dataset:
    """Load ``name`` (cifar10, mnist, svhn, or a class-folder dataset) from ``data_root``.

    The decoded arrays are cached under ``$TLTUNE_CACHE_DIR`` (default ``~/.cache/tltune``),
    keyed by the source files' names, sizes and mtimes.
    """
    root = resolve_data_root(str(data_root) if data_root else None)
    kind, source = _source_of(name, root)
    key = None
    if use_cache and source is not None:
        fingerprint = f"v{CACHE_VERSION}|{name}|{kind}|{source}|{_source_signature(source)}"
        key = cache_dir() / "datasets" / f"{Path(name).name}-{hashlib.sha1(fingerprint.encode()).hexdigest()[:16]}"
        if (cached := _read_cache(key)) is not None:
            return cached
        with _decoding_lock(key, name):  # another sweep on this machine may be decoding it: wait, then read its cache
            if (cached := _read_cache(key)) is not None:
                return cached
            return _decode_and_cache(name, root, kind, source, key)
    return _decode_and_cache(name, root, kind, source, None)


def _read_cache(key: Path) -> Dataset | None:
    """The dataset cached under ``key``; None if there is none, or it was damaged (and is removed)."""
    if not (key / "meta.json").exists():
        return None
    try:
        return _load_cache(key)
    except DamagedCache as exc:
        signals.raise_if_stopped()  # the error may be a stop signal's, replaced by numpy: the cache is fine
        warn(f"dataset cache {exc.path} was damaged ({exc}); rebuilding it")
        shutil.rmtree(key, ignore_errors=True)
        return None


@contextlib.contextmanager
def _decoding_lock(key: Path, name: str) -> Iterator[None]:
    """Held while this process decodes into cache ``key``, so that sweeps started together on
    one machine (or the tests' parallel workers) decode a dataset once, not once each. Where
    the cache's folder cannot hold a lock, each process decodes on its own."""
    try:
        import fcntl

        folder = cache_dir() / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"dataset-{key.name}.lock", "a+")
    except (ImportError, OSError):  # no fcntl (Windows), or a read-only cache folder
        yield
        return
    with lock:  # closing the file releases the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{name}: another process on this machine is decoding it; waiting to read its cache", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass  # a file system without locks
        yield


def _decode_and_cache(name: str, root: Path, kind: str, source: Path | None, key: Path | None) -> Dataset:
    dataset = load_class_folders(name, source) if kind == "folder" else load_torchvision(name, root, source)
    if len(dataset.train) == 0 or len(dataset.test) == 0:
        raise UserError(f"dataset '{name}' under {root} has an empty train or test split")
    if key is not None:
        try:
            _save_cache(dataset, key)
        except OSError as exc:
            warn(f"could not cache dataset '{name}' in {key.parent}: {exc}")
    return dataset


# ---------------------------------------------------------------------------- splits


def make_splits(
    dataset: Dataset,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> Splits:
    """Carve a validation split from train with a fixed seed; optionally take subsets.

    The validation split does not depend on ``train_subset``, so runs with different
    subset sizes are validated on the same images.
    """
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset.train))
    n_val = max(1, int(round(len(order) * val_fraction)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if train_subset is not None:
        if train_subset < 1:
            raise UserError(f"--train-subset must be at least 1, got {train_subset}")
        train_idx = train_idx[:train_subset]
        val_idx = val_idx[: max(1, train_subset // 4)]  # a random sample of the same validation images
    if len(train_idx) == 0 or len(val_idx) == 0:
        subset = f" and --train-subset {train_subset}" if train_subset is not None else ""
        raise UserError(
            f"'{dataset.name}' has {len(order)} training images: with --val-fraction {val_fraction}{subset}, "
            f"{len(train_idx)} are left for training and {len(val_idx)} for validation; "
            "both need at least one (lower --val-fraction)"
        )
    test = dataset.test
    if test_subset is not None:
        if test_subset < 1:
            raise UserError(f"--test-subset must be at least 1, got {test_subset}")
        test = test.subset(np.sort(rng.permutation(len(test))[:test_subset]))
    train = dataset.train.subset(np.sort(train_idx))
    mean, std = guard_constant_channels(dataset.name, len(train), *channel_stats(train.images))
    return Splits(
        dataset.name,
        dataset.classes,
        train,
        dataset.train.subset(np.sort(val_idx)),
        test,
        mean,
        std,
    )


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 (N, H, W, C) images, from each channel's
    histogram of the 256 values: exact, in chunks (little memory), and 14x faster than summing
    the pixels as floats (bench/data_stats.py)."""
    channels = images.shape[-1]
    counts = np.zeros((channels, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, channels)
        for c in range(channels):
            counts[c] += np.bincount(block[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64)
    count = counts.sum(1)
    mean = counts @ values / count
    std = np.sqrt(np.maximum(counts @ values**2 / count - mean**2, 0.0))
    return tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in std)


def channel_names(channels: int) -> list[str]:
    return {1: ["L"], 3: ["R", "G", "B"]}.get(channels, [str(c) for c in range(channels)])


def guard_constant_channels(name: str, n_images: int, mean: tuple[float, ...], std: tuple[float, ...]):
    """(mean, std) with the std of a constant channel (below ``MIN_STD``) set to 1, so that the
    channel is centred (to 0 on the training images) and never divided by 0; a warning names it.
    A UserError when every channel is constant: the training images are one flat colour, and
    nothing can be learnt from them."""
    constant = [c for c, s in enumerate(std) if not s >= MIN_STD]  # `not >=`: a NaN std is constant too
    if not constant:
        return mean, std
    names = channel_names(len(std))
    described = ", ".join(f"{names[c]} (always {mean[c] * 255:.0f})" for c in constant)
    which = "channel" if len(constant) == 1 else "channels"
    described += " is" if len(constant) == 1 else " are"
    if len(constant) == len(std):
        raise UserError(
            f"dataset '{name}': {which} {described} constant (std 0) in the {n_images} training images: "
            "they are one flat colour, with nothing to learn from; check the image files (and --train-subset)"
        )
    warn(
        f"dataset '{name}': {which} {described} constant (std 0) in the {n_images} training images: "
        "normalised by a std of 1 instead (centred only), so it adds nothing to learn from"
    )
    return mean, tuple(1.0 if c in constant else s for c, s in enumerate(std))


# ---------------------------------------------------------------------------- batches


LUMA = (0.299, 0.587, 0.114)  # RGB -> grayscale, ITU-R 601


class BatchTransform:
    """uint8 (B, H, W, C) -> normalised float (B, channels, size, size), on the batch's device:
    callers move the uint8 batch (a quarter of float32's bytes) and conversion, resizing and
    normalisation run there. ``memory_format``: the output's (channels_last for conv models);
    None leaves the layout the operations produce."""

    def __init__(self, channels: int, size: int, mean, std, memory_format: torch.memory_format | None = None):
        self.channels = channels
        self.size = size
        self.mean = torch.nan_to_num(torch.tensor(mean, dtype=torch.float32), nan=0.0).view(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32)
        # A constant channel's std (0, or NaN) would give NaN or inf: the channel is centred only.
        self.std = torch.where(std >= MIN_STD, std, torch.ones_like(std)).view(1, -1, 1, 1)
        self.memory_format = memory_format
        self._constants: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # copied to a device once, not per batch

    def constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, luma weights) on ``device``."""
        if device not in self._constants:
            luma = torch.tensor(LUMA).view(1, 3, 1, 1)
            self._constants[device] = tuple(t.to(device) for t in (self.mean, self.std, luma))
        return self._constants[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean, std, luma = self.constants(images.device)
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:  # grayscale -> RGB
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:  # RGB -> grayscale
                x = (x * luma).sum(1, keepdim=True)
            else:
                raise ValueError(f"cannot convert {x.shape[1]} channels to {self.channels}")
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if mean.shape[1] != x.shape[1]:  # stats of a 1-channel dataset fed to a 3-channel model
            mean, std = mean.expand(1, x.shape[1], 1, 1), std.expand(1, x.shape[1], 1, 1)
        x = (x - mean) / std
        return x if self.memory_format is None else x.contiguous(memory_format=self.memory_format)


class FeatureTransform:
    """Cached float16 backbone features (tltune.features) -> float32 on the batch's device:
    the transform that feeds a head trained on them."""

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features.float()


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch on ``device``; from the host to a GPU through pinned memory, without blocking
    the host (the copy overlaps the GPU's work on earlier batches)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    # pin_memory() copies into a page-locked buffer of PyTorch's caching host allocator,
    # which keeps the buffer until the asynchronous copy has finished.
    return tensor.pin_memory().to(device, non_blocking=True)


def as_tensors(arrays: ImageArrays, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors over the arrays without copying on CPU (arrays from Ray's object store are
    read-only). A GPU gets the whole split as uint8 in one plain copy: nothing runs beside a
    one-off copy to overlap it with, and pinning a whole split would hold that much page-locked
    host memory for the life of the process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        images, labels = torch.from_numpy(arrays.images), torch.from_numpy(arrays.labels)
    return images.to(device), labels.to(device)


def iterate_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool, generator=None):
    """Yield (images, labels) batches by indexing whole tensors: no per-sample Python work."""
    n = len(labels)
    # Drawn on the host (the generator is a CPU one), copied to the images' device once per epoch.
    order = torch.randperm(n, generator=generator).to(images.device) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            yield images[start : start + batch_size], labels[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield images[idx], labels[idx]
