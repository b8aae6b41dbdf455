"""Datasets whose files disagree with each other or with what they claim (issue 20, item 4):
each is either decoded by one documented rule (tltune.data's docstring) or refused with one
line naming the file, the folder or the flag."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_class_folders
from tltune.data import BatchTransform, Dataset, ImageArrays, load_dataset, make_splits
from tltune.errors import UserError
from tltune.options import SweepOptions
from tltune.specs import MAX_IMAGE_SIZE, check_image_size


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def replace_first(root, split="train", cls="cat"):
    """The path of the first image of a class, removed, to be written again by the test."""
    path = root / split / cls / "0000.png"
    path.unlink()
    return path


# ---------------------------------------------------------------------------- colour and bit depth


def test_16_bit_grayscale_png_keeps_its_range(tmp_path):
    root = tmp_path / "depth"
    for split in ("train", "test"):
        for cls, level in (("dark", 4095), ("bright", 65535)):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                values = np.full((6, 6), level, dtype=np.uint16)
                values[0, 0] = 256 * i  # 0, 256, 512: 8-bit 0, 1, 2
                Image.fromarray(values).save(root / split / cls / f"{i}.png")
    assert Image.open(root / "train" / "dark" / "0.png").mode == "I;16"
    ds = load_dataset("depth", tmp_path)
    assert ds.train.images.shape == (6, 6, 6, 1)
    bright, dark = ds.train.images[:3], ds.train.images[3:]  # classes sorted: bright, dark
    assert (bright[:, 1:, 1:] == 255).all() and (dark[:, 1:, 1:] == 15).all()  # 65535 >> 8, 4095 >> 8: not all 255
    assert dark[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_16_bit_big_endian_and_float_tiffs(tmp_path):
    root = write_class_folders(tmp_path / "tiffs", mode="L", size=(5, 4))
    values = np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000
    Image.fromarray(values.astype(">u2")).save(root / "train" / "cat" / "x16.tif")
    assert Image.open(root / "train" / "cat" / "x16.tif").mode == "I;16B"
    Image.fromarray((values / 65535).astype(np.float32)).save(root / "train" / "dog" / "xf.tif")
    ds = load_dataset("tiffs", tmp_path)
    cats = ds.train.images[ds.train.labels == 0]
    dogs = ds.train.images[ds.train.labels == 1]
    assert np.array_equal(cats[-1, ..., 0], (values >> 8).astype(np.uint8))
    assert np.abs(dogs[-1, ..., 0].astype(int) - np.rint(values / 65535 * 255)).max() <= 1


def test_palette_png_is_colour_and_a_gray_palette_is_grayscale(tmp_path):
    root = write_class_folders(tmp_path / "pal", mode="L", size=(4, 4))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    palette.save(replace_first(root))
    ds = load_dataset("pal", tmp_path)
    assert ds.channels == 3, "one colour image makes the dataset RGB"
    assert ds.train.images[0].reshape(-1, 3).tolist() == [[255, 0, 0]] * 16
    gray_dog = ds.train.images[ds.train.labels == 1][0]
    assert (gray_dog[..., 0] == gray_dog[..., 1]).all() and (gray_dog[..., 1] == gray_dog[..., 2]).all()

    gray_root = write_class_folders(tmp_path / "graypal", mode="L", size=(4, 4))
    Image.new("L", (4, 4), 77).convert("P").save(replace_first(gray_root))
    gray = load_dataset("graypal", tmp_path)
    assert gray.channels == 1 and (gray.train.images[0] == 77).all()


def test_mixed_colour_warns_once_counting_the_grayscale_images(tmp_path, capsys):
    root = write_class_folders(tmp_path / "mixed", size=(4, 4))
    Image.new("L", (4, 4), 200).save(replace_first(root))
    Image.new("L", (4, 4), 50).save(replace_first(root, "test", "dog"))
    ds = load_dataset("mixed", tmp_path)
    assert ds.channels == 3 and (ds.train.images[0] == 200).all() and (ds.test.images[6] == 50).all()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "grayscale" in line]
    assert len(warnings) == 1 and "2 of 24 images are grayscale" in warnings[0] and "0000.png" in warnings[0]


def test_grayscale_before_the_first_colour_image_is_kept(tmp_path):
    """The dataset turns RGB at its first colour image, after grayscale ones were decoded."""
    root = write_class_folders(tmp_path / "late", mode="L", size=(4, 4))
    before = load_dataset("late", tmp_path)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(replace_first(root, "test", "dog"))
    after = load_dataset("late", tmp_path)
    assert after.channels == 3
    assert np.array_equal(after.train.images, np.repeat(before.train.images, 3, axis=3))
    assert after.test.images[6].reshape(-1, 3).tolist() == [[10, 20, 30]] * 16


def test_rgba_and_la_are_composited_over_white(tmp_path):
    root = write_class_folders(tmp_path / "alpha", size=(4, 4))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0] = (255, 0, 0, 255)  # opaque red
    rgba[1] = (0, 0, 0, 0)  # transparent (black underneath): white
    rgba[2] = (0, 0, 255, 128)  # half blue
    Image.fromarray(rgba, "RGBA").save(replace_first(root))
    Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 0, np.uint8)]), "LA").save(replace_first(root, "train", "dog"))
    ds = load_dataset("alpha", tmp_path)
    cat = ds.train.images[0]
    assert cat[0, 0].tolist() == [255, 0, 0] and cat[1, 0].tolist() == [255, 255, 255]
    assert cat[2, 0].tolist() == [127, 127, 255]
    assert (ds.train.images[6] == 255).all(), "a fully transparent LA image is white"


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    root = write_class_folders(tmp_path / "print", size=(8, 8))
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(replace_first(root).with_suffix(".jpg"))
    ds = load_dataset("print", tmp_path)
    cats = ds.train.images[ds.train.labels == 0]
    red = cats[0].reshape(-1, 3).astype(int).mean(0)  # the .jpg sorts first
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


# ---------------------------------------------------------------------------- sizes


def test_one_large_image_does_not_decide_the_size(tmp_path, capsys):
    root = write_class_folders(tmp_path / "sizes", size=(12, 10))
    Image.new("RGB", (1200, 1200), (0, 255, 0)).save(replace_first(root))  # the first image of all
    Image.new("RGB", (6, 5), (0, 0, 255)).save(replace_first(root, "test", "cat"))
    ds = load_dataset("sizes", tmp_path)
    assert ds.train.images.shape == (12, 10, 12, 3) and ds.test.images.shape == (12, 10, 12, 3)
    assert ds.train.images[0].reshape(-1, 3).tolist() == [[0, 255, 0]] * 120
    assert ds.test.images[0].reshape(-1, 3).tolist() == [[0, 0, 255]] * 120
    warnings = [line for line in capsys.readouterr().err.splitlines() if "resized" in line]
    assert len(warnings) == 1
    assert "2 of 24 images are not 12x10, the most common size" in warnings[0] and "1200x1200" in warnings[0]


def test_the_most_common_size_wins_even_when_the_sample_misleads(tmp_path, capsys):
    """The images whose headers guess the size (25, evenly spread: the first, the last...) are
    8x8, the other 95 are 9x7: the guess is wrong, and 9x7 wins all the same."""
    root = write_class_folders(tmp_path / "mostly", per_class=30, size=(8, 8))
    files = [root / split / cls / f"{i:04d}.png" for split in ("train", "test") for cls in ("cat", "dog") for i in range(30)]
    sampled = set(np.linspace(0, len(files) - 1, 25).astype(int).tolist())
    for index, path in enumerate(files):
        if index not in sampled:
            Image.new("L", (9, 7), 9).save(path)
    ds = load_dataset("mostly", tmp_path)
    assert ds.train.images.shape[1:] == (7, 9, 3) and (ds.train.images[1] == 9).all()
    assert "25 of 120 images are not 9x7" in capsys.readouterr().err


def test_all_sizes_different_take_the_median_area_not_the_largest(tmp_path):
    root = tmp_path / "unique"
    sizes = iter([(4, 4), (5, 5), (6, 6), (40, 40), (7, 7), (8, 8), (9, 9), (500, 500)])
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", next(sizes)).save(root / split / cls / f"{i}.png")
    assert load_dataset("unique", tmp_path).train.images.shape[1:3] == (7, 7)  # the lower median of 8 areas


# ---------------------------------------------------------------------------- files that cannot be decoded


def test_broken_symlink_is_named(tmp_path):
    root = write_class_folders(tmp_path / "links")
    os.symlink(tmp_path / "moved" / "0007.png", root / "train" / "dog" / "0007.png")
    with pytest.raises(UserError, match=r"image .*dog/0007.png is a broken symbolic link \(to .*moved/0007.png\)") as error:
        load_dataset("links", tmp_path)
    one_line(error)


def test_symlinked_images_are_followed(tmp_path):
    root = write_class_folders(tmp_path / "real")
    linked = tmp_path / "linked"
    for path in root.rglob("*.png"):
        target = linked / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path, target)
    assert np.array_equal(load_dataset("linked", tmp_path).train.images, load_dataset("real", tmp_path).train.images)


@pytest.mark.parametrize("limit", [200, 125])  # 256 pixels over the limit: Pillow warns; over twice the limit: it raises
def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch, limit):
    root = write_class_folders(tmp_path / "bombs", size=(12, 10))  # 120 pixels
    Image.new("RGB", (16, 16)).save(root / "test" / "dog" / "bomb.png")  # 256 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(UserError, match=r"image .*dog/bomb.png is too large to decode safely .*: shrink or remove") as error:
        load_dataset("bombs", tmp_path, use_cache=False)
    one_line(error)


def test_truncated_image_is_named(tmp_path):
    root = write_class_folders(tmp_path / "cut", size=(64, 64))
    path = root / "train" / "dog" / "0003.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"cannot read image .*dog/0003.png .*replace or remove") as error:
        load_dataset("cut", tmp_path)
    one_line(error)


# ---------------------------------------------------------------------------- dataset folders


@pytest.mark.parametrize("missing", ["test", "train"])
def test_dataset_folder_without_test_or_train_names_it(tmp_path, missing):
    root = write_class_folders(tmp_path / "half")
    import shutil

    shutil.rmtree(root / missing)
    for name, data_root in (("half", tmp_path), (str(root), tmp_path / "no-such-root")):
        with pytest.raises(UserError, match=f"has a .*/ folder but no {missing}/ folder") as error:
            load_dataset(name, data_root)
        assert "does not exist" not in one_line(error) and str(root) in str(error.value)


def test_dataset_path_without_either_folder_names_it(tmp_path):
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="has no train/ and test/ folders") as error:
        load_dataset(str(tmp_path / "flat"), tmp_path / "no-such-root")
    one_line(error)


# ---------------------------------------------------------------------------- normalisation


def rgb_dataset(blue=None, n=8):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    if blue is not None:
        images[..., 2] = blue
    arrays = ImageArrays(images, np.arange(n) % 2)
    return Dataset("flatblue", ["a", "b"], arrays, arrays)


def test_constant_channel_is_named_and_never_gives_nan(capsys):
    splits = make_splits(rgb_dataset(blue=0), val_fraction=0.25)
    err = capsys.readouterr().err
    assert "dataset 'flatblue': channel B (always 0) is constant (std 0)" in err and len(err.splitlines()) == 1
    assert splits.std[2] == 1.0 and splits.std[0] > 0.2
    batch = torch.from_numpy(rgb_dataset(blue=0).test.images.copy())
    batch[0, ..., 2] = 255  # a test image where the channel is not constant
    out = BatchTransform(3, 4, splits.mean, splits.std)(batch)
    assert torch.isfinite(out).all() and (out[1:, 2] == 0).all()


def test_every_channel_constant_is_refused():
    arrays = ImageArrays(np.full((10, 4, 4, 1), 17, np.uint8), np.arange(10) % 2)
    with pytest.raises(UserError, match=r"dataset 'blank': channel L \(always 17\) is constant \(std 0\) in the 9 training images") as error:
        make_splits(Dataset("blank", ["a", "b"], arrays, arrays), val_fraction=0.1)
    one_line(error)


@pytest.mark.parametrize("std", [0.0, float("nan"), 1e-9])
def test_batch_transform_never_divides_by_a_zero_std(std):
    out = BatchTransform(3, 8, (0.5, 0.5, 0.5), (0.25, std, 0.25))(torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------- --image-size


def test_absurd_image_size_names_the_flag_and_the_maximum():
    check_image_size(None)
    check_image_size(224)
    check_image_size(MAX_IMAGE_SIZE)
    with pytest.raises(UserError, match=rf"--image-size 100000 is too large: use at most {MAX_IMAGE_SIZE}") as error:
        check_image_size(100000)
    assert "larger" not in one_line(error)
    with pytest.raises(UserError, match="image_size in spec.toml 4096"):
        check_image_size(4096, "image_size in spec.toml")
    with pytest.raises(UserError, match="--image-size 100000 is too large"):
        SweepOptions(image_size=100000)


# ---------------------------------------------------------------------------- plain JPEG files, decoded without Image.open


def write_jpeg_folders(root, size=(16, 12)):
    """A class-folder dataset of every kind of JPEG file, and a PNG: baseline and progressive
    colour, grayscale (a colour dataset's gray images), one of another size (resized), CMYK
    (Adobe-marked: left to Image.open)."""
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for label, cls in enumerate(("cat", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(7):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) // (label + 1)
                Image.fromarray(pixels).save(folder / f"{i}a.jpg", quality=90)
            Image.fromarray(pixels).save(folder / "b-progressive.jpeg", progressive=True)
            Image.fromarray(pixels[..., 0]).save(folder / "c-gray.JPG")
            Image.fromarray(pixels).resize((size[0] * 2, size[1])).save(folder / "d-wide.jpg")
            Image.new("CMYK", size, (0, 255, 255, 0)).save(folder / "e-cmyk.jpg")
            Image.fromarray(pixels).save(folder / "f.png")
    return root


@pytest.fixture
def both_ways(monkeypatch, capsys):
    """load(folder, ways) -> [(dataset, stderr) per way]: every file by Image.open ("image_open"),
    or as the loader does ("loader": plain JPEG files without Image.open); ``load.plain`` names
    the files the loader decoded without it."""
    from tltune import data

    real = data._decode_plain_jpeg

    def load(folder, ways=("image_open", "loader")):
        results = []
        for way in ways:
            def plain_jpeg(path, size):
                pixels = real(path, size) if way == "loader" else None
                if pixels is not None:
                    load.plain.append(path)
                return pixels

            with monkeypatch.context() as patch:
                patch.setattr(data, "_decode_plain_jpeg", plain_jpeg)
                results.append((data.load_class_folders(folder.name, folder), capsys.readouterr().err))
        return results

    load.plain = []
    return load


def test_plain_jpeg_files_decode_to_the_same_pixels_and_warnings_as_by_image_open(tmp_path, both_ways):
    (by_image_open, warned), (as_loaded, warned_loaded) = both_ways(write_jpeg_folders(tmp_path / "mixed"))
    for split in ("train", "test"):
        assert np.array_equal(getattr(by_image_open, split).images, getattr(as_loaded, split).images)
        assert np.array_equal(getattr(by_image_open, split).labels, getattr(as_loaded, split).labels)
    assert warned == warned_loaded and "c-gray.JPG" in warned and "d-wide.jpg" in warned
    assert sorted({os.path.basename(path) for path in both_ways.plain}) == [*(f"{i}a.jpg" for i in range(7)), "b-progressive.jpeg", "c-gray.JPG"]
    assert len(both_ways.plain) == 2 * 2 * 9, "the plain JPEG files of the common size, colour or gray; the rest by Image.open"


def test_a_damaged_plain_jpeg_is_named(tmp_path, both_ways):
    root = write_jpeg_folders(tmp_path / "cut")
    path = root / "train" / "dog" / "3a.jpg"
    path.write_bytes(path.read_bytes()[:-40])
    for way in ("image_open", "loader"):
        with pytest.raises(UserError, match=r"cannot read image .*dog/3a.jpg .*replace or remove") as error:
            both_ways(root, ways=[way])
        one_line(error)
    assert str(path) not in both_ways.plain, "a damaged file is left to Image.open, which names it"


def test_the_jpeg_header_reader_accepts_only_what_image_open_reads_alike(tmp_path):
    from io import BytesIO

    from tltune.data import _jpeg_header

    def saved(image, **options):
        out = BytesIO()
        image.save(out, **options)
        return out.getvalue()

    rgb = Image.new("RGB", (20, 10), (200, 10, 10))
    assert _jpeg_header(saved(rgb, format="JPEG")) == (20, 10, 3)
    assert _jpeg_header(saved(rgb, format="JPEG", progressive=True)) == (20, 10, 3)
    assert _jpeg_header(saved(rgb.convert("L"), format="JPEG")) == (20, 10, 1)
    assert _jpeg_header(saved(Image.new("CMYK", (20, 10)), format="JPEG")) is None  # 4 components (and Adobe)
    assert _jpeg_header(saved(rgb, format="PNG")) is None
    assert _jpeg_header(saved(rgb, format="JPEG")[:30]) is None, "cut before its frame header"
    assert _jpeg_header(b"") is None
