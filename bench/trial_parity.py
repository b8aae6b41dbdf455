"""A tltune trial against a bare PyTorch loop: training throughput, and how soon the data is
ready in a trial (from Ray's object store) against loading it from the disk cache.

    python bench/trial_parity.py --data-root DIR [--train-subset 10000 --trials 4]

Both train the same CNN with the same batch size on one thread; trials run one at a time.
"""

import tempfile
import time

from common import parser, verdict

import numpy as np
import torch
import torch.nn.functional as F

from tltune.config import TrialConfig
from tltune.data import load_dataset, make_splits
from tltune.models import build_model


def bare_pytorch(splits, batch_size: int) -> float:
    """The plain loop a PyTorch user writes: normalised float tensors, random batches."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    x = (torch.from_numpy(splits.train.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    y = torch.from_numpy(splits.train.labels)
    model = build_model("cnn", "scratch", 10, 3, 32, "relu")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for idx in torch.randperm(len(y)).split(batch_size):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return len(y) / (time.perf_counter() - started)


def tltune_trials(splits, trials: int, batch_size: int, storage: str) -> list[dict]:
    import ray
    from ray import tune

    from tltune.raytune.trainable import train_trial

    inputs = {"splits": ray.put(splits), "pretrained": {}}
    config = TrialConfig(dataset="cifar10", model="cnn", mode="scratch", optimizer="adam", lr=1e-3, epochs=1,
                         batch_size=batch_size, seed=0)  # fmt: skip
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_trial, inputs=inputs), {"cpu": 1}),
        param_space={**config.to_dict(), "seed": tune.randint(0, 1000)},
        tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=storage, verbose=0),
    )
    return [r.metrics for r in tuner.fit()]


def main():
    p = parser(__doc__)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    import ray

    started = time.perf_counter()
    dataset = load_dataset("cifar10", args.data_root)  # from tltune's disk cache after the first run
    disk_s = time.perf_counter() - started
    splits = make_splits(dataset, train_subset=args.train_subset)
    bare = bare_pytorch(splits, args.batch_size)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        results = tltune_trials(splits, args.trials, args.batch_size, storage)
    speeds = [r["train_images_per_s"] for r in results]
    ready = sorted(r["data_ready_s"] for r in results)
    print(f"{len(splits.train)} CIFAR-10 images, batch {args.batch_size}, 1 thread: bare PyTorch {bare:.0f} img/s, "
          f"tltune trials {', '.join(f'{s:.0f}' for s in speeds)} img/s")  # fmt: skip
    print(f"data ready in a trial: {', '.join(f'{s * 1000:.0f} ms' for s in ready)}; loading the dataset "
          f"from tltune's disk cache in this process took {disk_s:.2f}s")  # fmt: skip
    verdict("trial training throughput / bare PyTorch loop", float(np.median(speeds)) / bare, 0.95, unit="x")
    verdict("dataset ready after a trial starts (slowest trial)", ready[-1], 0.5, higher_is_better=False, unit="s")


if __name__ == "__main__":
    main()
