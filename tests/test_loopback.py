"""A local sweep's Ray (GCS, raylet, object manager, agents, workers, driver) listens on
127.0.0.1 only: read from the kernel's socket tables while the sweep runs (conftest.py's
watched sweep, through the readers below)."""

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LISTEN = "0A"


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo.extend(children.get(p, []))
    return found


def socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    return inodes


def listening(inodes: set[str]) -> list[str]:
    """Local addresses (hex, as the kernel writes them) of the listening TCP sockets among ``inodes``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                found.append(fields[1])
    return found


def openmp_wait_policies(pids: set[int]) -> dict[str, str | None]:
    """``process name (pid)`` -> its OMP_WAIT_POLICY (None: unset), read from /proc."""
    found = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            environ = dict(entry.split(b"=", 1) for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in entry)
        except OSError:
            continue
        policy = environ.get(b"OMP_WAIT_POLICY")
        found[f"{name} ({pid})"] = policy.decode() if policy is not None else None
    return found


def is_loopback(hex_address: str) -> bool:
    host = hex_address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian: 127.x.x.x ends in 7F
        return host.endswith("7F")
    # IPv6: four little-endian words; ::1, or ::ffff:127.x.x.x
    return host == "00000000000000000000000001000000" or (host.startswith("0000000000000000FFFF0000") and host.endswith("7F"))


def test_a_local_sweep_listens_on_loopback_only(watched_sweep):
    """Read up to five times, a second apart, while the session's watched sweep (conftest.py: a
    ``tltune`` process, its local Ray, trials, MLflow and W&B) ran its trials."""
    assert watched_sweep.listening, "looked at while the trials ran"
    seen = [address for look in watched_sweep.listening for address in look]
    assert len(set(seen)) >= 3, f"the sweep's Ray processes listen on some ports: {seen}"
    assert all(is_loopback(a) for a in seen), f"listening beyond 127.0.0.1: {sorted(set(a for a in seen if not is_loopback(a)))}"


def test_the_command_and_its_trials_wait_passively(watched_sweep):
    """The sweep ran without OMP_WAIT_POLICY: the command sets it (tltune.openmp) before its local
    Ray starts, so every trial actor's torch threads sleep when out of work instead of spinning.
    (Tune's handing of the driver's value to actors on any Ray: tests/test_api.py.)"""
    trials = {name: policy for name, policy in watched_sweep.wait_policies.items() if name.startswith("ray::ImplicitFunc")}
    assert trials, f"trial actors were looked at: {sorted(watched_sweep.wait_policies)}"
    assert set(trials.values()) == {"PASSIVE"}, trials
