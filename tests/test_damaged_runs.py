"""Damaged, failed, diverged and interrupted runs: the analysis warns, skips and goes on.

The runs are written file by file in the layout a sweep leaves (see README "Where results
land"), through tltune.storage, so the same reads are checked on local disk and on S3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from s3server import s3, s3_server  # noqa: F401  (fixtures)
from tltune import storage
from tltune.command import best_main, report_main
from tltune.errors import UserError
from tltune.report import reference_table, top_trials
from tltune.results import (
    EXPERIMENT_FILE,
    FAILED_FILE,
    SUMMARY_FILE,
    best_configs_text,
    load_run,
    markdown_table,
    table_rows,
    top_configs,
)

CORRUPT = {
    "truncated": '{"name": "mnist-cnn", "dataset": "mn',
    "not JSON": "this is not JSON\n",
    "a list": "[1, 2]",
    "a number": "3",
    "empty": "",
    "binary": "\udcff\udcfe",  # written as raw bytes below
}


best_configs_main, report_main = best_main, report_main  # what analysis/best_configs.py and analysis/report.py run


def write(path: str, text: str) -> None:
    if "\udcff" in text:  # bytes that are not UTF-8
        fs, fs_path = storage.resolve(path)
        if not storage.is_uri(path):
            Path(fs_path).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_output_stream(fs_path) as f:
            f.write(b"\xff\xfe\x00garbage")
        return
    storage.write_text(path, text)


def write_experiment(run_dir: str, name: str = "mnist-cnn", trials=(("t1", 1e-3, 0.9), ("t2", 1e-2, 0.5)),
                     summary: bool | dict = True, failure: str | None = None, diverged: tuple = ()) -> str:  # fmt: skip
    """An experiment as a sweep writes it: record, one trial dir per trial, and the summary
    of the best trial (``summary=True``) or ``tltune_failed.json`` (``failure``)."""
    exp_dir = storage.join(run_dir, name)
    dataset = name.split("-")[0]
    record = {"name": name, "dataset": dataset, "model": "cnn", "mode": "scratch", "label": "vanilla CNN", "reference_accuracy": 98.0}
    storage.write_text(storage.join(exp_dir, EXPERIMENT_FILE), json.dumps(record))
    for trial, lr, acc in trials:
        config = {"lr": lr, "epochs": 2, "activation": "tanh", "optimizer": "adam", "batch_size": 64}
        storage.write_text(storage.join(exp_dir, trial, "params.json"), json.dumps(config))
        if trial in diverged:
            rows = [{"training_iteration": 1, "epoch": 1, "diverged": True, "val_acc": 0.0,
                     "stop_reason": "training loss became nan: the learning rate is probably too high"}]  # fmt: skip
        else:
            rows = [{"training_iteration": 1, "val_acc": acc / 2}, {"training_iteration": 2, "val_acc": acc}]
        storage.write_text(storage.join(exp_dir, trial, "result.json"), "".join(json.dumps(r) + "\n" for r in rows))
    if summary is True:
        best = max(trials, key=lambda t: t[2])
        summary = {"experiment": name, "trials": len(trials), "best_trial": best[0], "epochs_trained": 2, "val_acc": best[2],
                   "test_acc": best[2] - 0.01, "config": {"lr": best[1], "epochs": 2, "activation": "tanh", "optimizer": "adam"}}  # fmt: skip
    if summary:
        storage.write_text(storage.join(exp_dir, SUMMARY_FILE), json.dumps(summary))
    if failure is not None:
        storage.write_text(storage.join(exp_dir, FAILED_FILE), json.dumps({"experiment": name, "reason": failure}))
    return exp_dir


def warnings_of(capsys) -> list[str]:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "Traceback" not in err
    assert all(line.startswith("warning: skipping ") for line in lines), err
    return lines


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3").root


# -- 1. damaged files: one warning each, the rest is read ------------------------------


def test_damaged_files_are_skipped_with_one_warning_each(root, capsys):
    run = storage.join(root, "run")
    write_experiment(run, "mnist-cnn", trials=(("t1", 1e-3, 0.9), ("t2", 1e-2, 0.5), ("t3", 1e-1, 0.99), ("t4", 1e-4, 0.1)))
    exp = storage.join(run, "mnist-cnn")
    write(storage.join(exp, "t3", "params.json"), "[1, 2]")  # not an object: the trial is skipped
    write(storage.join(exp, "t4", "params.json"), CORRUPT["binary"])
    result = storage.join(exp, "t2", "result.json")
    storage.write_text(result, '{"training_iteration": 1, "val_acc": 0.2}\n[1, 2]\n"x"\n{"training_iteration": 2, "val_acc": 0.5}\n')
    bad_record = write_experiment(run, "cifar10-cnn-search")
    write(storage.join(bad_record, EXPERIMENT_FILE), CORRUPT["a list"])
    bad_summary = write_experiment(run, "svhn-cnn")
    write(storage.join(bad_summary, SUMMARY_FILE), CORRUPT["truncated"])

    experiments = load_run(run)
    assert [e.name for e in experiments] == ["mnist-cnn", "svhn-cnn"]
    mnist, svhn = experiments
    assert [t.name for t in mnist.trials] == ["t1", "t2"]
    assert [r["val_acc"] for r in mnist.trials[1].epochs] == [0.2, 0.5], "the good lines around the bad ones are kept"
    assert svhn.summary is None and svhn.best()["best_trial"] == "t1", "a corrupt summary: the trials still count"
    warnings = warnings_of(capsys)
    assert len(warnings) == 6, warnings
    for path in (storage.join(exp, "t3", "params.json"), storage.join(exp, "t4", "params.json"),
                 storage.join(bad_record, EXPERIMENT_FILE), storage.join(bad_summary, SUMMARY_FILE)):  # fmt: skip
        assert sum(path in w for w in warnings) == 1, (path, warnings)
    assert sum(result in w for w in warnings) == 2, "one warning per bad line of result.json"


@pytest.mark.parametrize("kind", list(CORRUPT))
@pytest.mark.parametrize("damaged", [EXPERIMENT_FILE, SUMMARY_FILE])
def test_each_kind_of_corrupt_file(tmp_path, capsys, kind, damaged):
    run = str(tmp_path / "run")
    exp = write_experiment(run, "mnist-cnn")
    write_experiment(run, "svhn-cnn")
    write(storage.join(exp, damaged), CORRUPT[kind])
    assert best_configs_main([run]) == 0
    out = capsys.readouterr()
    [warning] = out.err.splitlines()
    assert warning.startswith(f"warning: skipping {storage.join(exp, damaged)}: ") and "Traceback" not in out.err
    assert "| SVHN | vanilla CNN | 0.001 | 2 | 89.00% |" in out.out
    if damaged == SUMMARY_FILE:
        assert "| MNIST | vanilla CNN | 0.001 | 2 | not tested (val 90.00%) |" in out.out


def test_every_experiment_damaged_is_one_error(tmp_path, capsys):
    run = str(tmp_path / "run")
    for name in ("mnist-cnn", "svhn-cnn"):
        write(storage.join(write_experiment(run, name), EXPERIMENT_FILE), "{oops")
    assert best_configs_main([run]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[-1].startswith("error: ") and all(e.startswith("warning: skipping ") for e in err[:2])
    write(storage.join(run, "svhn-cnn", EXPERIMENT_FILE), "[]")  # an experiment directory given directly
    assert best_configs_main([storage.join(run, "svhn-cnn")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("warning: skipping ") and err[1].startswith("error: ")


def test_one_bad_run_does_not_kill_the_report(tmp_path, capsys):
    results = tmp_path / "results"
    write_experiment(str(results / "good"), "mnist-cnn")
    bad = write_experiment(str(results / "bad"), "svhn-cnn", summary={"experiment": "svhn-cnn", "config": [1]})
    write(storage.join(bad, EXPERIMENT_FILE), "not json")
    write(storage.join(write_experiment(str(results / "bad2"), "cifar10-cnn-search"), "t1", "params.json"), "{}x")
    assert report_main([str(results), "--out", str(tmp_path / "report")]) == 0
    warnings = warnings_of(capsys)
    assert len(warnings) == 2, warnings
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| MNIST | vanilla CNN | 0.001 | 5 | 98.00% | - | 89.00% |" in report


def test_warm_start_reads_past_damage(tmp_path, capsys):
    run = str(tmp_path / "run")
    exp = write_experiment(run, "mnist-cnn", trials=(("t1", 1e-3, 0.9), ("t2", 1e-2, 0.5), ("t3", 1e-1, 0.7)))
    write(storage.join(exp, "t3", "params.json"), '"just a string"')
    storage.write_text(storage.join(exp, "t2", "result.json"), "[0.5]\n")
    write(storage.join(write_experiment(run, "svhn-cnn"), EXPERIMENT_FILE), "")
    assert [c["lr"] for c in top_configs(run, "mnist-cnn")] == [1e-3]
    assert len(warnings_of(capsys)) == 3


def test_summary_and_result_rows_of_the_wrong_shape(tmp_path, capsys):
    """Objects, but not what a sweep writes: no crash, nothing made up."""
    run = str(tmp_path / "run")
    exp = write_experiment(run, "mnist-cnn", summary={"experiment": "mnist-cnn", "config": "lr=1", "val_acc": "high"})
    storage.write_text(storage.join(exp, "t2", "result.json"), '{"val_acc": 0.99}\n{"training_iteration": "two", "val_acc": 0.98}\n')
    experiments = load_run(run)
    rows = table_rows(experiments)
    assert rows[0]["Learning rate"] == 1e-3 and rows[0]["val_acc"] == 90.0 and rows[0]["status"].startswith("unfinished")
    markdown_table(rows), best_configs_text(rows), reference_table({e.name: e for e in experiments}), top_trials(experiments[0])
    assert len(warnings_of(capsys)) == 3  # the summary's config, two rows without an integer training_iteration


# -- 2. the scripts' arguments ---------------------------------------------------------


def test_report_out_is_a_file_or_unwritable(tmp_path, capsys):
    run = str(tmp_path / "run")
    write_experiment(run)
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for out in (taken, taken / "sub", Path("/proc/tltune-nowhere/report")):
        assert report_main([run, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and str(out) in err, err
    assert taken.read_text() == "mine"


def test_paths_that_do_not_exist_or_are_files(tmp_path, capsys):
    missing, a_file = tmp_path / "missing", tmp_path / "file"
    a_file.write_text("x")
    for path in (missing, a_file):
        for main, argv in ((best_configs_main, [str(path)]), (report_main, [str(path), "--out", str(tmp_path / "r")])):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, err


# -- 3. every trial diverged -----------------------------------------------------------


def test_all_trials_diverged_is_said_so(tmp_path, capsys):
    run = str(tmp_path / "run")
    # the sweep's summary of such an experiment has no config (no checkpoint to test)
    write_experiment(run, "mnist-cnn", diverged=("t1", "t2"), summary={"experiment": "mnist-cnn", "trials": 2, "errored_trials": 0})
    [exp] = load_run(run)
    assert exp.all_diverged and exp.best() is None
    [row] = table_rows([exp])
    assert row["status"] == "all trials diverged" and row["Accuracy"] is None and row["config"] is None
    assert "| MNIST | vanilla CNN | - | - | all diverged |" in markdown_table([row])
    assert best_configs_text([row]) == "mnist-cnn: all trials diverged"
    assert "| all trials diverged |" in reference_table({"mnist-cnn": exp})
    assert "diverged: training loss became nan" in top_trials(exp)
    assert top_configs(run, "mnist-cnn") == [], "a warm start from diverged configurations would diverge again"
    assert best_configs_main([run]) == 0 and "all diverged" in capsys.readouterr().out


def test_a_summary_pointing_at_a_diverged_trial_is_overruled(tmp_path):
    """A diverged trial reports val_acc 0: tied with a real trial at 0, Tune may pick it."""
    run = str(tmp_path / "run")
    summary = {"experiment": "mnist-cnn", "best_trial": "t1", "epochs_trained": 1, "val_acc": 0.0, "test_acc": 0.1,
               "config": {"lr": 10.0, "epochs": 2}}  # fmt: skip
    write_experiment(run, "mnist-cnn", trials=(("t1", 10.0, 0.0), ("t2", 1e-3, 0.0)), diverged=("t1",), summary=summary)
    [exp] = load_run(run)
    assert not exp.all_diverged
    assert exp.best()["best_trial"] == "t2" and "test_acc" not in exp.best()
    assert table_rows([exp])[0]["Learning rate"] == 1e-3
    # without a summary (interrupted) too
    (Path(run) / "mnist-cnn" / SUMMARY_FILE).unlink()
    [exp] = load_run(run)
    assert exp.best()["best_trial"] == "t2"


# -- 4. failed experiments -------------------------------------------------------------


def test_a_failed_experiment_shows_its_reason(tmp_path, capsys):
    run = str(tmp_path / "run")
    write_experiment(run, "mnist-cnn", summary=False, failure="CUDA out of memory: every trial failed\nsecond line")
    write_experiment(run, "svhn-cnn", trials=(), summary=False, failure="no data")
    write_experiment(run, "cifar10-cnn-search", summary=False)  # interrupted
    mnist, svhn, cifar = load_run(run)
    assert mnist.failure == "CUDA out of memory: every trial failed" and svhn.failure == "no data" and cifar.failure is None
    assert not mnist.finished and not cifar.finished
    rows = table_rows([mnist, svhn, cifar])
    assert [r["status"] for r in rows] == ["failed: CUDA out of memory: every trial failed", "failed: no data", "unfinished (no test accuracy yet)"]
    table = markdown_table(rows)
    assert "| MNIST | vanilla CNN | 0.001 | 2 | failed: CUDA out of memory: every trial failed |" in table
    assert "| SVHN | vanilla CNN | - | - | failed: no data |" in table
    assert "not tested (val 90.00%)" in table.splitlines()[-1]
    text = best_configs_text(rows)
    assert "mnist-cnn: failed: CUDA out of memory" in text and "svhn-cnn: failed: no data" in text
    reference = reference_table({e.name: e for e in (mnist, svhn, cifar)})
    assert "| failed: CUDA out of memory: every trial failed |" in reference and "| failed: no data |" in reference
    assert "unfinished (val 90.00%)" in reference
    assert capsys.readouterr().err == ""


def test_an_unreadable_failure_file_still_means_failed(tmp_path, capsys):
    run = str(tmp_path / "run")
    exp = write_experiment(run, "mnist-cnn", summary=False)
    write(storage.join(exp, FAILED_FILE), "[]")
    [result] = load_run(run)
    assert result.failure and table_rows([result])[0]["status"].startswith("failed: ")
    assert len(warnings_of(capsys)) == 1


# -- 5. interrupted runs ---------------------------------------------------------------


def test_interrupted_runs_are_read_without_warnings(tmp_path, capsys):
    run = str(tmp_path / "run")
    exp = write_experiment(run, "mnist-cnn", trials=(("t1", 1e-3, 0.9), ("t2", 1e-2, 0.5), ("t3", 1e-1, 0.7)), summary=False)
    (Path(exp) / "t2" / "result.json").unlink()  # started, no epoch reported yet
    (Path(exp) / "t3" / "params.json").unlink()  # Tune had only made the directory
    with (Path(exp) / "t1" / "result.json").open("a") as f:
        f.write('{"training_iteration": 3, "val_')  # cut short by a crash
    write_experiment(run, "svhn-cnn", trials=(), summary=False)  # killed before its first trial
    mnist, svhn = load_run(run)
    assert [t.name for t in mnist.trials] == ["t1", "t2"] and mnist.trials[1].epochs == []
    rows = table_rows([mnist, svhn])
    assert rows[0]["status"] == "unfinished (no test accuracy yet)" and rows[0]["val_acc"] == 90.0
    assert rows[1]["status"].startswith("interrupted")
    top_trials(mnist), reference_table({"mnist-cnn": mnist, "svhn-cnn": svhn})
    assert best_configs_main([run]) == 0
    assert capsys.readouterr().err == ""


def test_load_run_errors_stay_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run(tmp_path / "nothing")
