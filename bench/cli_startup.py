"""How fast the light faces answer: `tltune --help`, `tltune sweep cifar10 --help`, a flag
error and `tltune list`, each as a fresh process, against a bare `python -c pass` and
`python -c "import torch"` measured in the same run (medians of --repeats runs).

    python bench/cli_startup.py [--repeats 5]

Target: `tltune --help` within 1 s on the 2-core development machine.
"""

import statistics
import subprocess
import sys
import time

from common import parser, verdict

CASES = {
    "python -c pass (baseline)": ["-c", "pass"],
    "tltune --help": ["-m", "tltune", "--help"],
    "tltune sweep cifar10 --help": ["-m", "tltune", "sweep", "cifar10", "--help"],
    "tltune sweep cifar10 --lr -1 (flag error)": ["-m", "tltune", "sweep", "cifar10", "--lr", "-1"],
    "tltune list": ["-m", "tltune", "list"],
    "python -c 'import torch' (for scale)": ["-c", "import torch"],
}


def seconds(args: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    measured = {name: seconds(argv, args.repeats) for name, argv in CASES.items()}
    base = measured["python -c pass (baseline)"]
    for name, value in measured.items():
        print(f"{name:45} {value:6.3f} s  {value / base:5.1f}x bare python")
    verdict("tltune --help", measured["tltune --help"], 1.0, higher_is_better=False, unit=" s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
