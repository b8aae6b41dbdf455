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
        with socket.create_connection((host, int(port)), timeout=timeout) as connection:
            speaks_grpc = answers_http2(connection, timeout)
    except OSError as exc:
        raise UserError(
            f"no Ray cluster answers at {address} ({exc}): check the address and that the cluster is up "
            "(`ray status`), or leave --address out to start a local Ray"
        ) from None
    if not speaks_grpc:  # ray.init would wait for ever on, e.g., a web server
        raise UserError(
            f"something answers at {address}, but not a Ray cluster (Ray's GCS and client servers speak gRPC): "
            "check the port (`ray status` on the head prints the address), or leave --address out to start a local Ray"
        )


# HTTP/2's connection preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray
# Client server) answers with a SETTINGS frame of its own, anything else does not.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HTTP2_SETTINGS = 4


def answers_http2(connection: socket.socket, timeout: float) -> bool:
    """Whether the server on ``connection`` answers HTTP/2's preface with a SETTINGS frame."""
    connection.settimeout(timeout)
    try:
        connection.sendall(HTTP2_PREFACE)
        header = b""
        while len(header) < 9:
            chunk = connection.recv(9 - len(header))
            if not chunk:
                return False
            header += chunk
    except (socket.timeout, OSError):
        return False
    return header[3] == HTTP2_SETTINGS
