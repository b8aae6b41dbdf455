"""The per-trial table: one row per trial with its configuration, epochs run, stop reason,
accuracies and wall time, from runs written file by file as a sweep leaves them (local and S3)."""

from __future__ import annotations

import csv
import io
import json

from s3server import s3, s3_server  # noqa: F401  (fixtures)
from test_damaged_runs import best_configs_main, root, warnings_of, write, write_experiment  # noqa: F401  (root: a fixture)
from tltune import storage
from tltune.results import SUMMARY_FILE, TRIAL_COLUMNS, trial_table, trials_csv, write_trials_csv

CONFIG = {"optimizer": "adam", "activation": "relu", "lr": 1e-3, "epochs": 3, "batch_size": 64, "seed": 0}
EPOCH_S = 5.0


def write_trial(exp_dir: str, name: str, accuracies=(), diverged: bool = False, error: bool = False, timed: bool = True, **config) -> None:
    """A trial directory as Tune leaves it: params.json, a result.json row per epoch (with
    Ray's timestamp and time_total_s unless not ``timed``), a last row with ``diverged`` if it
    diverged, error.txt if it failed."""
    storage.write_text(storage.join(exp_dir, name, "params.json"), json.dumps({**CONFIG, **config}))
    rows = [{"training_iteration": e, "epoch": e, "val_acc": acc} for e, acc in enumerate(accuracies, 1)]
    if diverged:
        rows.append({"training_iteration": len(rows) + 1, "diverged": True, "val_acc": 0.0, "stop_reason": "training loss became nan"})
    for row in rows:
        row.update(timestamp=1_800_000_000 + EPOCH_S * row["training_iteration"], **({"time_total_s": EPOCH_S * row["training_iteration"]} if timed else {}))
    if rows:
        storage.write_text(storage.join(exp_dir, name, "result.json"), "".join(json.dumps(r) + "\n" for r in rows))
    if error:
        storage.write_text(storage.join(exp_dir, name, "error.txt"), "Failure # 1 (occurred at 2026-11-27_04-01-43)\nRuntimeError: boom\n")


def summary_of(name: str, best_trial: str, test_acc: float) -> dict:
    return {"experiment": name, "best_trial": best_trial, "epochs_trained": 3, "val_acc": 0.9, "test_acc": test_acc, "config": CONFIG}


def write_run(run: str) -> None:
    """A finished, a failed and an interrupted experiment, with every way a trial can end."""
    finished = write_experiment(run, "mnist-cnn", trials=(), summary=summary_of("mnist-cnn", "done", 0.88))
    write_trial(finished, "done", (0.5, 0.7, 0.9))
    write_trial(finished, "asha", (0.3,))
    write_trial(finished, "nan", (0.4,), diverged=True, lr=10.0)
    write_trial(finished, "recovered", (0.5, 0.6, 0.8), error=True, timed=False)  # retried from its checkpoint
    write_trial(finished, "retried", (0.2,), error=True)  # retried, then stopped by ASHA
    write_trial(finished, "short", (0.6,), epochs=1, weight_decay={"value": 0.1})
    failed = write_experiment(run, "svhn-cnn", trials=(), summary=False, failure="1 of 2 trials failed; the first: RuntimeError: boom")
    write_trial(failed, "broken", (0.2,), error=True)
    write_trial(failed, "fine", (0.1, 0.2, 0.3))
    interrupted = write_experiment(run, "cifar10-cnn-search", trials=(), summary=False)
    write_trial(interrupted, "running", (0.4, 0.5))
    write_trial(interrupted, "waiting")  # params.json only: no epoch reported yet
    write_trial(interrupted, "crashed", (0.1,), error=True)


def by_trial(rows: list[dict]) -> dict[str, dict]:
    return {row["trial"]: row for row in rows}


def test_one_row_per_trial_with_its_stop_reason(root, capsys):
    run = storage.join(root, "run")
    write_run(run)
    rows = trial_table(run)
    assert capsys.readouterr().err == ""
    trials = by_trial(rows)
    assert len(rows) == len(trials) == 11
    assert {name: row["stop_reason"] for name, row in trials.items()} == {
        "done": "completed",
        "asha": "stopped by ASHA at epoch 1",
        "nan": "diverged",
        "recovered": "completed",
        "retried": "stopped by ASHA at epoch 1",
        "short": "completed",
        "broken": "error",
        "fine": "completed",
        "running": "interrupted at epoch 2",
        "waiting": "interrupted at epoch 0",
        "crashed": "error",
    }
    assert {name: row["experiment"] for name, row in trials.items() if name in ("done", "broken", "running")} == {
        "done": "mnist-cnn", "broken": "svhn-cnn", "running": "cifar10-cnn-search"
    }  # fmt: skip
    done, nan, waiting = trials["done"], trials["nan"], trials["waiting"]
    assert (done["epochs_run"], done["best_val_acc"], done["last_val_acc"], done["test_acc"], done["wall_s"]) == (3, 0.9, 0.9, 0.88, 15.0)
    assert (nan["epochs_run"], nan["best_val_acc"], nan["last_val_acc"], nan["config/lr"]) == (2, 0.4, None, 10.0), "a diverged row's 0 is no accuracy"
    assert (waiting["epochs_run"], waiting["best_val_acc"], waiting["last_val_acc"], waiting["wall_s"]) == (0, None, None, None)
    assert trials["recovered"]["wall_s"] == 2 * EPOCH_S, "without time_total_s: the span of the timestamps"
    assert [row["test_acc"] for row in rows].count(None) == 10, "only the tested best trial has a test accuracy"


def test_the_same_columns_in_every_row_in_a_stable_order(tmp_path):
    run = str(tmp_path / "run")
    write_run(run)
    rows = trial_table(run)
    config_columns = ["config/optimizer", "config/activation", "config/lr", "config/epochs", "config/batch_size",
                      "config/seed", "config/weight_decay/value"]  # fmt: skip
    assert all(list(row) == ["experiment", "trial", *config_columns, *TRIAL_COLUMNS] for row in rows)
    assert [row["config/weight_decay/value"] for row in rows].count(0.1) == 1, "a nested config value, flattened"
    alone = trial_table(storage.join(run, "svhn-cnn"))
    assert [(r["trial"], r["stop_reason"]) for r in alone] == [("broken", "error"), ("fine", "completed")], "an experiment directory on its own"


def test_csv_of_the_rows(root):
    run = storage.join(root, "run")
    write_run(run)
    rows = trial_table(run)
    path = storage.join(root, "out", "trials.csv")
    write_trials_csv(rows, path)
    read = list(csv.DictReader(io.StringIO(storage.read_text(path))))
    assert len(read) == len(rows) and list(read[0]) == list(rows[0])
    for row, back in zip(rows, read):
        assert back == {k: "" if v is None else str(v) for k, v in row.items()}
    assert trials_csv([]).splitlines() == ["experiment,trial," + ",".join(TRIAL_COLUMNS)]


def test_damaged_files_are_skipped_with_one_warning_each(tmp_path, capsys):
    run = str(tmp_path / "run")
    write_run(run)
    exp = storage.join(run, "mnist-cnn")
    write(storage.join(exp, "asha", "params.json"), "[1, 2]")
    with open(storage.join(exp, "done", "result.json"), "a") as f:
        f.write('"not a row"\n{"training_iteration": 4, "val_')  # a bad row, then a line cut short by a crash
    write(storage.join(exp, SUMMARY_FILE), "\udcff")  # not UTF-8
    trials = by_trial(trial_table(run))
    assert len(warnings_of(capsys)) == 3
    assert "asha" not in trials and len(trials) == 10
    assert trials["done"]["epochs_run"] == 3
    assert trials["done"]["stop_reason"] == "completed" and trials["done"]["test_acc"] is None, "no summary: nothing tested"
    assert trials["short"]["stop_reason"] == "completed"
    assert trials["nan"]["stop_reason"] == "diverged"


def test_best_configs_script_lists_every_trial(tmp_path, capsys):
    run = str(tmp_path / "run")
    write_run(run)
    assert best_configs_main([run, "--trials"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 11 and {r["trial"]: r["stop_reason"] for r in rows}["asha"] == "stopped by ASHA at epoch 1"
    assert best_configs_main([run, "--trials", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 11 and by_trial(rows)["done"]["test_acc"] == 0.88
    assert best_configs_main([run, "--trials", "--csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 12

