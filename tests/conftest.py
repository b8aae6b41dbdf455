import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# Every process the suites start (sweep drivers, Ray's trial workers, Slurm jobs) imports tltune
# from the checkout, which no install compiled: with a machine's PYTHONDONTWRITEBYTECODE=1 each
# would compile its modules anew, 0.6 CPU-s a process here. They inherit this environment.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
# The suites run more busy processes than the machine has cores (xdist workers, sweeps, bench
# scripts): torch's OpenMP threads sleep at once when out of work instead of spinning on a core
# another process needs (tltune.openmp; set before this process or its children import torch).
# The watched sweep drops it, to see the command set it for its trials itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Dataset caches and the run-signing key of the tests go to temporary folders, never the user's.
    The cache is one for all pytest-xdist workers of a run (their common temporary folder), so that
    CIFAR-10 is decoded once (11 s of CPU), not once per worker; its writes are atomic."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tltune-cache"
    cache.mkdir(exist_ok=True)
    os.environ["TLTUNE_CACHE_DIR"] = str(cache)
    os.environ["TLTUNE_KEY_FILE"] = str(tmp_path_factory.mktemp("tltune-key") / "run-signing.key")  # nor ~/.config


@pytest.fixture(autouse=True)
def _signal_handlers_as_found():
    """A test that runs a command in-process (cli.main installs tltune's stop-signal handlers)
    leaves the next test the handlers it found."""
    found = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in found.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The real MNIST and CIFAR-10 copies: $TLTUNE_DATA_ROOT, else unpacked from ../shared/data."""
    root = os.environ.get("TLTUNE_DATA_ROOT")
    if root and (Path(root) / "MNIST").is_dir():
        return Path(root)
    if (SHARED_DATA / "unpack").is_file():
        from filelock import FileLock

        with FileLock("/tmp/tltune-data.lock"):  # one unpack at a time: the suites' xdist workers each ask
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


def write_slow_spec(folder: Path, name: str, *, epochs: int, num_samples: int, seconds_per_batch: float,
                    dataset: str = "mnist", in_features: int = 28 * 28, sleep_while: Path | None = None) -> Path:
    """A spec file (folder/slow.yaml) of one experiment whose model, the user factory
    folder/slownet.py, sleeps ``seconds_per_batch`` in each training step: its epochs take at
    least that long per batch on any machine, at no CPU cost, so a test can stop, kill or requeue
    a sweep part-way however fast the machine trains. The search varies ``hidden`` and ``lr``.
    With ``sleep_while``, it sleeps only while that file exists: the test decides when the rest
    of the sweep may train at full speed."""
    folder.mkdir(parents=True, exist_ok=True)
    sleeps = f"os.path.exists({str(sleep_while)!r})" if sleep_while else "True"
    (folder / "slownet.py").write_text(
        "import os\nimport time\n\nimport torch.nn as nn\n\n\n"
        "class SlowNet(nn.Module):\n"
        "    def __init__(self, num_classes, hidden):\n"
        "        super().__init__()\n"
        f"        self.net = nn.Sequential(nn.Flatten(), nn.Linear({in_features}, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n\n"
        "    def forward(self, x):\n"
        f"        if self.training and {sleeps}:\n"
        f"            time.sleep({seconds_per_batch})\n"
        "        return self.net(x)\n\n\n"
        "def build(num_classes, hidden=16):\n"
        "    return SlowNet(num_classes, hidden)\n"
    )  # fmt: skip
    spec = folder / "slow.yaml"
    spec.write_text(f"experiments:\n  - name: {name}\n    dataset: {dataset}\n    model: slownet:build\n    mode: scratch\n"
                    f"    reference: {{optimizer: adam, lr: 0.001, epochs: {epochs}, hidden: 16}}\n"
                    "    space:\n      hidden: {choice: [8, 16, 32]}\n      lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                    f"    num_samples: {num_samples}\n    repeats: 1\n")  # fmt: skip
    return spec


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
    """The session's real MNIST sweep (two experiments, ASHA, --repeats 2), read by many tests.
    Made through the Python entry point, ``tltune.run``, in this process (the command line's
    sweep is spec_run's, tests/test_spec_sweep.py), printing what the command line prints."""
    import contextlib
    import io
    import signal
    from types import SimpleNamespace

    import tltune

    tmp = tmp_path_factory.mktemp("mnist-run")
    handler = signal.getsignal(signal.SIGINT)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        run = tltune.run(list(MNIST_RUN_EXPERIMENTS), quick=True, weights="none", num_samples=MNIST_RUN_SAMPLES, max_epochs=2, grace_period=1,
                         repeats=2, train_subset=600, test_subset=500, data_root=str(real_data_root), storage_path=str(tmp / "results"),
                         quiet=False)  # fmt: skip
    (run_dir,) = (tmp / "results").iterdir()
    return SimpleNamespace(run=run, run_dir=run_dir, stdout=stdout.getvalue(), stderr=stderr.getvalue(), tmp=tmp,
                           handler_restored=signal.getsignal(signal.SIGINT) == handler)  # fmt: skip


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


@pytest.fixture(scope="session")
def failed_run(tmp_path_factory):
    """One real sweep (in this process) whose only trial fails each of its 2 tries: the CNN
    refuses a 2-pixel input inside the trial. The experiment is recorded as failed and Ray
    pickles the error into the trial's ``error.pkl`` (``error_pkl``: its path relative to
    ``exp_dir``); ``failure``: the message of the TrialsFailed the sweep raised. Read it, or
    change a copy."""
    import dataclasses
    from types import SimpleNamespace

    from test_trial_failures import tiny_splits
    from tltune.errors import TrialsFailed
    from tltune.experiments import EXPERIMENTS
    from tltune.options import parse
    from tltune.plan import experiment_settings
    from tltune.raytune import run_sweep
    from tltune.records import RunRecord
    from tltune.settings import SweepPlan

    run_dir = tmp_path_factory.mktemp("failed") / "run"
    experiment = EXPERIMENTS["mnist-cnn"]
    args = parse(["--num-samples", "1", "--max-epochs", "1", "--image-size", "2"])
    # one retry (the sweep's default is 2): enough to see that a retry fails the same way
    settings = {experiment.name: dataclasses.replace(experiment_settings(experiment, args), dataset="tiny", max_failures=1)}
    plan = SweepPlan(experiments=[experiment], settings=settings, splits={"tiny": tiny_splits()}, weights={},
                     pretrained_states={}, run_dir=str(run_dir), record=RunRecord(), source_run=None, address=None,
                     cpus_per_trial=1, gpus_per_trial=0)  # fmt: skip
    with pytest.raises(TrialsFailed) as failure:
        run_sweep(plan)
    exp_dir = run_dir / experiment.name
    (error_pkl,) = exp_dir.glob("*/error.pkl")
    return SimpleNamespace(run_dir=run_dir, exp_dir=exp_dir, error_pkl=error_pkl.relative_to(exp_dir).as_posix(), failure=str(failure.value))


# The trackers' environment variables: the session's watched sweep sets its own.
TRACKER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE",
               "WANDB_DISABLED", "WANDB_OFFLINE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DIR", "NETRC")  # fmt: skip
WATCHED_EXPERIMENT, WATCHED_SAMPLES = "mnist-cnn", 6


@pytest.fixture(scope="session")
def watched_sweep(tmp_path_factory, real_data_root):
    """One real MNIST sweep (6 trials of up to 3 epochs, ASHA with grace period 1) logged to a
    local MLflow store and to W&B offline (``--log-to mlflow wandb``), its Optuna journal read
    through Optuna every few tenths of a second while it runs. ``run_dir``; ``seen``: the trial
    states the study showed while the sweep ran, in order; ``exp``: the run read back through
    tltune.results; ``tmp``: where ``mlruns`` and ``wandb`` are; ``listening``: the local addresses
    the sweep's processes listened on while its trials ran (read as test_loopback.py reads them);
    ``wait_policies``: name -> OMP_WAIT_POLICY of those processes (None: unset)."""
    import sys
    import threading
    import time
    from types import SimpleNamespace

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from test_loopback import descendants, listening, openmp_wait_policies, socket_inodes
    from tltune.results import OPTUNA_JOURNAL, load_run

    tmp = tmp_path_factory.mktemp("watched")
    env = {k: v for k, v in os.environ.items() if k not in (*TRACKER_ENV, "RAY_ADDRESS", "OMP_WAIT_POLICY")}  # a local Ray
    env.update(MLFLOW_TRACKING_URI=f"file:{tmp}/mlruns", MLFLOW_ALLOW_FILE_STORE="true", WANDB_MODE="offline", WANDB_DIR=str(tmp))
    argv = [sys.executable, "-m", "tltune", "sweep", "mnist", "--quick", "--experiments", WATCHED_EXPERIMENT,
            "--num-samples", str(WATCHED_SAMPLES), "--max-epochs", "3", "--grace-period", "1", "--train-subset", "600",
            "--test-subset", "300", "--data-root", str(real_data_root), "--storage-path", str(tmp / "results"), "--name", "live",
            "--log-to", "mlflow", "wandb"]  # fmt: skip
    run_dir = tmp / "results" / "live"
    journal = run_dir / WATCHED_EXPERIMENT / OPTUNA_JOURNAL
    seen, listened, looked, wait_policies = [], [], 0.0, {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp, env=env) as sweep:
        stdout, stderr = [], []
        readers = [threading.Thread(target=lambda s=s, to=to: to.extend(s), daemon=True) for s, to in ((sweep.stdout, stdout), (sweep.stderr, stderr))]
        for reader in readers:
            reader.start()
        while sweep.poll() is None:
            if journal.is_file():
                try:
                    study = optuna.load_study(study_name=WATCHED_EXPERIMENT, storage=JournalStorage(JournalFileBackend(str(journal))))
                    seen.append({t.user_attrs["trial"]: t.state for t in study.trials})
                except KeyError:  # the study itself is not created yet
                    pass
            # trials running (GCS, raylet, agents and workers all up): five looks at the sockets, a second apart
            if len(listened) < 5 and time.monotonic() - looked >= 1 and any(run_dir.glob("*/*/result.json")):
                processes = descendants(sweep.pid)
                listened.append(listening(socket_inodes(processes)))
                wait_policies.update(openmp_wait_policies(processes))
                looked = time.monotonic()
            time.sleep(0.3)
        for reader in readers:
            reader.join(10)
    assert sweep.returncode == 0, "".join(stdout)[-3000:] + "".join(stderr)[-3000:]
    (exp,) = load_run(run_dir)
    return SimpleNamespace(tmp=tmp, run_dir=run_dir, seen=seen, exp=exp, stdout="".join(stdout), stderr="".join(stderr),
                           trials={t.name: t for t in exp.trials}, listening=listened, wait_policies=wait_policies)  # fmt: skip


# Both suites run their tests side by side (pytest-xdist, `--dist loadscope`: README's `-n 2`,
# the slow suite's `-n 3`): most of a sweep's wall time is one core importing, starting Ray or
# sleeping, and most other tests are single-threaded. Under --dist loadscope one worker runs
# each group below in order: the tests of a module (its module-scoped run is made once), of a
# session-scoped run, or of one thing of the machine; modules without a shared run are split into
# single tests. (xdist's own xdist_group marks are lost under pytest 9.) Groups start longest
# first, so that the short ones fill the end.
MNIST_RUN_READERS = ("test_api.py", "test_command.py", "test_compute.py", "test_fidelity.py", "test_report_end_to_end.py",
                     "test_report_runs.py", "test_tensorboard_hparams.py", "test_trust.py", "test_warm_start_damaged.py")  # fmt: skip
GROUPS = {
    "test_slurm.py": "slurm",  # one Slurm node: a second job would wait in the queue on the first's clock
    "test_fake_cluster.py": "ray-port-6379",  # the fake multi-node provider needs Ray's default port
    "test_live_study.py": "watched_sweep", "test_trackers.py": "watched_sweep", "test_loopback.py": "watched_sweep",  # conftest's session-scoped runs
    "test_redteam_files.py": "failed_run", "test_trial_failures.py": "failed_run",
    **{module: "mnist_run" for module in MNIST_RUN_READERS},
}  # fmt: skip
ONE_TEST_EACH = ("test_fault_suite.py", "test_precision.py", "test_cli.py", "test_data.py")
# Slow-suite modules by their groups' wall time in a slow-suite run here, longest first (Slurm
# 212 s, cluster 153 s, the fault chain 134 s, ... the trust module's interrupted run 40 s); the
# rest after them, as collected.
LONGEST_FIRST = ("test_slurm.py", "test_cluster.py", "test_fault_suite.py", "test_s3_storage_sweep.py", "test_sweep_end_to_end.py",
                 "test_transfer_chain.py", "test_full_disk.py", "test_fake_cluster.py", "test_time_budget.py",
                 "test_redteam_files.py", "test_trial_failures.py", "test_live_study.py", "test_trackers.py", "test_first_gpu_run.py",
                 "test_trust.py", "test_search_plus.py", "test_redteam_small.py", "test_precision.py")  # fmt: skip
# README's suite: the MNIST run's readers (the run, then about a minute of tests) and the spec-file sweep's module first.
DEFAULT_LONGEST_FIRST = ("test_trust.py", "test_spec_sweep.py")


def group_of(nodeid: str) -> str:
    module = nodeid.split("::")[0].rsplit("/", 1)[-1]
    return nodeid if module in ONE_TEST_EACH else GROUPS.get(module, module)


@pytest.hookimpl(trylast=True)  # after -m has deselected: the items are the suite's
def pytest_collection_modifyitems(config, items):
    slow_suite = any(item.get_closest_marker("slow") for item in items)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST if slow_suite else DEFAULT_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a run without it does not know
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # xdist's default queues the groups by their number of tests instead
    return GroupScheduling(config, log)
