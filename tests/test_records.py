"""The JSON records a sweep writes are types with a schema version, written and read by the
same classes; older records (no schema) still read, newer ones read with one warning."""

import json

import pytest

from tltune.records import ExperimentRecord, ExperimentSummary, FailureRecord, RunRecord, TimeRecord
from tltune.results import load_experiment

EXAMPLES = [
    RunRecord(started="2026-12-01 10:00:00", argv=["tltune", "sweep", "mnist"], options={"quick": True}),
    ExperimentRecord(name="mnist-cnn", dataset="mnist", model="cnn", mode="scratch", label="vanilla CNN",
                     reference={"lr": 0.001, "epochs": 5}, reference_accuracy=98.0, settings={"seed": 0}, space={"lr": "LogUniform(1e-05, 0.1)"}),
    ExperimentSummary(experiment="mnist-cnn", trials=3, best_trial="t1", config={"lr": 0.01}, epochs_trained=2, val_acc=0.9, test_acc=0.91,
                      reference_trial={"trial": "t0", "test_acc": 0.9}, epochs_spent=6, wall_s=12.5),
    FailureRecord(experiment="mnist-cnn", reason="CUDA out of memory"),
    TimeRecord(spent_s=61.5),
]  # fmt: skip


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_each_record_reads_back_what_it_wrote(record, capsys):
    data = json.loads(record.to_json())
    assert data["schema"] == type(record).SCHEMA
    assert type(record).from_dict(data) == record
    assert capsys.readouterr().err == ""


def test_records_from_before_schema_versions_read_as_version_1(capsys):
    old = {"experiment": "mnist-cnn", "trials": 2, "best_trial": "t1", "config": {"lr": 0.1}, "val_acc": 0.5, "test_acc": 0.4}
    summary = ExperimentSummary.from_dict(old)
    assert summary.test_acc == 0.4 and summary.repeats is None and capsys.readouterr().err == ""
    assert RunRecord.from_dict({"started": "x", "argv": [], "args": {"lr": 0.1}}).saved_options() == {"lr": 0.1}


def test_a_newer_schema_is_one_warning_and_read_as_far_as_it_goes(capsys):
    newer = {"schema": 99, "spent_s": 5.0, "a_later_field": [1, 2]}
    assert TimeRecord.from_dict(newer, "run/exp/tltune_time.json") == TimeRecord(spent_s=5.0)
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: run/exp/tltune_time.json: written by a newer tltune (schema 99; this one reads 1)")


def test_a_field_of_the_wrong_type_makes_the_record_unreadable():
    with pytest.raises(ValueError, match="its trials, val_acc are not of the type tltune writes"):
        ExperimentSummary.from_dict({"trials": "3", "val_acc": True})


def test_a_wrong_field_in_a_run_folder_is_skipped_with_one_warning(tmp_path, capsys):
    exp = tmp_path / "mnist-cnn"
    exp.mkdir()
    (exp / ExperimentRecord.FILE).write_text(EXAMPLES[1].to_json())
    (exp / ExperimentSummary.FILE).write_text(json.dumps({**EXAMPLES[2].to_dict(), "wall_s": "an hour"}))
    result = load_experiment(str(exp))
    assert result.record == EXAMPLES[1] and result.summary is None
    [line] = capsys.readouterr().err.splitlines()
    assert line == f"warning: skipping {exp / ExperimentSummary.FILE}: its wall_s is not of the type tltune writes"
