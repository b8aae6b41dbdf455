"""A user's own sweep end to end: a spec file that searches torchvision backbones and the mode
(fine-tuning vs feature extraction), and a user factory with a searched keyword, run once
through the ``tltune`` command on a tiny real class-folder dataset; the table, trials.csv, the
Optuna journal and the report read it back with the new dimensions like any other."""

import csv
import dataclasses
import io
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import write_class_folders

FACTORY = '''
import torch.nn as nn


def build(num_classes, dropout=0.0, hidden=16):
    """A small user model: conv features, a hidden Linear with Dropout, a last Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(8 * 16, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes),
    )
'''


def spec_text(data: str) -> str:
    return textwrap.dedent(f"""\
        experiments:
          - name: tiny-backbones
            dataset: {data}
            model: {{choice: [resnet18, mobilenet_v3_small]}}
            mode: {{choice: [finetune, feature_extract]}}
            weights: none
            image_size: 32
            reference: {{optimizer: sgd, lr: 0.01, epochs: 2}}
            space:
              optimizer: {{choice: [sgd, adam]}}
              lr: {{loguniform: [1.0e-4, 1.0e-1]}}
              epochs: {{int: [1, 2]}}
            num_samples: 4
            grace_period: 1
            repeats: 1
          - name: tiny-factory
            dataset: {data}
            model: "mymodels:build"
            mode: {{choice: [scratch, feature_extract]}}
            reference: {{optimizer: adam, lr: 0.003, epochs: 2, dropout: 0.1}}
            space:
              lr: {{loguniform: [1.0e-4, 1.0e-2]}}
              dropout: {{uniform: [0.0, 0.5]}}
            num_samples: 3
            repeats: 1
        """)


@pytest.fixture(scope="module")
def spec_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec-run")
    data = write_class_folders(tmp / "pets", per_class=8, size=(16, 16))
    (tmp / "spec").mkdir()
    (tmp / "spec" / "mymodels.py").write_text(FACTORY)
    spec = tmp / "spec" / "pets.yaml"
    spec.write_text(spec_text(str(data)))
    argv = [sys.executable, "-m", "tltune", "sweep", str(spec), "--storage-path", str(tmp / "results"), "--name", "pets", "--val-fraction", "0.25"]
    # from another folder: the factory's module is found beside the spec file
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return tmp / "results" / "pets", out.stdout


def tltune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tltune", *args], capture_output=True, text=True, timeout=300)


def test_the_table_gives_the_best_per_model_and_mode(spec_run):
    run_dir, stdout = spec_run
    assert "tiny-backbones: best per model and mode" in stdout
    assert "tiny-factory: best per model and mode" in stdout
    best = tltune("best", str(run_dir), "--json")
    rows = {row["experiment"]: row for row in json.loads(best.stdout)}
    assert rows["tiny-backbones"]["status"] == "finished" and rows["tiny-factory"]["status"] == "finished"
    assert {"model", "mode"} <= set(rows["tiny-backbones"]["config"])  # searched: shown
    assert "dropout" in rows["tiny-factory"]["config"]


def test_trials_csv_has_the_new_dimensions(spec_run):
    run_dir, _ = spec_run
    rows = list(csv.DictReader(io.StringIO(tltune("best", str(run_dir), "--trials").stdout)))
    backbones = [r for r in rows if r["experiment"] == "tiny-backbones"]
    assert len(backbones) == 4
    assert {r["config/model"] for r in backbones} <= {"resnet18", "mobilenet_v3_small"}
    assert {r["config/mode"] for r in backbones} <= {"finetune", "feature_extract"}
    factory = [r for r in rows if r["experiment"] == "tiny-factory"]
    assert all(0.0 <= float(r["config/dropout"]) <= 0.5 for r in factory)
    assert len({r["config/dropout"] for r in factory}) > 1, "dropout is searched"


def test_the_optuna_study_holds_model_and_mode(spec_run):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    run_dir, _ = spec_run
    storage = JournalStorage(JournalFileBackend(str(run_dir / "tiny-backbones" / "optuna.journal")))
    study = optuna.load_study(study_name="tiny-backbones", storage=storage)
    assert len(study.trials) == 4
    assert all({"model", "mode", "lr"} <= set(t.params) for t in study.trials)


def test_the_report_draws_each_backbone(spec_run, tmp_path):
    run_dir, _ = spec_run
    out = tltune("report", str(run_dir), "--out", str(tmp_path / "report"))
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    assert "tiny-backbones" in report and "best per model and mode" in report
    assert (tmp_path / "report" / "finetune_vs_feature_extraction.png").stat().st_size > 0


def test_feature_extraction_trials_use_one_cache_per_backbone(spec_run):
    run_dir, stdout = spec_run
    assert "backbone features of resnet18, mobilenet_v3_small ready" in stdout


def test_tensorboard_hparams_has_the_new_dimensions(spec_run):
    from test_tensorboard_hparams import TensorBoardBackend

    run_dir, _ = spec_run
    infos = {info.name: info for info in TensorBoardBackend(run_dir).experiment().hparam_infos}
    assert {"model", "mode", "dropout"} <= set(infos)
    assert {v.string_value for v in infos["model"].domain_discrete.values} == {"resnet18", "mobilenet_v3_small", "mymodels:build"}
    assert (infos["dropout"].domain_interval.min_value, infos["dropout"].domain_interval.max_value) == (0.0, 0.5)


def test_the_run_alone_is_enough_to_resume_it(spec_run, command, tmp_path, monkeypatch):
    """``tltune sweep --resume RUN``: the run's signed record names what it swept (here the spec
    file, by its absolute path), so a resume from any folder needs nothing else."""
    run_dir, _ = spec_run
    first = json.loads((run_dir / "runs.jsonl").read_text().splitlines()[0])
    assert first["targets"] == [str(run_dir.parents[1] / "spec" / "pets.yaml")]
    monkeypatch.chdir(tmp_path)
    code, out, err = command("sweep", "--resume", str(run_dir))
    assert code == 0, err
    assert "tiny-backbones: finished" in out and "tiny-factory: finished" in out and "nothing to run" in out
    assert "Best configuration of each experiment" in out, "a finished run resumed shows its table"
    import tltune  # the same from Python

    finished = tltune.run(resume=str(run_dir))  # nothing to run: the run as it is
    assert sorted(finished.experiments) == ["tiny-backbones", "tiny-factory"], finished.experiments
    with pytest.raises(tltune.UserError, match="name the experiments"):
        tltune.run(num_samples=2)


def test_what_a_run_swept_is_recorded_as_tltune_sweep_takes_it(tmp_path):
    from tltune.experiments import EXPERIMENTS, FAMILIES
    from tltune.plan import sweep_targets
    from tltune.specs import load_spec_file

    (tmp_path / "mymodels.py").write_text(FACTORY)
    (tmp_path / "pets.yaml").write_text(spec_text(str(tmp_path)))
    spec_experiments = load_spec_file(tmp_path / "pets.yaml")
    mnist = [EXPERIMENTS[name] for name in FAMILIES["mnist"]]
    assert sweep_targets(mnist + spec_experiments, run_all=False) == [*FAMILIES["mnist"], str(tmp_path / "pets.yaml")]
    assert sweep_targets([EXPERIMENTS["mnist-cnn"]], run_all=True) == ["all"]
    made_in_python = dataclasses.replace(EXPERIMENTS["mnist-cnn"], num_samples=3)
    assert sweep_targets([EXPERIMENTS["svhn-cnn"], made_in_python], run_all=False) is None


def test_a_bare_resume_says_what_it_needs(tmp_path, command):
    from tltune import trust
    from tltune.records import RunRecord

    run = tmp_path / "run"
    run.mkdir()

    def recorded(**fields) -> None:
        (run / "runs.jsonl").write_text(json.dumps(trust.sign_record(RunRecord(started="now", options={}, **fields).to_dict())) + "\n")

    code, _, err = command("sweep", "--resume", str(tmp_path))
    assert code == 2 and err.startswith("error: ") and "not a tltune run directory" in err
    recorded(targets=None)  # experiments made in Python
    code, _, err = command("sweep", "--resume", str(run))
    assert code == 2 and f"name it again, tltune sweep FAMILY|EXPERIMENT|SPEC.yaml --resume {run}" in err
    recorded(targets=[str(tmp_path / "gone.yaml")])
    code, _, err = command("sweep", f"--resume={run}")
    assert code == 2 and f"swept the spec file {tmp_path / 'gone.yaml'}, which is not there any more" in err
    first = json.loads((run / "runs.jsonl").read_text())
    (run / "runs.jsonl").write_text(json.dumps({**first, "targets": ["mnist-cnn", "/tmp/someone-elses.yaml"]}) + "\n")
    code, _, err = command("sweep", "--resume", str(run))
    assert code == 2 and "refusing to resume" in err and len(err.strip().splitlines()) == 1


def test_resume_and_warm_start_take_the_spec(spec_run, command, tmp_path, monkeypatch):
    """In this process: the resume of the finished run starts nothing, the warm start sweeps 2 trials."""
    run_dir, _ = spec_run
    monkeypatch.chdir(tmp_path)
    spec = run_dir.parents[1] / "spec" / "pets.yaml"
    code, out, err = command("sweep", str(spec), "--resume", str(run_dir), "--val-fraction", "0.25")
    assert code == 0, err
    assert "tiny-backbones: finished" in out and "tiny-factory: finished" in out
    best = json.loads((run_dir / "tiny-factory" / "tltune_best.json").read_text())["config"]
    code, out, err = command("sweep", str(spec), "--experiments", "tiny-factory", "--warm-start", str(run_dir), "--num-samples", "2",
                             "--repeats", "1", "--val-fraction", "0.25", "--storage-path", str(tmp_path), "--name", "warm", "--quiet")  # fmt: skip
    assert code == 0, out[-2000:] + err[-2000:]
    # --quiet: the final table only (a count of trials per state at most once a minute)
    assert "Best configuration of each experiment:" in out and "| Dataset |" in out
    assert "== tiny-factory" not in out and "loading" not in out and "trial " not in out.split("Best configuration")[0]
    configs = [json.loads(p.read_text()) for p in (tmp_path / "warm" / "tiny-factory").glob("*/params.json")]
    assert any(c["lr"] == best["lr"] and c["dropout"] == best["dropout"] for c in configs), "the earlier run's best is evaluated again"
