"""A class-folder dataset's first load (before its disk cache exists): every file opened by
Pillow's Image.open (the former way) against the loader's (tltune.data.load_class_folders:
plain JPEG files decoded by Pillow's JPEG decoder straight from their bytes), in one process,
alternating, on CIFAR-10's 60,000 JPEG files.

    python bench/decode.py [--data-root DIR] [--rounds 2]

Prints the CPU time of each way per round, the ratio of the totals, and whether the pixels agree.
"""

import time
from pathlib import Path

import numpy as np
from common import parser, verdict

from tltune import data


def load(folder: Path, plain_jpeg: bool):
    real = data._decode_plain_jpeg
    if not plain_jpeg:
        data._decode_plain_jpeg = lambda path, size: None
    try:
        started = time.process_time()
        dataset = data.load_class_folders("cifar10", folder)
        return time.process_time() - started, dataset
    finally:
        data._decode_plain_jpeg = real


def main():
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    folder = Path(args.data_root or "") / "cifar10"
    if not (folder / "train").is_dir():
        raise SystemExit(f"error: no CIFAR-10 class folders in {folder}: pass --data-root (see ../shared/data/README)")
    load(folder, True)  # the files into the page cache, so that neither way pays the disk first
    totals = {False: 0.0, True: 0.0}
    same, by_image_open = True, None
    for round_ in range(args.rounds):
        seconds = {}
        for plain_jpeg in (False, True):
            seconds[plain_jpeg], dataset = load(folder, plain_jpeg)
            totals[plain_jpeg] += seconds[plain_jpeg]
            if plain_jpeg:
                same &= all(np.array_equal(getattr(dataset, s).images, getattr(by_image_open, s).images) for s in ("train", "test"))
            else:
                by_image_open = dataset
        print(f"round {round_ + 1}: Image.open {seconds[False]:.2f} CPU-s, the loader {seconds[True]:.2f} CPU-s ({len(dataset.train) + len(dataset.test)} images)")
    print(f"{'PASS' if same else 'FAIL'}  the same pixels both ways")
    verdict("speed-up", totals[False] / totals[True], 1.3, unit="x")


if __name__ == "__main__":
    main()
