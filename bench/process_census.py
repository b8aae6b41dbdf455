"""Where a command's CPU goes, by kind of process: trial workers, sweep drivers, Ray's daemons,
pytest, Slurm. It reads every process of the machine from /proc every fifth of a second while
the command runs (Ray's daemons and Slurm's jobs are not the command's children), so run it
on an otherwise idle machine. Linux only.

    python bench/process_census.py python -m pytest -m slow -n 3 --dist loadscope

bench/pytest_cpu.py says which tests cost most; this says what in them does: a suite whose CPU
goes to processes starting (imports, Ray's start) gains nothing from faster training code.
"""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

INTERVAL_S = 0.2
TOP = 12
TICKS = os.sysconf("SC_CLK_TCK")
KINDS = (  # the first that matches a process's command line names its kind
    ("trial worker (Ray actor or task)", r"^ray::(?!DashboardAgent|RuntimeEnvAgent)|^\S+ \S*workers/default_worker\.py"),  # the script run, not the raylet's argument naming it
    ("Ray daemon", r"gcs_server|/raylet|ray/dashboard|log_monitor|autoscaler|monitor\.py|ray::DashboardAgent|ray::RuntimeEnvAgent|ray/scripts|\bray start\b"),
    ("sweep driver", r"-m tltune\b|/bin/tltune\b|sweeps/\w+\.py"),  # not a path that holds a checkout named tltune
    ("pytest", r"pytest|xdist|exec\(eval\(sys\.stdin\.readline"),  # the last: pytest-xdist's workers (execnet)
    ("Slurm", r"slurm|srun|sbatch|scontrol"),
    ("S3 server (moto)", r"moto"),
)


def kind_of(cmdline: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, cmdline)), "other")


def snapshot() -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, start time) -> (command line, CPU seconds so far) of every process readable now
    (with its start time, a pid the kernel hands out again is another process)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended meanwhile
            continue
        found[int(entry.name), int(fields[19])] = (cmdline, (int(fields[11]) + int(fields[12])) / TICKS)
    return found


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    before = snapshot()  # processes already running count only what they spend from now on
    seen: dict[tuple[int, int], list] = {}  # process -> [command line, CPU seconds at its first and last look]
    done = threading.Event()

    def watch():
        while not done.is_set():
            for process, (cmdline, cpu) in snapshot().items():
                if process[0] == os.getpid():
                    continue
                record = seen.setdefault(process, [cmdline, before.get(process, ("", 0.0))[1], cpu])
                record[2] = cpu
                if cmdline and not record[0]:
                    record[0] = cmdline
                elif cmdline.startswith("ray::") and record[0] != cmdline:  # a Ray worker's title says what it became
                    record[0] = cmdline
            time.sleep(INTERVAL_S)

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.monotonic()
    watcher.start()
    code = subprocess.call(sys.argv[1:])
    done.set()
    watcher.join()
    wall = time.monotonic() - started

    totals: dict[str, list] = {}
    for cmdline, first, last in seen.values():
        spent = last - first
        if spent <= 0:
            continue
        row = totals.setdefault(kind_of(cmdline), [0.0, 0])
        row[0] += spent
        row[1] += 1
    all_cpu = sum(cpu for cpu, _ in totals.values())
    print(f"\n{'CPU s':>8} {'share':>6} {'processes':>9} {'CPU s each':>10}  kind   (over {wall:.0f} s of wall time, exit code {code})")
    for kind, (cpu, count) in sorted(totals.items(), key=lambda item: -item[1][0]):
        print(f"{cpu:8.1f} {cpu / max(all_cpu, 1e-9):6.0%} {count:9d} {cpu / count:10.1f}  {kind}")
    print(f"{all_cpu:8.1f}   100% {sum(n for _, n in totals.values()):9d}             all (processes under {INTERVAL_S} s may be missed)")
    print("\nthe costliest processes:")
    for cmdline, first, last in sorted((r for r in seen.values() if r[2] > r[1]), key=lambda r: r[2] - r[1], reverse=True)[:TOP]:
        print(f"{last - first:8.1f}  {kind_of(cmdline)}: {cmdline[:150]}")
    return code


if __name__ == "__main__":
    sys.exit(main())
