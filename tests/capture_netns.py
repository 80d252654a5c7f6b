"""Network namespaces for capture tests: two namespaces joined by a veth pair, removed even when a test fails.

The test process itself stays in the host namespace; ``enter()`` moves only the calling thread into the
gateway's namespace (setns applies per thread), so the sockets it opens and the processes it starts live
there. ``http_server`` serves HTTP from the LAN side, for list fetches that must come from another host.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tests.list_server import DoGet, list_server

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class VethPair:
    """Namespace ``gw`` (interface ``gw_if``) and namespace ``client`` (``client_if``), addressed below."""

    gw: str
    client: str
    gw_if: str = "gw0"
    client_if: str = "cl0"
    gw_ip4: str = "10.213.0.1"
    client_ip4: str = "10.213.0.2"
    gw_ip6: str = "fd13:213::1"
    client_ip6: str = "fd13:213::2"

    def mac(self, ns: str, ifname: str) -> str:
        (link,) = json.loads(sh("ip", "-n", ns, "-j", "link", "show", ifname).stdout)
        return link["address"]

    @property
    def client_mac(self) -> str:
        return self.mac(self.client, self.client_if)

    @property
    def gw_mac(self) -> str:
        return self.mac(self.gw, self.gw_if)

    @contextlib.contextmanager
    def enter(self, ns: str | None = None) -> Iterator[None]:
        """Run the calling thread in the gateway namespace (or ``ns``) for the ``with`` block."""
        own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{ns or self.gw}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def client_python(self, script: str, *args: str) -> str:
        """Run ``script`` with this interpreter inside the client namespace; its stdout."""
        proc = sh("ip", "netns", "exec", self.client, sys.executable, "-c", script, *args, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"client script failed:\n{proc.stderr}")
        return proc.stdout


@contextlib.contextmanager
def veth_pair(tag: str) -> Iterator[VethPair]:
    """Create the two namespaces and the veth between them; delete both on exit, whatever happened."""
    pair = VethPair(gw=f"iotgw-{tag}-gw", client=f"iotgw-{tag}-cl")
    try:
        sh("ip", "netns", "add", pair.gw)
        sh("ip", "netns", "add", pair.client)
        sh("ip", "-n", pair.gw, "link", "add", pair.gw_if, "type", "veth", "peer", "name", pair.client_if,
           "netns", pair.client)
        for ns, ifname, ip4, ip6 in ((pair.gw, pair.gw_if, pair.gw_ip4, pair.gw_ip6),
                                     (pair.client, pair.client_if, pair.client_ip4, pair.client_ip6)):
            sh("ip", "-n", ns, "addr", "add", f"{ip4}/24", "dev", ifname)
            sh("ip", "-n", ns, "addr", "add", f"{ip6}/64", "dev", ifname, "nodad")
            sh("ip", "-n", ns, "link", "set", ifname, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        sh("ip", "netns", "del", pair.client, check=False)  # takes the veth pair with it
        sh("ip", "netns", "del", pair.gw, check=False)


GW_LL, CLIENT_LL = "fe80::1", "fe80::2"  # on both links of ``lan_and_wan``: told apart only by the interface
WAN_IF, WAN_PEER_IF = "gw1", "wan0"


@contextlib.contextmanager
def lan_and_wan(tag: str) -> Iterator[tuple[VethPair, str]]:
    """(the LAN pair, the WAN namespace): the gateway's gw0 faces the LAN client, its gw1 a WAN neighbour, and the
    far end of each has the same link-local address, CLIENT_LL (the gateway GW_LL on both). Every end has only
    the address given here (no kernel-made ones, which would wait for DAD)."""
    wan = f"iotgw-{tag}-wan"
    with veth_pair(tag) as pair:
        try:
            sh("ip", "netns", "add", wan)
            sh("ip", "-n", pair.gw, "link", "add", WAN_IF, "type", "veth", "peer", "name", WAN_PEER_IF, "netns", wan)
            for ns, ifname, address in ((pair.gw, pair.gw_if, GW_LL), (pair.client, pair.client_if, CLIENT_LL),
                                        (pair.gw, WAN_IF, GW_LL), (wan, WAN_PEER_IF, CLIENT_LL)):
                sh("ip", "-n", ns, "link", "set", ifname, "down")
                sh("ip", "-n", ns, "link", "set", ifname, "addrgenmode", "none")
                sh("ip", "-n", ns, "addr", "add", f"{address}/64", "dev", ifname, "nodad")
                sh("ip", "-n", ns, "link", "set", ifname, "up")
            yield pair, wan
        finally:
            sh("ip", "netns", "del", wan, check=False)


def http_server(pair: VethPair, ns: str, host: str, do_get: DoGet) -> contextlib.AbstractContextManager[str]:
    """``list_server`` with its socket in namespace ``ns`` on ``host``; yields its base URL."""
    return list_server(do_get, host, bind=lambda: pair.enter(ns))
