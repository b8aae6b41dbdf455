"""--time-budget: once the search has run that long no trial starts and running ones stop at
their next epoch, recorded as stopped by the time budget; the table says the budget ended the
search; --resume goes on only with a larger budget. A real sweep on real MNIST (slow)."""

import csv
import io
import json
import time

import pytest
import torch

from conftest import write_slow_spec
from tltune.options import SweepOptions
from tltune.raytune import budget
from tltune.raytune.budget import TimeBudgetStopper
from tltune.errors import UserError
from tltune.specs import duration_text, parse_duration



def test_durations_read_and_written():
    assert [parse_duration(t, "x") for t in ("90", "90s", "30m", "1h30m", "1.5h", "2d")] == [90, 90, 1800, 5400, 5400, 172800]
    assert [duration_text(s) for s in (45, 1800, 5400, 3601)] == ["45s", "30m", "1h30m", "1h1s"]
    for bad in ("0", "abc", "5x", "-3m", "1m30"):
        with pytest.raises(UserError, match="--time-budget"):
            SweepOptions(time_budget=bad)


def test_the_budget_stops_a_trial_at_an_epoch_after_the_deadline_but_not_its_last(tmp_path):
    stopper = TimeBudgetStopper(str(tmp_path))
    budget.start(str(tmp_path), budget_s=10, spent_s=20)  # over 10 s ago

    def report(epoch: int, **config) -> dict:
        return {"epoch": epoch, "reported_at": time.time(), "config": {"epochs": 5, "stop_epoch": None, **config}}

    assert stopper("a", report(2)) and budget.stopped_trials(str(tmp_path)) == {"a"}
    assert not stopper("b", report(5)), "its last epoch: completed, not stopped"
    assert not stopper("c", report(3, stop_epoch=3)), "a repeat's last epoch"
    assert not stopper("d", {**report(2), "done": True})
    assert budget.stopped_trials(str(tmp_path)) == {"a"}
    budget.start(str(tmp_path), budget_s=None, spent_s=0)
    assert not stopper("e", report(1)), "no budget"


@pytest.mark.slow
def test_the_budget_ends_the_search_and_a_larger_one_goes_on(real_data_root, tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # the trials plan more epochs than the budget allows: it stops one part-way, never at its last
    # epoch (a trial there completes), wherever the deadline falls. The model sleeps in each
    # training step (1 s an epoch): the budget's seconds pass at no CPU cost, on any machine.
    spec = write_slow_spec(tmp_path / "project", "budgeted", epochs=100, num_samples=12, seconds_per_batch=0.1)
    code, first, err = command("sweep", str(spec), "--max-epochs", "100", "--grace-period", "100", "--max-concurrent-trials", "1",
                               "--time-budget", "25s", "--checkpoint-every", "1000", "--train-subset", "600", "--test-subset", "300",
                               "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "budget")  # fmt: skip
    assert code == 0, first[-3000:] + err[-3000:]
    run_dir = tmp_path / "budget"
    summary = json.loads((run_dir / "budgeted" / "tltune_best.json").read_text())
    budget = summary["time_budget"]
    assert budget["ended_search"] and budget["seconds"] == 25 and summary["trials"] < 12
    assert "the time budget of 25s ended the search" in first
    trials = list(csv.DictReader(io.StringIO(command("best", str(run_dir), "--trials")[1])))
    stopped = [t for t in trials if t["stop_reason"].startswith("stopped by the time budget at epoch")]
    assert [t["trial"] for t in stopped] == budget["stopped_trials"] and stopped, "the running trial stopped at its next epoch"
    assert not any(t["stop_reason"].startswith("stopped by ASHA") for t in trials), "a grace period of 100: ASHA stops none"
    for t in stopped:  # checkpoints only where a trial may end (--checkpoint-every 1000): the budget's stop is one
        (trial_dir,) = [d for d in (run_dir / "budgeted").iterdir() if d.name.startswith(t["trial"])]
        latest = max(trial_dir.glob("checkpoint_*"))
        assert t["stop_reason"].startswith(f"stopped by the time budget at epoch {torch.load(latest / 'model.pt', weights_only=True)['epoch']}")

    code, _, err = command("sweep", "--resume", str(run_dir), "--time-budget", "25s")
    assert code == 2 and "pass a larger one" in err
    code, out, err = command("sweep", "--resume", str(run_dir))
    assert code == 0 and "pass a larger --time-budget to go on" in out, out + err

    code, out, err = command("sweep", "--resume", str(run_dir), "--time-budget", "50s")
    assert code == 0, out[-3000:] + err[-3000:]
    assert "going on to 50s" in out
    after = json.loads((run_dir / "budgeted" / "tltune_best.json").read_text())
    assert after["trials"] > summary["trials"] and after["time_budget"]["seconds"] == 50
    assert set(budget["stopped_trials"]) <= set(after["time_budget"]["stopped_trials"]), "what the first budget stopped stays recorded"
    assert (run_dir / "budgeted" / "tltune_best.budget-25s.json").is_file(), "the first summary is kept"
    rows = list(csv.DictReader(io.StringIO(command("best", str(run_dir), "--trials")[1])))
    assert len(rows) == after["trials"] and len({r["trial"] for r in rows}) == len(rows)
