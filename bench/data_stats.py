"""The training split's per-channel mean and std, as make_splits computes them on every sweep
start: the pixels summed as float64 (the former way) against each channel's histogram of the
256 uint8 values (tltune.data.channel_stats), in one process, on CIFAR-10's size.

    python bench/data_stats.py [--images 45000]

Prints both CPU times, their ratio, and whether the two agree.
"""

import time

import numpy as np
from common import parser, verdict

from tltune.data import channel_stats


def float_sums(images: np.ndarray, chunk: int = 8192):
    total, squares = np.zeros(images.shape[-1]), np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].reshape(-1, images.shape[-1]).astype(np.float64)
        total += block.sum(0)
        squares += np.square(block).sum(0)
    count = images.size / images.shape[-1]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in std)


def cpu_seconds(fn, images):
    started = time.process_time()
    result = fn(images)
    return time.process_time() - started, result


def main():
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=45000, help="training images of 32x32x3 (CIFAR-10's train split less validation)")
    args = p.parse_args()
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    baseline_s, expected = cpu_seconds(float_sums, images)
    histogram_s, got = cpu_seconds(channel_stats, images)
    print(f"float64 sums {baseline_s:.2f} s, histograms {histogram_s:.2f} s")
    same = np.allclose(expected, got, rtol=0, atol=1e-12)
    print(f"{'PASS' if same else 'FAIL'}  the same mean and std: {got}")
    verdict("speed-up", baseline_s / histogram_s, 5, unit="x")


if __name__ == "__main__":
    main()
