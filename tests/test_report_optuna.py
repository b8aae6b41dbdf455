"""The report on the libraries: Optuna's plots from the study a sweep keeps in
``<experiment>/optuna.journal`` (a real JournalStorage study made here), the learning curves
with ASHA's stops marked, the fine-tune vs feature-extraction bars and ``trials.csv``; a
missing or damaged journal only skips the Optuna plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from s3server import s3, s3_server  # noqa: F401  (fixtures)
from test_damaged_runs import report_main, warnings_of, write, write_experiment
from test_trials_table import summary_of, write_trial
from tltune import storage
from tltune.report import collect, finetune_vs_extract_bars, plot_accuracy_vs_lr
from tltune.results import OPTUNA_JOURNAL

SPACE = {
    "optimizer": CategoricalDistribution(["adam", "sgd"]),
    "lr": FloatDistribution(1e-5, 10.0, log=True),
    "epochs": IntDistribution(1, 3),
}
# (trial, val_acc per epoch, searched hyperparameters, ends): how Ray's OptunaSearch tells the study
TRIALS = [
    ("done", (0.5, 0.7, 0.9), {"optimizer": "adam", "lr": 1e-3, "epochs": 3}),
    ("asha", (0.3,), {"optimizer": "sgd", "lr": 1e-4, "epochs": 3}),
    ("other", (0.4, 0.6, 0.8), {"optimizer": "sgd", "lr": 3e-3, "epochs": 3}),
    ("nan", (0.2,), {"optimizer": "adam", "lr": 10.0, "epochs": 2}),
]
OPTUNA_PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")


def write_study(exp_dir: Path, name: str, trials) -> None:
    """A study in a JournalStorage file, named after the experiment, told each trial's
    intermediate values and last value as Ray's OptunaSearch does."""
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(exp_dir / OPTUNA_JOURNAL)))
    study = optuna.create_study(study_name=name, storage=journal, direction="maximize")
    for _, curve, params in trials:
        study.enqueue_trial(params)
        trial = study.ask(SPACE)
        for step, value in enumerate(curve, 1):
            trial.report(value, step)
        study.tell(trial, curve[-1])


def write_searched_experiment(run: Path, name: str = "mnist-cnn", study_trials=TRIALS) -> Path:
    exp = Path(write_experiment(str(run), name, trials=(), summary=summary_of(name, "done", 0.88)))
    for trial, curve, params in TRIALS:
        write_trial(str(exp), trial, curve, diverged=trial == "nan", **params)
    if study_trials is not None:
        write_study(exp, name, study_trials)
    return exp


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path


def test_report_with_the_optuna_study(tmp_path, capsys):
    run = tmp_path / "run"
    write_searched_experiment(run)
    write_experiment(str(run), "mnist-alexnet-finetune", trials=(("t1", 1e-3, 0.97),))  # no search space: no journal
    before = snapshot(run)
    out = tmp_path / "report"
    assert report_main([str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert snapshot(run) == before, "the run directory is only read (no lock file beside the journal)"
    report = (out / "report.md").read_text()
    for png in [f"mnist-cnn-{kind}.png" for kind in (*OPTUNA_PLOTS, "intermediate_values")] + [
        "mnist-alexnet-finetune-intermediate_values.png", "accuracy_vs_lr.png", "finetune_vs_feature_extraction.png"
    ]:  # fmt: skip
        assert_png(out / png)
        assert f"]({png})" in report
    assert not list(out.glob("mnist-alexnet-finetune-optimization_history.png")), "no study, no Optuna plots"
    assert "4 trial(s): 2 completed, 1 stopped by ASHA, 1 diverged" in report
    assert "[trials.csv](trials.csv)" in report
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert {(r["experiment"], r["trial"], r["stop_reason"]) for r in rows} == {
        ("mnist-cnn", "done", "completed"), ("mnist-cnn", "asha", "stopped by ASHA at epoch 1"),
        ("mnist-cnn", "other", "completed"), ("mnist-cnn", "nan", "diverged"),
        ("mnist-alexnet-finetune", "t1", "completed"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "study_trials, why",
    [
        (TRIALS[:1], "needs 2 completed trials"),
        ([TRIALS[0], ("again", (0.2, 0.3, 0.4), TRIALS[0][2])], "a hyperparameter that varies"),
    ],
)
def test_importances_need_two_trials_that_differ(tmp_path, capsys, study_trials, why):
    run = tmp_path / "run"
    write_searched_experiment(run, study_trials=study_trials)
    out = tmp_path / "report"
    assert report_main([str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    report = (out / "report.md").read_text()
    note = next(line for line in report.splitlines() if line.startswith("_param importances: skipped ("))
    assert why in note
    assert not (out / "mnist-cnn-param_importances.png").exists()
    assert_png(out / "mnist-cnn-optimization_history.png")


@pytest.mark.parametrize("damage", ["garbage", "binary", "empty", "another study", "cut in the middle"])
def test_a_damaged_journal_is_skipped_with_one_warning(tmp_path, capsys, damage):
    run = tmp_path / "run"
    exp = write_searched_experiment(run, study_trials=None)
    journal = exp / OPTUNA_JOURNAL
    if damage == "another study":
        write_study(exp, "svhn-cnn", TRIALS)
    elif damage == "cut in the middle":
        write_study(exp, "mnist-cnn", TRIALS)
        lines = journal.read_text().splitlines(keepends=True)
        journal.write_text("".join(lines[:3]) + lines[3][:20] + "\n" + "".join(lines[4:]))
    else:
        write(str(journal), {"garbage": "not a journal\n", "binary": "\udcff", "empty": ""}[damage])
    out = tmp_path / "report"
    assert report_main([str(run), "--out", str(out)]) == 0
    [warning] = warnings_of(capsys)
    assert warning.startswith(f"warning: skipping {journal}: ")
    assert not list(out.glob("*optimization_history.png")) and not list(out.glob("*param_importances.png"))
    assert_png(out / "mnist-cnn-intermediate_values.png")
    assert (out / "trials.csv").read_text().count("\n") == 1 + len(TRIALS)


def test_a_journal_at_the_end_of_a_crash_is_read(tmp_path, capsys):
    """A sweep killed while appending leaves half a last line: Optuna ignores it, so do we."""
    run = tmp_path / "run"
    exp = write_searched_experiment(run)
    with (exp / OPTUNA_JOURNAL).open("a") as f:
        f.write('{"op_code": 6, "worker_id": "x", "tri')
    out = tmp_path / "report"
    assert report_main([str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    assert_png(out / "mnist-cnn-param_importances.png")


def test_the_study_of_a_run_on_s3(tmp_path, s3, capsys):
    local = tmp_path / "local"
    write_searched_experiment(local)
    run = storage.join(s3.root, "run")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_text(storage.join(run, str(path.relative_to(local))), path.read_text())
    before = storage.find(s3.root, OPTUNA_JOURNAL) + storage.list_dir(storage.join(run, "mnist-cnn"))
    out = tmp_path / "report"
    assert report_main([run, "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    for kind in (*OPTUNA_PLOTS, "intermediate_values"):
        assert_png(out / f"mnist-cnn-{kind}.png")
    assert storage.find(s3.root, OPTUNA_JOURNAL) + storage.list_dir(storage.join(run, "mnist-cnn")) == before


def test_accuracy_vs_lr_marks_how_each_trial_ended(tmp_path, monkeypatch):
    import matplotlib
    from matplotlib.axes import Axes

    matplotlib.use("Agg")
    run = tmp_path / "run"
    write_searched_experiment(run, study_trials=None)
    drawn = []
    scatter = Axes.scatter
    monkeypatch.setattr(Axes, "scatter", lambda ax, x, y, **kw: drawn.append((x, kw)) or scatter(ax, x, y, **kw))
    plot_accuracy_vs_lr(collect([run]), tmp_path)
    style = {lr: ("hollow" if kw.get("facecolors") == "none" else kw["marker"]) for lr, kw in drawn}
    assert style == {1e-3: "o", 3e-3: "o", 1e-4: "hollow", 10.0: "x"}, "completed filled, ASHA-stopped hollow, diverged x"


def test_finetune_and_feature_extraction_bars_beside_the_reference(tmp_path):
    run = tmp_path / "run"
    for name, acc, mode, reference in (("mnist-alexnet-finetune", 0.97, "finetune", 99.57),
                                       ("mnist_to_svhn-feature_extract", 0.61, "feature_extract", None)):  # fmt: skip
        record = Path(write_experiment(str(run), name, trials=(("t1", 1e-3, acc),))) / "tltune_experiment.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "mode": mode, "reference_accuracy": reference}))
    bars = finetune_vs_extract_bars(collect([run]))
    assert bars["mnist-alexnet"] == {"finetune": (pytest.approx(96.0), 99.57), "feature_extract": (None, 97.52)}
    assert bars["mnist_to_svhn"] == {"feature_extract": (pytest.approx(60.0), None)}, "ours, with no reference to stand beside"
    assert bars["cifar10-alexnet"] == {"finetune": (None, 88.93), "feature_extract": (None, 84.43)}, "the reference, not run here"


def test_a_report_of_ones_own_sweep_shows_ones_own_experiments(tmp_path):
    """No seed experiment among the runs: no rows of the seed marked "not run", no MNIST -> SVHN
    line, no seed assumptions, and no fine-tuning plot when nothing fine-tuned."""
    from tltune.report import write_report

    run = tmp_path / "run"
    exp_dir = Path(write_experiment(str(run), "pets-mine", trials=(("t1", 1e-3, 0.5),)))
    record = exp_dir / "tltune_experiment.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "mode": "scratch", "dataset": "pets", "label": "mine"}))
    report = write_report([run], tmp_path / "out").read_text()
    assert "not run" not in report and "MNIST -> SVHN" not in report and "## Assumptions" not in report
    assert "| pets | mine |" in report
    assert not (tmp_path / "out" / "finetune_vs_feature_extraction.png").exists()
    assert finetune_vs_extract_bars(collect([run])) == {}
