"""Free loopback ports for the servers the tests start."""

from __future__ import annotations

import socket


def free_port(kind: int = socket.SOCK_DGRAM, host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP (dnsmasq and the server bind both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            try:
                t.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")
