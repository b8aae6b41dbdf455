"""Tune callbacks that run in the driver: TensorBoard event files and progress lines, and the
run's one HParams experiment summary.

TensorBoard's HParams dashboard takes its columns (each hyperparameter with its domain, and
the metrics) from one "experiment" summary and picks an arbitrary one if there are several.
So trials write only their session start and end (their own hyperparameter values and
status), and the run directory's root holds the single experiment summary, covering every
experiment of the run: :func:`write_run_hparams`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.utils import flatten_dict
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.summary.writer.record_writer import RecordWriter

from tltune import storage
from tltune.raytune.trainable import REPORTED_FILE, reported_rows
from tltune.records import is_finite_number

# The root's summary is the one events file of the run root ending in this.
RUN_HPARAMS_SUFFIX = ".tltune_hparams"


class TensorBoardCallback(tune.Callback):
    """Per-epoch scalars of every trial as TensorBoard event files in the trial's directory.

    Written by the driver straight into the experiment directory (not Ray's temporary
    staging folder), so ``tensorboard --logdir <run dir>`` shows every trial while it runs.
    """

    SCALARS = {
        "loss/train": "train_loss",
        "loss/val": "val_loss",
        "accuracy/train": "train_acc",
        "accuracy/val": "val_acc",
        "train_images_per_s": "train_images_per_s",
        "lr": "lr",
    }

    def __init__(self, print_progress: bool = True, run_root_up: int = 0):
        self._writers = {}
        # Tune's storage path is the run directory, or for the repeats (a Tune experiment inside
        # an experiment's directory) one level below it. Counted in levels, not stored as a
        # path, so a run copied elsewhere and resumed still writes to its own root.
        self._run_root_up = run_root_up
        self._print_progress = print_progress
        self._run_domains = None  # the run root's HParams domains, as this driver last read or wrote them

    def _writer(self, trial):
        """The trial's event file writer; a new one starts the trial's HParams session."""
        from torch.utils.tensorboard import SummaryWriter

        if trial.trial_id not in self._writers:
            writer = SummaryWriter(self._local_dir(trial), flush_secs=10)
            values = session_values(trial.config)
            writer.file_writer.add_summary(hp.hparams_pb(values, trial_id=trial.trial_id))
            self._writers[trial.trial_id] = writer
            self._cover_in_run_hparams(trial, values)
        return self._writers[trial.trial_id]

    def _cover_in_run_hparams(self, trial, values: dict) -> None:
        """Widen the run's HParams domains where this trial's values lie outside them: the
        dashboard's default filters would hide the trial. It happens where a value is only
        known once the experiment runs (a transfer experiment's activation, taken from its
        source's best trial)."""
        fs, root = trial.storage.storage_filesystem, trial.storage.storage_fs_path.rstrip("/")
        for _ in range(getattr(self, "_run_root_up", 0)):  # getattr: callbacks pickled before the attribute existed
            root = root.rsplit("/", 1)[0]
        if self._run_domains is None:
            self._run_domains = read_run_hparams(fs, root)[1]
        if not all(name in self._run_domains and covers(self._run_domains[name], v) for name, v in values.items()):
            self._run_domains = extend_run_hparams(fs, root, {name: frozenset([v]) for name, v in values.items()})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._writer(trial).flush()
        self._upload(trial)

    @staticmethod
    def _local_dir(trial) -> str:
        """Where the events are written: the trial's directory itself on local storage, else
        the driver's staging copy of it, uploaded by :meth:`_upload`."""
        return trial.path if _on_local_disk(trial) else trial.local_path

    @staticmethod
    def _upload(trial) -> None:
        """Copy the trial's event files to cloud storage (Ray syncs its own files, not these)."""
        if _on_local_disk(trial):
            return
        local = pafs.LocalFileSystem()
        fs = trial.storage.storage_filesystem
        for info in local.get_file_info(pafs.FileSelector(trial.local_path, allow_not_found=True)):
            if info.base_name.startswith("events.out.tfevents"):
                pafs.copy_files(info.path, f"{trial.path}/{info.base_name}", source_filesystem=local, destination_filesystem=fs)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        writer = self._writer(trial)
        step = result["epoch"]
        for tag, key in self.SCALARS.items():
            if is_finite_number(result.get(key)):
                writer.add_scalar(tag, result[key], global_step=step)
        writer.flush()
        self._upload(trial)
        if self._print_progress:
            print(progress_line(trial, result), flush=True)

    def _close(self, trial, status: int | None):
        """Write the trial's final metrics and, given a ``status``, its HParams session end; then close.
        Without one (the sweep was interrupted) the session stays open: a resume goes on with it."""
        writer = self._writers.pop(trial.trial_id, None)
        if writer is None:
            return
        last = trial.last_result or {}
        metrics = {f"hparams/{k}": float(last[k]) for k in ("val_acc", "val_loss", "train_loss") if is_finite_number(last.get(k))}
        metrics["hparams/epochs_trained"] = float(last.get("training_iteration", 0))
        for tag, value in metrics.items():
            if math.isfinite(value):
                writer.add_scalar(tag, value)
        if status is not None:
            writer.file_writer.add_summary(session_end_summary(status))
        writer.close()
        self._upload(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):  # finished, or stopped by ASHA
        self._close(trial, api_pb2.STATUS_SUCCESS)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, api_pb2.STATUS_FAILURE)

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._close(trial, None)


# The HParams dashboard's metric columns: scalar tag -> the name shown. Each is the last value
# a trial wrote under that tag.
RUN_METRICS = {**TensorBoardCallback.SCALARS, "hparams/epochs_trained": "epochs_trained"}


def write_run_hparams(run_dir: str, experiments: list[tuple[dict, dict]]) -> None:
    """Write the one HParams experiment summary of ``run_dir`` (a local path or URI) at its
    root: every hyperparameter of the ``experiments`` (per experiment: its fixed values and its
    search space of tltune domains) with its domain, and :data:`RUN_METRICS`. The summary
    already there (an earlier invocation's, for experiments that this one does not run again)
    is merged in and replaced, so the run keeps exactly one summary, covering every experiment it holds."""
    domains = {}
    for fixed, space in experiments:
        found = {name: fixed_domain(value) for name, value in fixed.items() if name not in space}
        found.update({name: domain.hparams_domain() for name, domain in space.items()})
        # a None (e.g. no image_size: the dataset's own) is no value
        domains = merge_domains(domains, {name: d for name, d in found.items() if d != frozenset()})
    extend_run_hparams(*storage.resolve(run_dir), domains)


def session_values(config: dict) -> dict:
    """A trial's hyperparameter values as the plain scalars an HParams session holds (None left out)."""
    return {k: _plain(v) for k, v in config.items() if _plain(v) is not None}


def fixed_domain(value) -> frozenset:
    """The HParams domain of a value every trial shares: that value (none for None)."""
    return frozenset(v for v in [_plain(value)] if v is not None)


def merge_domains(domains: dict, more: dict) -> dict:
    """Domains (name -> frozenset of values | (low, high) | None for "values of mixed types")
    that hold the values of both. A numeric set merged with a range widens the range."""
    merged = dict(domains)
    for name, domain in more.items():
        if name not in merged:
            merged[name] = domain
        elif isinstance(merged[name], frozenset) and isinstance(domain, frozenset):
            values = merged[name] | domain
            merged[name] = values if _value_type(values) else None
        elif merged[name] is None or domain is None or _value_type([*merged[name], *domain]) is not float:
            merged[name] = None
        else:
            bounds = [*merged[name], *domain]  # a range's ends, a set's values
            merged[name] = (float(min(bounds)), float(max(bounds)))
    return merged


def covers(domain, value) -> bool:
    if isinstance(domain, tuple):
        return _value_type([value]) is float and domain[0] <= value <= domain[1]
    return domain is None or value in domain


def read_run_hparams(fs: pafs.FileSystem, root: str) -> tuple[list[str], dict]:
    """The run root's summary files and the domains they hold (all of them, should a crash
    have left two)."""
    selector = pafs.FileSelector(root, allow_not_found=True)
    files = sorted(i.path for i in fs.get_file_info(selector) if i.base_name.endswith(RUN_HPARAMS_SUFFIX))
    domains = {}
    for path in files:
        with tempfile.TemporaryDirectory() as directory:
            local = os.path.join(directory, "events.out.tfevents")
            with fs.open_input_stream(path) as source, open(local, "wb") as copy:
                copy.write(source.read())
            for event in EventFileLoader(local).Load():
                for value in event.summary.value:
                    if value.tag == metadata.EXPERIMENT_TAG:
                        experiment = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
                        domains = merge_domains(domains, {info.name: _domain_of(info) for info in experiment.hparam_infos})
    return files, domains


def extend_run_hparams(fs: pafs.FileSystem, root: str, domains: dict) -> dict:
    """Merge ``domains`` into the run root's summary and write it as the root's only one;
    returns the domains written."""
    old_files, old_domains = read_run_hparams(fs, root)
    domains = merge_domains(old_domains, domains)
    summary = hp.hparams_config_pb(
        [_hparam(name, domains[name]) for name in sorted(domains)],
        [hp.Metric(tag, display_name=name) for tag, name in RUN_METRICS.items()],
        time_created_secs=time.time(),
    )
    # A new file first, then the old ones deleted: a crash leaves the old summary, never none.
    path = f"{root.rstrip('/')}/events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{uuid.uuid4().hex[:12]}{RUN_HPARAMS_SUFFIX}"
    with fs.open_output_stream(path) as out:
        records = RecordWriter(out)
        records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        records.write(event_pb2.Event(wall_time=time.time(), summary=summary).SerializeToString())
    for old in old_files:
        fs.delete_file(old)
    return domains


def session_end_summary(status: int) -> summary_pb2.Summary:
    """The HParams session end of a trial (tensorboard's own helper for it needs TensorFlow)."""
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=metadata.SESSION_END_INFO_TAG,
        metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=end)),
        tensor=metadata.NULL_TENSOR,
    )
    return summary


def _hparam(name: str, domain) -> hp.HParam:
    if isinstance(domain, tuple):
        return hp.HParam(name, hp.RealInterval(*domain))
    if domain is None:
        return hp.HParam(name)  # values of mixed types: listed without a domain
    value_type = _value_type(domain)
    return hp.HParam(name, hp.Discrete([value_type(v) for v in domain], dtype=value_type))


def _domain_of(info: api_pb2.HParamInfo):
    if info.HasField("domain_interval"):
        return (info.domain_interval.min_value, info.domain_interval.max_value)
    if info.HasField("domain_discrete"):
        return frozenset(info.domain_discrete)
    return None


def _value_type(values):
    """bool, float (any number) or str where all ``values`` are of that kind, else None."""
    kinds = {bool if isinstance(v, bool) else float if isinstance(v, (int, float)) else str if isinstance(v, str) else None for v in values}
    return kinds.pop() if len(kinds) == 1 else None


def _on_local_disk(trial) -> bool:
    return isinstance(trial.storage.storage_filesystem, pafs.LocalFileSystem)


def _plain(value):
    """Config values as the plain scalars TensorBoard's HParams accept (numpy types cast)."""
    if hasattr(value, "item"):
        value = value.item()
    return value if isinstance(value, (bool, int, float, str)) else None


def progress_line(trial, result: dict) -> str:
    """A trial's epoch as printed: its optimizer, activation and lr, and every other value its
    searcher chose (the model and mode where searched, a factory's keywords...) but the epochs."""
    searched = getattr(trial, "evaluated_params", None) or {}
    shown = [k for k in ("model", "mode") if k in searched] + ["optimizer", "activation", "lr"]
    shown += [k for k in searched if k not in shown and k != "epochs"]
    varied = ", ".join(f"{k}={_short(trial.config[k])}" for k in shown if k in trial.config)
    return (f"  {trial.trial_id} ({varied}) epoch {result['epoch']}/{trial.config['epochs']}: "
            f"train_loss {result['train_loss']:.3f}  val_acc {100 * result['val_acc']:.2f}%")  # fmt: skip


def _short(value):
    return f"{value:.3g}" if isinstance(value, float) else value


class _FromCheckpoint:
    """Tune's result loggers, whose files a restored trial takes back exactly up to the checkpoint
    it goes on from. The driver uploads its staging directory file by file, so a driver killed
    mid-upload can leave storage with a trial's results ahead of the experiment state (the rows
    past the checkpoint are work that was lost: dropped, with a row the kill cut short, or the
    resumed trial reports them again: ``[1, 2, 2, 3, 4]``) or behind it (the rows up to the
    checkpoint are rebuilt from the reports the checkpoint keeps, marked
    ``rebuilt_from_checkpoint``, or the trial's first epochs are missing: ``[3, 4]``)."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        super()._restore_from_remote(file_name, trial)
        checkpointed = trial.latest_checkpoint_result
        if checkpointed is None or not isinstance(checkpointed.metrics.get("training_iteration"), int):
            return
        done = checkpointed.metrics["training_iteration"]
        path = Path(trial.local_path, file_name)
        csv_rows = file_name.endswith(".csv")
        text = rows_up_to(path.read_text(), done, csv_rows) if path.is_file() else ""
        kept = len(text.splitlines()) - (1 if csv_rows and text else 0)
        if kept < done:
            rows = rebuilt_rows(checkpointed, trial.trial_id, first=kept + 1)
            text += csv_lines(text, rows) if csv_rows else "".join(json.dumps(row, default=str) + "\n" for row in rows)
        if text or path.is_file():
            path.write_text(text)


def rebuilt_rows(checkpointed, trial_id: str, first: int) -> list[dict]:
    """The results of reports ``first`` to the checkpoint's, from the reports the checkpoint
    keeps; the checkpoint's own report is Tune's whole row. [] where the checkpoint keeps none."""
    checkpoint = checkpointed.checkpoint
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{REPORTED_FILE}") as stream:
            reported = reported_rows(stream.read().decode())
    except (OSError, ValueError):
        return []
    done = checkpointed.metrics["training_iteration"]
    if len(reported) < done:
        return []
    rows = [{**reported[i - 1], "training_iteration": i, "trial_id": trial_id} for i in range(first, done)]
    return [{**row, "rebuilt_from_checkpoint": True} for row in rows + [dict(checkpointed.metrics)]]


def csv_lines(text: str, rows: list[dict]) -> str:
    """``rows`` as lines of a ``progress.csv`` whose header ``text`` holds (none without a header:
    Tune writes one from the next live row's keys)."""
    header = next(csv.reader(text.splitlines()[:1]), [])
    if not header:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, header, extrasaction="ignore")
    for row in rows:
        writer.writerow(flatten_dict({k: v for k, v in row.items() if k != "config"}, delimiter="/"))
    return out.getvalue()


def rows_up_to(text: str, epochs: int, csv_rows: bool) -> str:
    """``result.json``'s lines (``progress.csv``'s header and rows) up to ``training_iteration`` ``epochs``."""
    lines = text.splitlines(keepends=True)
    if csv_rows:
        header = next(csv.reader(lines[:1]), [])
        if "training_iteration" not in header:
            return text
        column = header.index("training_iteration")
        kept = lines[:1]
        for line in lines[1:]:
            row = next(csv.reader([line]), [])
            if line.endswith("\n") and len(row) > column and row[column].isdigit() and int(row[column]) <= epochs:
                kept.append(line)
        return "".join(kept)
    kept = []
    for line in lines:
        try:
            iteration = json.loads(line).get("training_iteration")
        except ValueError:  # cut by the kill
            continue
        if line.endswith("\n") and isinstance(iteration, int) and iteration <= epochs:
            kept.append(line)
    return "".join(kept)


class JsonResults(_FromCheckpoint, JsonLoggerCallback):
    """Tune's ``result.json`` logger (see :class:`_FromCheckpoint`)."""


class CsvResults(_FromCheckpoint, CSVLoggerCallback):
    """Tune's ``progress.csv`` logger (see :class:`_FromCheckpoint`)."""
