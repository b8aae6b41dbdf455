"""A full disk (or quota) stops an experiment the way a signal does, and never cuts a saved state.

Tune saves its state in the driver's staging folder and uploads it to the run directory by
copying each file over the last one in place (pyarrow's ``copy_files``): on a full local disk
that left ``experiment_state-*.json`` cut short, the last good state lost and its signature
void (``--resume`` then called the run tampered with). Here the upload writes each file beside
its target and renames it over it, so every file of the run directory is whole: the state
tltune last signed. On an object store each file is one PUT, whole or absent, and Ray's own
upload stays.

The first "no space left" — a trial persisting its checkpoint, this upload, a callback's
write — stops the experiment through Tune's own stop (SIGUSR1: it ends the trials and saves
what it can), and :class:`~tltune.errors.StorageFull` is raised when the sweep has stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

import pyarrow.fs as pafs
from ray.train._internal import storage as ray_storage
from ray.tune.experiment.trial import Trial

from tltune import storage
from tltune.errors import StorageFull, is_storage_full

# Ray's loggers that print a full-storage error with its traceback (a trial's, the upload's, an
# unfetched task error's), and, after such a stop, Tune's "Trials did not complete" and the
# analysis's "Failed to fetch metrics" for trials whose results never reached the disk
RAY_LOGGERS = (
    "ray.tune.execution.tune_controller",
    "ray.train._internal.syncer",
    "ray._private.worker",
    "ray.tune.tune",
    "ray.tune.analysis.experiment_analysis",
)
AFTER_THE_STOP = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")  # quiet once storage is full


class FullStorageWatch(logging.Filter):
    """Notes the first full-storage error and stops Tune once; as a logging filter, it also
    drops Ray's tracebacks of those errors (the sweep ends with one line instead)."""

    def __init__(self):
        super().__init__()
        self.first: str | None = None  # the first such error, on one line

    def saw(self, error: BaseException | None) -> bool:
        if not is_storage_full(error):
            return False
        if self.first is None:
            self.first = " ".join(str(error).split())[-300:] or type(error).__name__
            if callable(signal.getsignal(signal.SIGUSR1)):  # Tune's handler, while tuner.fit() runs
                os.kill(os.getpid(), signal.SIGUSR1)
        return True

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else Exception(record.getMessage())
        if self.saw(error):
            return False
        return not (self.first is not None and record.name in AFTER_THE_STOP)


def upload_whole(local_path: str, fs: pafs.FileSystem, fs_path: str, exclude=None, *, ray_upload, watch: FullStorageWatch) -> None:
    """Ray's ``_upload_to_fs_path``, file by file through :func:`tltune.storage.copy_file_whole`
    on a local disk. A full disk is noted (the experiment stops) and the upload skipped: the
    last whole copy stays."""
    try:
        if not isinstance(fs, pafs.LocalFileSystem) or exclude:
            ray_upload(local_path, fs, fs_path, exclude)
            return
        source = Path(local_path)
        if source.is_file():
            storage.copy_file_whole(source, Path(fs_path))
            return
        for path in sorted(source.rglob("*")):
            if path.is_file():
                with contextlib.suppress(FileNotFoundError):  # a temporary file Ray just renamed
                    storage.copy_file_whole(path, Path(fs_path) / path.relative_to(source))
    except OSError as exc:
        if not watch.saw(exc):
            raise


@contextlib.contextmanager
def stopping_when_full(exp_dir: str):
    """While a Tune experiment of ``exp_dir`` runs: uploads that never cut a file, and a stop
    with :class:`StorageFull` at the first full-storage error."""
    watch = FullStorageWatch()
    ray_upload = ray_storage._upload_to_fs_path
    handle_error = Trial.handle_error

    def handle_error_watching(trial: Trial, exc=None) -> None:
        watch.saw(exc)
        handle_error(trial, exc)

    ray_storage._upload_to_fs_path = lambda *args, **kwargs: upload_whole(*args, **kwargs, ray_upload=ray_upload, watch=watch)
    Trial.handle_error = handle_error_watching
    for name in RAY_LOGGERS:
        logging.getLogger(name).addFilter(watch)
    try:
        yield
    except OSError as exc:  # a write of the driver's own (a callback's, tltune's signatures)
        if not watch.saw(exc):
            raise
    finally:
        ray_storage._upload_to_fs_path = ray_upload
        Trial.handle_error = handle_error
        for name in RAY_LOGGERS:
            logging.getLogger(name).removeFilter(watch)
    if watch.first is not None:
        raise StorageFull.at(exp_dir)
