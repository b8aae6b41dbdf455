"""What a checkpoint costs against a training epoch, one process, on this machine's CPU.

    python bench/checkpoint_cost.py [--steps 3] [--dir DIR]

For AlexNet fine-tuned with Adam at 224 px (the largest built-in checkpoint: weights and two
Adam states), AlexNet feature extraction (the head only) and the small CNN: the checkpoint's
size, the time ``save_checkpoint`` takes into DIR (default: a temporary folder; pass the run
storage's disk to measure that one), and a CIFAR-10 training epoch's time extrapolated from a
few timed steps. Prints the save as a share of an epoch here, and what tltune's default
checkpoint policy (a save while it costs at most a tenth of the training since the last)
does with it here and on a GPU whose epoch is N times faster.
"""

import math
import statistics
import tempfile
import time
from pathlib import Path

from common import parser

import torch

from tltune.config import TrialConfig
from tltune.data import ImageArrays, Splits, as_tensors
from tltune.train import CHECKPOINT_FILE, CheckpointPolicy, build_optimizer, save_checkpoint, setup_model, train_one_epoch

CIFAR_TRAIN_IMAGES = 45000  # CIFAR-10's training split less the validation tenth
ROWS = {  # label -> (model, mode, image size, optimizer, batch)
    "AlexNet fine-tuning, Adam, 224 px": ("alexnet", "finetune", 224, "adam", 64),
    "AlexNet feature extraction (naive path), SGD, 224 px": ("alexnet", "feature_extract", 224, "sgd", 64),
    "small CNN, Adam, 32 px": ("cnn", "scratch", 32, "adam", 64),
}


def synthetic_splits(n: int) -> Splits:
    generator = torch.Generator().manual_seed(0)
    arrays = ImageArrays(torch.randint(0, 256, (n, 32, 32, 3), generator=generator, dtype=torch.uint8).numpy(), (torch.arange(n) % 10).numpy())
    return Splits("cifar10-synthetic", [str(c) for c in range(10)], arrays, arrays, arrays, (0.5,) * 3, (0.25,) * 3)


def measure(model_name: str, mode: str, size: int, optimizer_name: str, batch: int, steps: int, directory: Path) -> dict:
    config = TrialConfig(dataset="cifar10", model=model_name, mode=mode, optimizer=optimizer_name, lr=1e-3, epochs=1,
                         batch_size=batch, seed=0, image_size=size)  # fmt: skip
    splits = synthetic_splits(batch * (steps + 1))
    torch.manual_seed(0)
    model, transform = setup_model(config, splits, None)
    optimizer = build_optimizer(optimizer_name, model, 1e-3)
    x, y = as_tensors(splits.train)
    train_one_epoch(model, optimizer, x[:batch], y[:batch], transform, batch)  # warm-up; creates the optimizer's state
    started = time.perf_counter()
    train_one_epoch(model, optimizer, x[batch:], y[batch:], transform, batch)
    step_s = (time.perf_counter() - started) / steps
    saves = []
    for _ in range(3):
        started = time.perf_counter()
        save_checkpoint(directory, model, optimizer, 1, config)
        saves.append(time.perf_counter() - started)
    size_mb = (directory / CHECKPOINT_FILE).stat().st_size / 1e6
    return {"save_s": statistics.median(saves), "size_mb": size_mb, "epoch_s": step_s * math.ceil(CIFAR_TRAIN_IMAGES / batch)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=3, help="training steps timed per model (default 3)")
    p.add_argument("--dir", help="where to save the checkpoints (default: a temporary folder)")
    args = p.parse_args()
    print(f"{torch.get_num_threads()} CPU threads; an epoch = {CIFAR_TRAIN_IMAGES} CIFAR-10 training images, from {args.steps} timed steps")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        for label, row in ROWS.items():
            m = measure(*row, args.steps, Path(directory))
            share = m["save_s"] / m["epoch_s"]
            print(f"{label}: checkpoint {m['size_mb']:.0f} MB saved in {m['save_s']:.2f}s; epoch here {m['epoch_s']:.0f}s; "
                  f"save / epoch = {share:.2%}; saved at epochs {CheckpointPolicy().epochs_saved(10, m['epoch_s'], m['save_s'])} of 10", flush=True)  # fmt: skip
            for speedup in (100, 1000):
                epoch_s = m["epoch_s"] / speedup
                print(f"    with an epoch {speedup}x faster ({epoch_s:.2g}s, a GPU's): save / epoch = {m['save_s'] / epoch_s:.0%}; "
                      f"saved at epochs {CheckpointPolicy().epochs_saved(10, epoch_s, m['save_s'])} of 10")  # fmt: skip


if __name__ == "__main__":
    main()
