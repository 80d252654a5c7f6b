"""systemd's notify protocol without a dependency: one datagram to ``$NOTIFY_SOCKET`` per state change.

The daemon runs as ``Type=notify`` with ``WatchdogSec=``: it sends ``READY=1`` once it answers DNS,
``WATCHDOG=1`` at half the interval from ``watchdog_interval()``, and ``STATUS=...`` for ``systemctl status``.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the daemon needs no special case.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"WATCHDOG=1"``, ``"STATUS=serving"``; several lines allowed).

    Returns whether a message was sent; ``False`` when not started by systemd. A failure to send is
    reported as ``False`` rather than raised: a lost notification must never take the DNS server down.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    elif not address.startswith("/"):
        return False  # e.g. vsock:..., which this gateway never runs under
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``$WATCHDOG_USEC`` as sd_watchdog_enabled(3) advises.

    ``None`` when no watchdog is armed for this process (unset, unparsable, or ``$WATCHDOG_PID`` names
    another process, e.g. a child that inherited the environment).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2_000_000
