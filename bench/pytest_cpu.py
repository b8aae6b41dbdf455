"""A pytest plugin that says where a suite's time goes: for each test, its wall time and the CPU
time the whole machine spent meanwhile (from /proc/stat, so Ray's daemons, trial workers and
Slurm jobs count too, which a test's own rusage misses). Linux only.

    PYTHONPATH=bench python -m pytest -m slow -p pytest_cpu

prints the tests by machine CPU seconds at the end, with the suite's totals: a suite whose CPU
seconds over cores come near its wall time gains nothing from running tests side by side; one
far below it waits (on sleeps, Slurm, Ray's start) and does. Run it without -n: side by side,
each test's figure would hold its neighbours' work too.
"""

import os
import time

import pytest

_rows: list[tuple[str, float, float]] = []
_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the machine has spent busy since boot (all cores: user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / _TICKS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    wall, busy = time.monotonic(), machine_busy_seconds()
    yield
    _rows.append((item.nodeid, time.monotonic() - wall, machine_busy_seconds() - busy))


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    cores = os.cpu_count() or 1
    write = terminalreporter.write_line
    terminalreporter.section(f"machine CPU seconds per test ({cores} cores)")
    write(f"{'wall s':>8} {'cpu s':>8} {'busy':>5}  test")
    for nodeid, wall, cpu in sorted(_rows, key=lambda r: -r[2]):
        write(f"{wall:8.1f} {cpu:8.1f} {cpu / max(wall, 1e-9) / cores:5.0%}  {nodeid}")
    wall, cpu = sum(r[1] for r in _rows), sum(r[2] for r in _rows)
    write(f"{wall:8.1f} {cpu:8.1f} {cpu / max(wall, 1e-9) / cores:5.0%}  all {len(_rows)} tests (fixtures count in their first test)")
