"""Time budgets (``--time-budget``, a spec's ``time_budget``): once an experiment's search has
run that long, no new trial starts and each running trial stops at its next epoch.

The deadline lives here, in the driver, keyed by the experiment's folder, not in the stopper
or the searcher: Tune pickles both with its state, and a resume with a larger budget must
move the deadline of the restored ones."""

from __future__ import annotations

import time

from ray import tune

from tltune.results import planned_epochs

_deadlines: dict[str, float] = {}  # experiment folder -> time.time() at which its search stops
_stopped: dict[str, set[str]] = {}  # experiment folder -> ids of the trials the budget stopped


def start(exp_dir: str, budget_s: float | None, spent_s: float) -> None:
    """The search of ``exp_dir`` may run ``budget_s`` seconds in all, ``spent_s`` of them
    before this invocation (an interrupted or budget-ended run resumed)."""
    _stopped[exp_dir] = set()
    if budget_s is None:
        _deadlines.pop(exp_dir, None)
    else:
        _deadlines[exp_dir] = time.time() + budget_s - spent_s


def deadline(exp_dir: str) -> float | None:
    """The ``time.time()`` at which the search of ``exp_dir`` stops; None: no budget."""
    return _deadlines.get(exp_dir)


def is_over(exp_dir: str, at: float | None = None) -> bool:
    """Whether the budget of ``exp_dir`` is over at ``at`` (a ``time.time()``; None: now)."""
    deadline = _deadlines.get(exp_dir)
    return deadline is not None and (time.time() if at is None else at) >= deadline


def stopped_trials(exp_dir: str) -> set[str]:
    """Ids of the trials the budget stopped in this invocation."""
    return set(_stopped.get(exp_dir, ()))


class TimeBudgetStopper(tune.Stopper):
    """Stops each trial at the first epoch it reports after the experiment's deadline. The
    epoch's own ``reported_at`` is compared, as the trial compares it when it decides to save a
    checkpoint (:class:`tltune.train.CheckpointPolicy`): an epoch stopped here has one."""

    def __init__(self, exp_dir: str):
        self.exp_dir = exp_dir

    def __call__(self, trial_id: str, result: dict) -> bool:
        last_epoch = planned_epochs(result.get("config") or {})
        if result.get("done") or (last_epoch is not None and result.get("epoch", 0) >= last_epoch):
            return False  # it ends here anyway: completed, not stopped (Tune marks the last report done only later)
        if not is_over(self.exp_dir, at=result.get("reported_at")):
            return False
        _stopped.setdefault(self.exp_dir, set()).add(trial_id)
        return True

    def stop_all(self) -> bool:
        return False  # running trials end at their next epoch; the searcher starts no new ones
