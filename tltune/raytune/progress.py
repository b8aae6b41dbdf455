"""A compact live view of a sweep in the terminal: one line when a trial ends, saying how
(completed, stopped by ASHA at epoch N, diverged, failed), and every ``every_s`` seconds the
trials per state, the time elapsed and an estimate of the time left. Quiet (``--quiet``,
``tltune.run``): only the counts, at most once a minute."""

from __future__ import annotations

import time

from ray import tune
from ray.tune.experiment import Trial

from tltune import console
from tltune.raytune import budget

QUIET_EVERY_S = 60.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _epochs_run(trial: Trial) -> int:
    return int((trial.last_result or {}).get("training_iteration") or 0)


class ProgressCallback(tune.Callback):
    def __init__(self, experiment: str, every_s: float = 30.0, exp_dir: str | None = None):
        self.experiment = experiment
        self.every_s = every_s
        self.exp_dir = exp_dir  # whose time budget may stop trials (tltune.raytune.budget); absent in callbacks saved before
        self._reset()

    @property
    def quiet(self) -> bool:  # read when printing: a callback restored from a saved run keeps its every_s
        return console.is_quiet()

    def _reset(self) -> None:
        self.started = time.monotonic()
        self.last_status = self.started
        self.num_samples = 0
        self.asha_stops = 0

    def setup(self, total_num_samples: int = 0, **info) -> None:  # also after a resume
        self._reset()
        self.num_samples = total_num_samples

    def status(self, trials: list[Trial], ending: Trial | None = None) -> str:
        """``2 running, 1 pending, 3 finished (1 stopped by ASHA) · 1m05s elapsed · at most ~40s left``
        (``ending``: a trial Tune has not marked finished yet)."""
        counts: dict[str, int] = {}
        for trial in trials:
            status = Trial.TERMINATED if trial is ending else trial.status
            counts[status] = counts.get(status, 0) + 1
        not_created = max(self.num_samples - len(trials), 0)
        parts = [f"{counts.get(Trial.RUNNING, 0)} running", f"{counts.get(Trial.PENDING, 0) + not_created} pending"]
        finished = counts.get(Trial.TERMINATED, 0)
        parts.append(f"{finished} finished" + (f" ({self.asha_stops} stopped by ASHA)" if self.asha_stops else ""))
        if counts.get(Trial.ERROR):
            parts.append(f"{counts[Trial.ERROR]} failed")
        elapsed = time.monotonic() - self.started
        line = f"{self.experiment}: {', '.join(parts)} · {_duration(elapsed)} elapsed"
        done = sum(_epochs_run(t) for t in trials)
        ended = [t for t in trials if t is ending or t.status in (Trial.TERMINATED, Trial.ERROR)]
        planned = sum(_epochs_run(t) if t in ended else int(t.config.get("epochs", 0)) for t in trials)
        planned += not_created * (planned / len(trials) if trials else 0)
        if done and planned > done:  # an upper bound: ASHA may stop more trials early
            line += f" · at most ~{_duration(elapsed * (planned - done) / done)} left"
        return line

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        last = trial.last_result or {}
        epochs, planned = _epochs_run(trial), trial.config.get("epochs")
        val = f", val_acc {last['val_acc']:.4f}" if isinstance(last.get("val_acc"), float) else ""
        if last.get("diverged"):
            how = f"diverged at epoch {epochs} ({last.get('stop_reason', '')})"
        elif isinstance(planned, int) and epochs < planned and getattr(self, "exp_dir", None) and budget.is_over(self.exp_dir):
            how = f"stopped by the time budget at epoch {epochs} of {planned}{val}"
        elif isinstance(planned, int) and epochs < planned:
            self.asha_stops += 1
            how = f"stopped by ASHA at epoch {epochs} of {planned}{val}"
        else:
            how = f"completed {epochs} epochs{val}"
        if self.quiet:
            return
        print(f"{self.experiment}: trial {trial.trial_id} {how}", flush=True)
        self._print_status(trials, ending=trial)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        if self.quiet:
            return
        print(f"{self.experiment}: trial {trial.trial_id} failed at epoch {_epochs_run(trial) + 1} (Tune retries it from its last checkpoint while retries are left)", flush=True)

    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        if time.monotonic() - self.last_status >= (max(self.every_s, QUIET_EVERY_S) if self.quiet else self.every_s):
            self._print_status(trials)

    def _print_status(self, trials: list[Trial], ending: Trial | None = None) -> None:
        self.last_status = time.monotonic()
        print(self.status(trials, ending), file=console.counts_stream(), flush=True)
