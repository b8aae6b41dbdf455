"""fp32 against bf16 autocast, NCHW against channels_last: training on this CPU, through
tltune's loop. The measurement behind ``--precision auto`` on a CPU (docs/PERFORMANCE.md).

    python bench/precision_cpu.py [--threads 1 --repeats 3]

Small CNN at 32 px (batch 64, Adam) and AlexNet at 64 px (batch 64, SGD), uint8 CIFAR-shaped
batches; the variants alternate within each repeat, so a busy machine slows them alike.
"""

import statistics

from common import parser
from gpu import train_images_per_s

import torch

from tltune.train import cpu_has_bf16, resolve_precision

CASES = (("cnn", 32, 2048), ("alexnet", 64, 256))  # model, input size, images timed
VARIANTS = [(precision, cl) for precision in ("fp32", "bf16") for cl in (False, True)]


def main():
    p = parser(__doc__)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a trial gets its CPU share)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {args.threads} thread(s), native bf16 (AVX512-BF16/AMX): {cpu_has_bf16()}, "
          f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    for model, size, images in CASES:
        speeds = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeats):
            for precision, cl in VARIANTS:
                speeds[precision, cl].append(train_images_per_s(cpu, model, size, 64, images, precision, cl)[0])
        median = {variant: statistics.median(values) for variant, values in speeds.items()}
        cells = ", ".join(f"{precision}{'+channels_last' if cl else ''} {median[precision, cl]:.0f}" for precision, cl in VARIANTS)
        print(f"{model}-{size} img/s (median of {args.repeats}): {cells}")
        print(f"  bf16 / fp32: {median['bf16', True] / median['fp32', True]:.2f}x (channels_last), "
              f"{median['bf16', False] / median['fp32', False]:.2f}x (NCHW); channels_last / NCHW: "
              f"{median['fp32', True] / median['fp32', False]:.2f}x (fp32), {median['bf16', True] / median['bf16', False]:.2f}x (bf16)")  # fmt: skip
    print(f"--precision auto picks {resolve_precision('auto', cpu)} on this CPU")


if __name__ == "__main__":
    main()
