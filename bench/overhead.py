"""Ray Tune's cost per trial for a trivial trainable, against Optuna alone, one process.

    python bench/overhead.py [--trials 40]

Trials run one at a time, so the wall time per trial is the framework's latency. Ray's start
is paid once per sweep and left out of both.
"""

import time

from common import parser, verdict


def trivial(config):
    from ray import tune

    tune.report({"score": config["x"]})


def optuna_alone(trials: int) -> float:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    started = time.perf_counter()
    for _ in range(trials):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1))
    return (time.perf_counter() - started) / trials


def tune_sweep(trials: int, reuse_actors: bool, storage: str) -> float:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    tuner = tune.Tuner(
        tune.with_resources(trivial, {"cpu": 1}),
        param_space={"x": tune.uniform(0, 1)},
        tune_config=tune.TuneConfig(
            metric="score", mode="max", search_alg=OptunaSearch(seed=0), num_samples=trials,
            max_concurrent_trials=1, reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(storage_path=storage, verbose=0),
    )  # fmt: skip
    started = time.perf_counter()
    tuner.fit()
    return (time.perf_counter() - started) / trials


def main():
    args = parser(__doc__)
    args.add_argument("--trials", type=int, default=40)
    args = args.parse_args()
    import tempfile

    import ray

    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        optuna_s = optuna_alone(args.trials)
        reused = tune_sweep(args.trials, True, storage)
        fresh = tune_sweep(max(5, args.trials // 4), False, storage)
    print(f"per trial: Optuna alone {optuna_s * 1000:.1f} ms, Ray Tune + Optuna with actor reuse {reused:.3f}s, "
          f"without {fresh:.3f}s; reuse is {fresh / reused:.1f}x faster")  # fmt: skip
    verdict("per-trial overhead of Ray Tune (actor reuse), minus Optuna's", reused - optuna_s, 0.5, higher_is_better=False, unit="s")


if __name__ == "__main__":
    main()
