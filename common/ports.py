"""Free TCP ports on this machine, for servers that must not collide (metrics, Prometheus, Ray)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel calls free now (another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_from(host: str, port: int, attempts: int = 100) -> int | None:
    """The first port from `port` on that `host` can bind, trying `attempts` of them; None if none can."""
    for candidate in range(port, port + attempts):
        with socket.socket() as s:
            try:
                s.bind((host, candidate))
                return candidate
            except OSError:
                continue
    return None
