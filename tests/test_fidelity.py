"""Fidelity: the reference settings always train to the end and get a test accuracy, and
--repeats re-trains the reference and the best configuration with more seeds (mean ± std)."""

import json
from dataclasses import replace

from ray.tune.experiment import Trial

from tltune.options import parse
from tltune.plan import experiment_settings
from tltune.experiments import EXPERIMENTS
from tltune.config import TrialConfig
from tltune.raytune.sweep import ReferenceExemptASHA, repeat_values
from tltune.records import ExperimentSummary
from tltune.results import accuracy_text, best_vs_reference, difference_text, experiment_rows, load_run, repeat_rows, seed_accuracies, trial_table


def test_asha_stops_a_poor_trial_but_never_the_reference():
    settings = experiment_settings(EXPERIMENTS["mnist-cnn"], parse([]))
    scheduler = ReferenceExemptASHA(settings, time_attr="training_iteration", max_t=9, grace_period=1, reduction_factor=3)
    scheduler.set_search_properties("val_acc", "max")
    searched = {k: settings.reference[k] for k in settings.space}
    good = [Trial("t", config={**searched, "lr": 0.5 + i}, stub=True) for i in range(4)]
    poor = Trial("t", config={**searched, "lr": 0.123}, stub=True)
    reference = Trial("t", config=dict(searched), stub=True)
    for trial in [*good, poor, reference]:
        scheduler.on_trial_add(None, trial)
    for i, trial in enumerate(good):
        scheduler.on_trial_result(None, trial, {"training_iteration": 1, "val_acc": 0.9 + i / 100})
    assert scheduler.on_trial_result(None, poor, {"training_iteration": 1, "val_acc": 0.1}) == scheduler.STOP
    assert scheduler.on_trial_result(None, reference, {"training_iteration": 1, "val_acc": 0.1}) == scheduler.CONTINUE


def test_accuracies_with_and_without_repeats():
    summary = ExperimentSummary(test_acc=0.9, reference_trial={"test_acc": 0.8})
    assert accuracy_text(seed_accuracies(summary, "best")) == "90.00%"
    summary.repeats = {"best": {"test_acc": [0.9, 0.92, 0.88]}, "reference": {"test_acc": [0.8, 0.81, 0.79]}}
    assert accuracy_text(seed_accuracies(summary, "best")) == "90.00 ± 2.00% (3 seeds)"
    assert difference_text(seed_accuracies(summary, "best"), seed_accuracies(summary, "reference")) == "+10.00 (beyond the spread)"
    assert difference_text([0.9, 0.8], [0.86, 0.84]) == "+0.00 (within the spread)"
    assert best_vs_reference(replace(summary, best_trial="a", reference_trial={"trial": "b", "test_acc": 0.8})) == "+10.00 (beyond the spread)"
    assert best_vs_reference(replace(summary, best_trial="a", reference_trial={"trial": "a", "test_acc": 0.9})) == "0 (the reference is the best)"


def test_reference_scored_and_repeats(mnist_run):
    run_dir = mnist_run.run_dir
    summary = json.loads((run_dir / "mnist-cnn" / "tltune_best.json").read_text())
    reference = summary["reference_trial"]
    assert reference["epochs_trained"] == 2 and 0 < reference["test_acc"] <= 1, "the reference trained to the end and was tested"
    repeats = summary["repeats"]
    assert repeats["seeds"] == [0, 1]
    for group in ("reference", "best"):
        assert len(repeats[group]["test_acc"]) == 2 and len(set(repeats[group]["trials"])) == 2
        assert repeats[group]["seeds"] == [0, 1], "each run's own seed, read from its config"
        assert len(set(repeats[group]["epochs"])) == 1, "a repeat trains the epochs its original trained (ASHA may have stopped it)"
    assert repeats["reference"]["test_acc"][0] == reference["test_acc"] and repeats["best"]["test_acc"][0] == summary["test_acc"]
    assert summary["epochs_spent"] >= 2 + 2 * 1, "search epochs plus the repeats'"
    assert "(2 seeds)" in mnist_run.stdout, "the table shows mean ± std"
    assert "(2 seeds) (2 of 5 epochs: --max-epochs)" in mnist_run.stdout, "the reference settings as this run trained them"
    tested = {r["trial"]: r["test_acc"] for r in trial_table(run_dir) if r["test_acc"] is not None}
    assert tested[reference["trial"]] == reference["test_acc"], "the per-trial table has the reference's test accuracy"
    cnn = [e for e in load_run(run_dir) if e.name == "mnist-cnn"]
    rows = repeat_rows(cnn)
    assert [(r["group"], r["seed"]) for r in rows] == [("reference", 0), ("reference", 1), ("best", 0), ("best", 1)]
    assert [r["test_acc"] for r in rows] == repeats["reference"]["test_acc"] + repeats["best"]["test_acc"]
    assert [r["epochs"] for r in rows] == repeats["reference"]["epochs"] + repeats["best"]["epochs"]
    (row,) = experiment_rows(cnn)
    assert row["status"] == "finished" and row["reference_seeds"] == row["best_seeds"] == 2
    assert row["reference_test_acc_mean"] == round(50 * sum(repeats["reference"]["test_acc"]), 3)
    assert row["search_epochs"] + row["repeat_epochs"] == summary["epochs_spent"] and row["repeat_epochs"] == repeats["epochs_spent"]
    assert row["wall_s"] == summary["wall_s"] and row["precision_used"] in ("fp32", "bf16")


def test_best_accuracy_over_sweep_time(tmp_path):
    from test_trials_table import write_run

    from tltune.results import best_over_time, load_run, search_wall_s

    write_run(str(tmp_path / "run"))
    finished = next(e for e in load_run(tmp_path / "run") if e.name == "mnist-cnn")
    # trials' last epochs only (what the sweep keeps and selects on): "done" ended at 0.9 after
    # 0.5 and 0.7, "short" at 0.6 in the first minute; no started_at recorded: from the first report
    assert best_over_time(finished) == [(0.0, 0.6), (0.17, 0.9)]
    assert search_wall_s(finished) == 10.0, "first report to last report"


def test_a_repeat_of_a_stopped_trial_keeps_its_schedule_and_stops_where_it_stopped():
    space = {"lr": None, "epochs": None, "schedule": None}
    config = {"lr": 0.1, "epochs": 10, "schedule": "onecycle", "seed": 0, "batch_size": 64}
    assert repeat_values(config, 4, space) == {"lr": 0.1, "epochs": 10, "schedule": "onecycle", "stop_epoch": 4}
    assert repeat_values(config, 10, space)["stop_epoch"] is None, "a trial that completed is repeated in full"


def test_the_initial_weights_come_from_the_trial_seed_alone():
    """A reused Ray actor runs trials one after another in one process: the weights a trial
    starts from must not depend on what the process drew before."""
    import torch

    from test_trial_failures import tiny_splits
    from tltune.train import setup_model

    def first_weights(seed: int) -> torch.Tensor:
        torch.rand(1000)  # what an earlier trial in this process drew
        config = TrialConfig("tiny", "cnn", "scratch", "adam", 1e-3, 1, 8, seed)
        model, _ = setup_model(config, tiny_splits(), None)
        return next(model.parameters()).detach().clone()

    assert torch.equal(first_weights(1), first_weights(1))
    assert not torch.equal(first_weights(1), first_weights(2))


def test_a_search_narrowed_past_the_reference_says_so(capsys):
    experiment = EXPERIMENTS["mnist-cnn"]
    experiment_settings(experiment, parse(["--lr-range", "0.01", "0.1"]))
    assert "the reference's lr=0.001 lies outside the searched ranges" in capsys.readouterr().err
    experiment_settings(experiment, parse(["--lr-range", "1e-4", "0.1"]))
    assert capsys.readouterr().err == ""


def test_an_interrupted_experiment_keeps_its_time_for_the_resume(tmp_path):
    import time

    import pytest

    from tltune.raytune.sweep import ExperimentClock
    from tltune.results import TIME_FILE

    exp_dir = str(tmp_path)
    with pytest.raises(KeyboardInterrupt), ExperimentClock(exp_dir):
        time.sleep(0.2)
        raise KeyboardInterrupt
    first = json.loads((tmp_path / TIME_FILE).read_text())["spent_s"]
    assert first >= 0.2 - 0.05
    with ExperimentClock(exp_dir) as resumed:  # the resume goes on from there, and finishes
        assert resumed.spent_s() >= first
    (tmp_path / TIME_FILE).write_text("not json")
    assert ExperimentClock(exp_dir).spent_s() < 1, "a damaged record counts from now"
