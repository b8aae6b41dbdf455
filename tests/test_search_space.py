import dataclasses

import pytest
from ray import tune

from tltune.options import parse
from tltune.plan import experiment_settings
from tltune.config import ModelSpec, TrialConfig
from tltune.experiments import EXPERIMENTS, IntRange, LogUniform
from tltune.raytune.sweep import to_tune_domain, trial_config


def settings(name="cifar10-cnn-search", **changes):
    experiment = EXPERIMENTS[name]
    return experiment, dataclasses.replace(experiment_settings(experiment, parse([])), **changes)


def sampled(param_space: dict) -> dict:
    """A trial's config as Tune gives it: every search domain sampled."""
    return {k: v.sample() if isinstance(v, tune.search.sample.Domain) else v for k, v in param_space.items()}


def test_reference_is_the_first_point_and_space_becomes_tune_domains():
    param_space, points = trial_config(*settings())
    assert points == [{"optimizer": "adam", "activation": "tanh", "lr": 1e-4, "epochs": 3}]
    assert isinstance(param_space["lr"], tune.search.sample.Float)
    assert param_space["model"] == "cnn" and param_space["batch_size"] == 64
    epochs = to_tune_domain(IntRange(1, 10))
    assert {epochs.sample() for _ in range(300)} == set(range(1, 11)), "both ends of an IntRange are included"


def test_warm_start_points_follow_the_reference_and_respect_the_space():
    experiment, s = settings(
        warm_start=[
            {"optimizer": "sgd", "activation": "relu", "lr": 0.01, "epochs": 4, "seed": 3},
            {"optimizer": "adam", "activation": "tanh", "lr": 1e-4, "epochs": 3},  # the reference again
            {"optimizer": "sgd", "activation": "relu", "lr": 5.0, "epochs": 4},  # outside the lr range
        ]
    )
    _, points = trial_config(experiment, s)
    assert points == [
        {"optimizer": "adam", "activation": "tanh", "lr": 1e-4, "epochs": 3},
        {"optimizer": "sgd", "activation": "relu", "lr": 0.01, "epochs": 4},
    ]


def test_reference_outside_a_narrowed_space_is_not_evaluated():
    experiment, s = settings()
    s = dataclasses.replace(s, space={**s.space, "lr": LogUniform(1e-3, 1e-2)})
    assert trial_config(experiment, s)[1] == []


def test_searcher_tolerates_a_trial_it_lost_in_a_crash():
    from tltune.raytune.sweep import ResumableOptunaSearch

    space = {"lr": tune.loguniform(1e-5, 1e-1), "optimizer": tune.choice(["adam", "sgd"])}
    searcher = ResumableOptunaSearch(space=space, metric="val_acc", mode="max", seed=0)
    known = searcher.suggest("known")
    searcher.on_trial_result("known", {"val_acc": 0.4, "training_iteration": 1})
    # "lost" ran before the crash but the searcher's saved state never suggested it
    searcher.on_trial_result("lost", {"val_acc": 0.5, "training_iteration": 1})
    searcher.on_trial_complete("lost", {"val_acc": 0.6, "config": {"lr": 1e-3, "optimizer": "sgd", "seed": 0}})
    searcher.on_trial_complete("known", {"val_acc": 0.45, **known})
    values = sorted(t.value for t in searcher._ot_study.trials if t.value is not None)
    assert values == [0.45, 0.6], "the lost trial's score still reaches Optuna"


def test_a_resumed_trial_repeating_an_epoch_warns_nothing():
    """After a stop, a trial goes on from its last checkpoint and reports again the epochs after
    it: Optuna keeps the first value of a step, and its warning is no news to the user."""
    import warnings

    from tltune.raytune.sweep import ResumableOptunaSearch

    searcher = ResumableOptunaSearch(space={"lr": tune.loguniform(1e-5, 1e-1)}, metric="val_acc", mode="max", seed=0)
    searcher.suggest("t")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        searcher.on_trial_result("t", {"val_acc": 0.4, "training_iteration": 1})
        searcher.on_trial_result("t", {"val_acc": 0.5, "training_iteration": 1})
    assert not [w for w in caught if "already reported" in str(w.message)], [str(w.message) for w in caught]
    assert searcher._ot_trials["t"].study.trials[0].intermediate_values == {1: 0.4}


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_experiments_trial_configs_become_a_trial_config(name):
    experiment, s = settings(name)
    param_space, _ = trial_config(experiment, s)
    config = sampled(param_space)
    trial = TrialConfig.from_dict(config)
    assert {k: trial.to_dict()[k] for k in config} == config, "every key kept as it was"
    assert (trial.model, trial.mode, trial.precision) == (experiment.model, experiment.mode, "auto")
    if experiment.model == "alexnet":
        assert "activation" not in config and trial.model_spec == ModelSpec("alexnet", "relu", s.image_size, None)


def test_configs_of_older_runs_and_wrong_keys():
    config = sampled(trial_config(*settings())[0])
    old = {k: v for k, v in config.items() if k not in ("precision", "compile")}  # runs from before the flags
    trial = TrialConfig.from_dict(old)
    assert (trial.precision, trial.compile) == ("fp32", False)
    with pytest.raises(ValueError, match=r"unknown keys \['momentum'\]"):
        TrialConfig.from_dict({**config, "momentum": 0.5})
    with pytest.raises(ValueError, match=r"missing keys \['lr'\]"):
        TrialConfig.from_dict({k: v for k, v in config.items() if k != "lr"})
