"""IP address -> MAC from the kernel's neighbour table (ARP for IPv4, NDP for IPv6).

How a DNS query from an IPv6 address, or from a host that never used our DHCP, is tied to its device. Lookups
are dict hits on a snapshot of ``ip -j neigh show``; the snapshot is refreshed by the daemon periodically and
on a miss, at most once per ``min_interval`` so a burst of unknown clients cannot fork a process per query.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import time
from collections.abc import Callable
from functools import lru_cache

log = logging.getLogger(__name__)

_NO_MAC_STATES = {"FAILED", "INCOMPLETE", "NOARP"}


@lru_cache(maxsize=4096)  # asked on every miss in the DNS hot path; ipaddress parsing costs microseconds
def normalise_ip(ip: str) -> str:
    """One spelling per address (``fe80:0::1`` and ``fe80::1`` are the same key); a scope id is dropped."""
    try:
        return str(ipaddress.ip_address(ip.split("%", 1)[0]))
    except ValueError:
        return ip


def read_kernel_table() -> dict[str, str]:
    """The kernel's current neighbour entries that carry a MAC, as {ip: mac}."""
    cmd = ["ip", "-j", "neigh", "show"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
    table: dict[str, str] = {}
    for entry in json.loads(out or "[]"):
        mac = entry.get("lladdr")
        if not mac or _NO_MAC_STATES.intersection(entry.get("state", ())):
            continue
        table[normalise_ip(entry["dst"])] = mac.lower()
    return table


def read_default_routers() -> set[str]:
    """The next hops of the kernel's default routes (IPv4 and IPv6): the gateway's own upstream router. Only the
    kernel's routing table says which host that is; a LAN host sending DHCP or router advertisements does not.
    Routes learned from router advertisements (``proto ra``) are skipped: any LAN host can send one, and the
    kernel (or dhcpcd, NetworkManager) then adds it as a default route of its own."""
    routers: set[str] = set()
    for family in ("-4", "-6"):
        cmd = ["ip", "-j", family, "route", "show", "default"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
        for route in json.loads(out or "[]"):
            if route.get("protocol") == "ra":
                continue
            hops = [route] + [hop for hop in route.get("nexthops", ()) if isinstance(hop, dict)]  # multipath
            routers.update(normalise_ip(hop["gateway"]) for hop in hops if hop.get("gateway"))
    return routers


class NeighbourTable:
    """A cached view of the kernel neighbour table.

    An address stays mapped for ``ttl`` seconds after the kernel last listed it: the kernel forgets idle
    neighbours after a few minutes, while their addresses usually still belong to the same device.
    """

    def __init__(
        self,
        ttl: float = 600.0,
        min_interval: float = 1.0,
        reader: Callable[[], dict[str, str]] = read_kernel_table,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.min_interval = min_interval
        self._reader = reader
        self._clock = clock
        self._macs: dict[str, str] = {}
        self._seen: dict[str, float] = {}
        self._last_refresh = float("-inf")

    def lookup(self, ip: str, refresh_on_miss: bool = True) -> str | None:
        """The MAC for ``ip``, or None. A miss refreshes the snapshot (rate-limited) and looks again.

        The hot path passes ``refresh_on_miss=False`` (a pure dict lookup) and calls ``refresh()`` elsewhere.
        """
        mac = self._macs.get(ip)
        if mac is None:
            key = normalise_ip(ip)
            mac = self._macs.get(key)
            if mac is None and refresh_on_miss and self.refresh():
                mac = self._macs.get(key)
        return mac

    def refresh(self, force: bool = False) -> bool:
        """Re-read the kernel table unless it was read less than ``min_interval`` ago; True if it was read."""
        now = self._clock()
        if not force and now - self._last_refresh < self.min_interval:
            return False
        self._last_refresh = now
        try:
            current = self._reader()
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("cannot read the neighbour table: %s", exc)
            return False
        for ip, mac in current.items():
            self._macs[ip] = mac
            self._seen[ip] = now
        for ip in [ip for ip, seen in self._seen.items() if now - seen > self.ttl]:
            del self._macs[ip], self._seen[ip]
        return True

    def items(self) -> dict[str, str]:
        """A copy of the current {ip: mac} mapping (for the device tracker's periodic merge)."""
        return dict(self._macs)
