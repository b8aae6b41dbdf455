"""tltune from Python, without the command line: run, load, experiments, typed errors."""

import pytest

import tltune
from tltune.plan import run_label
from tltune.experiments import EXPERIMENTS, FAMILIES, CNN_SEARCH_SPACE, Experiment, LogUniform

from conftest import MNIST_RUN_EXPERIMENTS, MNIST_RUN_SAMPLES


def test_experiments_lists_every_declared_one():
    assert [e.name for e in tltune.experiments()] == list(EXPERIMENTS)
    assert all(name in EXPERIMENTS for names in FAMILIES.values() for name in names)


def test_run_directories_are_named_after_the_experiments():
    assert run_label([EXPERIMENTS[n] for n in FAMILIES["cifar10"]]) == "cifar10"
    assert run_label([EXPERIMENTS[n] for n in FAMILIES["mnist_to_svhn"]]) == "mnist_to_svhn"
    assert run_label([EXPERIMENTS["mnist-cnn"]]) == "mnist-cnn"
    assert run_label([EXPERIMENTS["mnist-cnn"], EXPERIMENTS["svhn-cnn"]]) == "sweep"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_sample": 3}, "unknown option 'num_sample'"),
        ({"optimizer": "nope"}, "optimizer: invalid choice 'nope'"),
        ({"seed": -1}, "--seed"),
        ({"lr_range": (1e-2, 1e-4)}, "lr"),
        ({"num_samples": "many"}, "num_samples must be an int, got 'many'"),
        ({"lr": True}, "lr must be a float"),
        ({"lr_range": "1e-4 1e-2"}, "lr_range must be a list of float"),
        ({"train_subset": [100]}, "train_subset must be an int"),
    ],
)
def test_options_are_checked_like_the_command_line(options, message, tmp_path):
    with pytest.raises(tltune.UserError, match=message):
        tltune.run("mnist-cnn", storage_path=str(tmp_path), **options)
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_run_and_load_from_python(mnist_run, tmp_path):
    """The session's MNIST run is tltune.run's (conftest): its Run, and the same run loaded."""
    assert mnist_run.handler_restored, "the caller's signal handlers are back"
    run = mnist_run.run
    assert run.path.rsplit("/", 1)[-1].startswith("mnist-2")
    mine = run["mnist-cnn"]
    assert mine.status == "finished" and 0 < mine.test_acc <= 1 and 0 < mine.val_acc <= 1
    assert set(mine.best_config) >= {"lr", "activation", "optimizer", "epochs"}
    rows = run.trials()
    assert len(rows) == len(MNIST_RUN_EXPERIMENTS) * MNIST_RUN_SAMPLES and all(r["stop_reason"] for r in rows)
    assert "| MNIST | vanilla CNN |" in run.table()

    loaded = tltune.load(run.path)
    assert list(loaded.experiments) == list(MNIST_RUN_EXPERIMENTS) and loaded["mnist-cnn"].test_acc == mine.test_acc
    grid = loaded["mnist-cnn"].result_grid()
    assert len(grid) == MNIST_RUN_SAMPLES and grid.get_best_result(scope="last").config["lr"] == mine.best_config["lr"]
    report = loaded.report(tmp_path / "report")
    assert report.is_file() and (tmp_path / "report" / "trials.csv").is_file()
    with pytest.raises(KeyError, match="cifar10-cnn-search"):
        loaded["cifar10-cnn-search"]


def test_an_experiment_declared_in_python_is_planned_like_a_built_in_one(tmp_path):
    """A user's own Experiment object reaches the checks a built-in one does (here: the data root)."""
    own = Experiment("my-mnist", "mnist", "cnn", "scratch", "my CNN", {"optimizer": "adam", "activation": "relu", "lr": 1e-3, "epochs": 2},
                     None, {"lr": LogUniform(1e-4, 1e-2), "activation": CNN_SEARCH_SPACE["activation"]}, num_samples=2)  # fmt: skip
    with pytest.raises(tltune.UserError, match="data root .*nowhere does not exist"):
        tltune.run([own], quick=True, data_root=str(tmp_path / "nowhere"), storage_path=str(tmp_path / "results"))
    assert not (tmp_path / "results").exists() or list((tmp_path / "results").iterdir()) == [], "nothing written"


def test_tunes_environment_is_set_only_while_a_sweep_runs(monkeypatch):
    """A notebook's own Tune runs after tltune.run keep Tune's defaults (result.json and all)."""
    import os

    from ray.tune.execution import class_cache

    from tltune.raytune.sweep import THREAD_TIMEOUT_ENV, TUNE_ENVIRONMENT, tune_environment

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    with tune_environment():
        assert all(os.environ[k] == v for k, v in TUNE_ENVIRONMENT.items())
        # read in the trial actors (how long a reused one waits for the last trial's thread): Tune hands them the value
        actor_class = class_cache._ActorClassCache().get(type("Trainable", (), {}))
        assert actor_class._default_options["runtime_env"]["env_vars"][THREAD_TIMEOUT_ENV] == TUNE_ENVIRONMENT[THREAD_TIMEOUT_ENV]
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1" and "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ


def test_trials_wait_passively_unless_the_user_chose_a_policy(monkeypatch, capsys):
    """OMP_WAIT_POLICY: the command sets PASSIVE before it imports torch, Tune hands the driver's
    value to the trial actors; a policy the user set is kept."""
    import os

    from ray.tune.execution import class_cache

    from tltune.cli import main
    from tltune.raytune.sweep import tune_environment

    for users, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        if users is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", users)
        with tune_environment():
            actor_class = class_cache._ActorClassCache().get(type("Trainable", (), {}))
            assert actor_class._default_options["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == expected
        assert os.environ.get("OMP_WAIT_POLICY") == users, "the driver's own environment as it was"
        assert main(["mnist-cnn"], "d", ["--cpus-per-trial", "0"]) == 2 and "--cpus-per-trial must be > 0" in capsys.readouterr().err
        assert os.environ["OMP_WAIT_POLICY"] == expected, "the command's"
