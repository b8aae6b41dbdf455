"""Tune callbacks that run in the driver: TensorBoard event files and progress lines."""

from __future__ import annotations

import math

from ray import tune


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
    }

    def __init__(self, print_progress: bool = True):
        self._writers = {}
        self._print_progress = print_progress

    def _writer(self, trial):
        from torch.utils.tensorboard import SummaryWriter

        if trial.trial_id not in self._writers:
            self._writers[trial.trial_id] = SummaryWriter(self._local_dir(trial), flush_secs=10)
        return self._writers[trial.trial_id]

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
        import pyarrow.fs as pafs

        local = pafs.LocalFileSystem()
        fs = trial.storage.storage_filesystem
        for info in local.get_file_info(pafs.FileSelector(trial.local_path, allow_not_found=True)):
            if info.base_name.startswith("events.out.tfevents"):
                pafs.copy_files(info.path, f"{trial.path}/{info.base_name}", source_filesystem=local, destination_filesystem=fs)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        writer = self._writer(trial)
        step = result["epoch"]
        for tag, key in self.SCALARS.items():
            if _is_number(result.get(key)):
                writer.add_scalar(tag, result[key], global_step=step)
        writer.flush()
        self._upload(trial)
        if self._print_progress:
            varied = ", ".join(f"{k}={_short(v)}" for k, v in trial.config.items() if k in ("optimizer", "activation", "lr"))
            print(
                f"  {trial.trial_id} ({varied}) epoch {step}/{trial.config['epochs']}: "
                f"train_loss {result['train_loss']:.3f}  val_acc {100 * result['val_acc']:.2f}%",
                flush=True,
            )

    def _close(self, trial):
        """Write the trial's hyperparameters and final metrics for the HParams dashboard, then close."""
        from torch.utils.tensorboard.summary import hparams

        writer = self._writers.pop(trial.trial_id, None)
        if writer is None:
            return
        last = trial.last_result or {}
        metrics = {f"hparams/{k}": float(last[k]) for k in ("val_acc", "val_loss", "train_loss") if _is_number(last.get(k))}
        metrics["hparams/epochs_trained"] = float(last.get("training_iteration", 0))
        config = {k: _plain(v) for k, v in trial.config.items() if _plain(v) is not None}
        for summary in hparams(config, metrics):
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            if math.isfinite(value):
                writer.add_scalar(tag, value)
        writer.close()
        self._upload(trial)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial)

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            self._close(trial)


def _on_local_disk(trial) -> bool:
    import pyarrow.fs as pafs

    return isinstance(trial.storage.storage_filesystem, pafs.LocalFileSystem)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _plain(value):
    """Config values as the plain scalars TensorBoard's HParams accept (numpy types cast)."""
    if hasattr(value, "item"):
        value = value.item()
    return value if isinstance(value, (bool, int, float, str)) else None


def _short(value):
    return f"{value:.2e}" if isinstance(value, float) else value
