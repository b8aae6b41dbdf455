"""What ASHA + Optuna buys on the CIFAR-10 small CNN: epochs spent to come within 1 point of
the best validation accuracy of a full grid run without early stopping.

    python bench/asha_efficiency.py --data-root DIR [--train-subset 5000 --epochs 6]

Both sweeps run the same tltune trainable over the same 12 configurations (optimizer x
activation x lr), one trial at a time so that "epochs spent so far" is well defined.
"""

import tempfile

from common import parser, verdict

from tltune.config import TrialConfig
from tltune.data import load_dataset, make_splits

GRID = {"optimizer": ["adam", "sgd"], "activation": ["relu", "tanh"], "lr": [3e-4, 1e-3, 3e-3]}


def sweep(splits, epochs: int, asha: bool, storage: str, seed: int) -> list[list[float]]:
    """val_acc per epoch of every trial, in the order the trials ran."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tltune.raytune.trainable import train_trial

    inputs = {"splits": ray.put(splits), "pretrained": {}}
    # GRID's keys are searched: their values here are replaced by Tune's domains
    fixed = TrialConfig(dataset="cifar10", model="cnn", mode="scratch", optimizer="adam", lr=1e-3, epochs=epochs, batch_size=64, seed=0).to_dict()
    if asha:
        space = {**fixed, **{k: tune.choice(v) for k, v in GRID.items()}}
        config = dict(search_alg=OptunaSearch(seed=seed), num_samples=12,
                      scheduler=ASHAScheduler(max_t=epochs, grace_period=1, reduction_factor=3))  # fmt: skip
    else:
        space = {**fixed, **{k: tune.grid_search(v) for k, v in GRID.items()}}
        config = {}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_trial, inputs=inputs), {"cpu": 2}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", max_concurrent_trials=1, reuse_actors=True, **config),
        run_config=tune.RunConfig(storage_path=storage, verbose=0),
    )
    results = tuner.fit()
    ordered = sorted(results, key=lambda r: r.metrics_dataframe["timestamp"].min())
    return [list(r.metrics_dataframe.sort_values("training_iteration")["val_acc"]) for r in ordered]


def main():
    p = parser(__doc__)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import ray

    splits = make_splits(load_dataset("cifar10", args.data_root), train_subset=args.train_subset)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        grid = sweep(splits, args.epochs, asha=False, storage=storage, seed=args.seed)
        asha = sweep(splits, args.epochs, asha=True, storage=storage, seed=args.seed)
    grid_epochs = sum(len(t) for t in grid)
    grid_best = max(t[-1] for t in grid)
    spent, reached = 0, None
    for trial in asha:
        for acc in trial:
            spent += 1
            if reached is None and acc >= grid_best - 0.01:
                reached = spent
    asha_epochs = sum(len(t) for t in asha)
    asha_best = max(t[-1] for t in asha)
    print(f"grid: {len(grid)} trials x {args.epochs} epochs = {grid_epochs} epochs, best val {100 * grid_best:.2f}%")
    print(f"ASHA + Optuna: {len(asha)} trials, {asha_epochs} epochs in all, best val {100 * asha_best:.2f}%, "
          f"within 1 point of the grid's best after {reached if reached else 'never'} epochs")  # fmt: skip
    verdict("epochs to reach grid-best - 1 point / grid epochs", (reached or grid_epochs * 10) / grid_epochs, 0.35, higher_is_better=False)
    verdict("all of ASHA's epochs / grid epochs", asha_epochs / grid_epochs, 1.0, higher_is_better=False)


if __name__ == "__main__":
    main()
