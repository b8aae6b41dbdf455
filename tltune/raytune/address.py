"""Which Ray cluster a sweep joins, and whether anything answers there: checked before Ray
is imported (this module does not import it), so a wrong address is one line at once."""

from __future__ import annotations

import os
import socket

from tltune.errors import UserError


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: ``--address``, else ``$RAY_ADDRESS``, else None (start a local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast: ray.init waits minutes on an address where nothing answers."""
    if address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (e.g. 127.0.0.1:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(
            f"no Ray cluster answers at {address} ({exc}): check the address and that the cluster is up "
            "(`ray status`), or leave --address out to start a local Ray"
        ) from None
