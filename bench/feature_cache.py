"""Feature extraction, naive (frozen backbone run every epoch) vs cached (run once), one process.

    python bench/feature_cache.py --data-root DIR [--train-subset 500 --epochs 10 --image-size 224]

Same model, same optimizer, same batches; prints both wall times, their ratio and the test
accuracies. Cold = cache built in the timed run; warm = a later trial of the same sweep.
"""

import tempfile
import time
from dataclasses import replace

from common import parser, verdict

import torch
import torchvision

from tltune.config import TrialConfig
from tltune.data import as_tensors, load_dataset, make_splits
from tltune.features import feature_splits
from tltune.train import build_optimizer, evaluate, seed_everything, setup_model, train_one_epoch


def run_trial(config: TrialConfig, splits, state, cached):
    started = time.perf_counter()
    if cached:
        splits = feature_splits(splits, config.model_spec, state)
        config = replace(config, cached_features=True)
    seed_everything(config.seed)
    model, transform = setup_model(config, splits, state)
    optimizer = build_optimizer(config.optimizer, model, config.lr)
    (x, y), (vx, vy), (tx, ty) = (as_tensors(s) for s in (splits.train, splits.val, splits.test))
    for epoch in range(config.epochs):
        train_one_epoch(model, optimizer, x, y, transform, config.batch_size, seed_everything(epoch))
        evaluate(model, vx, vy, transform)
    test = evaluate(model, tx, ty, transform)
    return time.perf_counter() - started, test.accuracy


def main():
    p = parser(__doc__)
    p.add_argument("--train-subset", type=int, default=500)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--optimizer", default="sgd", help="default: the seed's SGD")
    p.add_argument("--lr", type=float, default=0.001, help="default: the seed's 0.001")
    p.add_argument("--weights", help="AlexNet state-dict file (default: random init; timing does not depend on it)")
    args = p.parse_args()
    torch.manual_seed(0)
    state = torch.load(args.weights, weights_only=True) if args.weights else torchvision.models.alexnet().state_dict()
    splits = make_splits(load_dataset("cifar10", args.data_root), train_subset=args.train_subset, test_subset=args.train_subset // 2)
    config = TrialConfig(dataset="cifar10", model="alexnet", mode="feature_extract", optimizer=args.optimizer, lr=args.lr,
                         epochs=args.epochs, batch_size=64, seed=0, image_size=args.image_size)  # fmt: skip
    print(f"CIFAR-10 {len(splits.train)}/{len(splits.val)}/{len(splits.test)} images at {args.image_size}px, "
          f"{args.epochs} epochs, {torch.get_num_threads()} threads")  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        import os

        os.environ["TLTUNE_CACHE_DIR"] = cache
        naive_s, naive_acc = run_trial(config, splits, state, cached=False)
        cold_s, cold_acc = run_trial(config, splits, state, cached=True)
        warm_s, warm_acc = run_trial(config, splits, state, cached=True)
    print(f"naive {naive_s:.1f}s (test {100 * naive_acc:.2f}%), cached cold {cold_s:.1f}s (test {100 * cold_acc:.2f}%), "
          f"cached warm {warm_s:.2f}s (test {100 * warm_acc:.2f}%)")  # fmt: skip
    bound = args.epochs * (len(splits.train) + len(splits.val)) / (len(splits.train) + len(splits.val) + len(splits.test))
    print(f"(one cold trial can gain at most ~{bound:.1f}x: it still runs the backbone once over every image)")
    verdict("one trial, naive / cached, cache build included", naive_s / cold_s, 20, unit="x")
    verdict("a later trial of the sweep, naive / cached (warm)", naive_s / warm_s, 20, unit="x")
    for trials in (3, 10):
        verdict(f"a {trials}-trial sweep, naive / cached", trials * naive_s / (cold_s + (trials - 1) * warm_s), 20, unit="x")
    verdict("test accuracy, |naive - cached| in points", abs(100 * (naive_acc - cold_acc)), 0.5, higher_is_better=False)


if __name__ == "__main__":
    main()
