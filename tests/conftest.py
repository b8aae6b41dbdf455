import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Dataset caches and the run-signing key of the tests go to temporary folders, never the user's."""
    os.environ["TLTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("tltune-cache"))
    os.environ["TLTUNE_KEY_FILE"] = str(tmp_path_factory.mktemp("tltune-key") / "run-signing.key")  # nor ~/.config


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real MNIST and CIFAR-10 copies: $TLTUNE_DATA_ROOT, else unpacked from ../shared/data."""
    root = os.environ.get("TLTUNE_DATA_ROOT")
    if root and (Path(root) / "MNIST").is_dir():
        return Path(root)
    if (SHARED_DATA / "unpack").is_file():
        out = subprocess.run(["bash", str(SHARED_DATA / "unpack"), "/tmp/tltune-data"], check=True, capture_output=True, text=True)
        return Path(out.stdout.strip())
    pytest.skip("real datasets not available: set TLTUNE_DATA_ROOT or provide ../shared/data")


def write_class_folders(root: Path, classes=("cat", "dog"), per_class=6, size=(12, 10), mode="RGB") -> Path:
    """A tiny real class-folder dataset of PNG files: root/{train,test}/<class>/*.png."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                pixels = rng.integers(0, 100, shape, dtype=np.uint8) + 100 * label
                Image.fromarray(pixels.astype(np.uint8), mode).save(folder / f"{i:04d}.png")
    return root


def write_svhn_mat(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN ``*_32x32.mat`` in the real format: X (32, 32, 3, N) uint8, y (N, 1) with 10 for digit 0."""
    import scipy.io

    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    digits = rng.integers(0, 10, n)
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"X": X, "y": y})
    return X, digits


# One real MNIST sweep shared by the tests that read a finished run (the report, TensorBoard's
# HParams, the repeats, `tltune best` and `tltune report`), run once per session through the
# `tltune` command: two experiments (the CNN searches its activation, AlexNet feature extraction
# has none), ASHA with grace period 1, and --repeats 2.
MNIST_RUN_EXPERIMENTS = ("mnist-cnn", "mnist-alexnet-feature_extract")
MNIST_RUN_SAMPLES = 4


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory, real_data_root):
    import sys
    from types import SimpleNamespace

    tmp = tmp_path_factory.mktemp("mnist-run")
    argv = [
        sys.executable, "-m", "tltune", "sweep", "mnist", "--quick", "--experiments", *MNIST_RUN_EXPERIMENTS, "--weights", "none",
        "--num-samples", str(MNIST_RUN_SAMPLES), "--max-epochs", "2", "--grace-period", "1", "--repeats", "2",
        "--train-subset", "600", "--test-subset", "500", "--data-root", str(real_data_root), "--storage-path", str(tmp / "results"),
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = (tmp / "results").iterdir()
    return SimpleNamespace(run_dir=run_dir, stdout=out.stdout, stderr=out.stderr, argv=argv, tmp=tmp)


@pytest.fixture
def command(capsys):
    """``tltune ARGV...`` in this process (checks that end before Ray need no interpreter of their
    own): ``(exit code, stdout, stderr)``; the signal handlers the sweep installs are put back."""
    import signal

    from tltune.command import main
    from tltune.signals import STOP_SIGNALS

    def run(*argv: str) -> tuple[int, str, str]:
        handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        try:
            code = main(list(argv))
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
