"""Quarantine with nftables for real: a client namespace routed through a gateway namespace to a server.

Topology: cli (10.77.1.2) -- veth -- gw (10.77.1.1 | 10.77.2.1, forwarding) -- veth -- srv (10.77.2.2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from policy.nftables import NftError, QuarantineFirewall

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and nftables"),
]

CLIENT_MAC = "02:77:00:00:00:02"
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    data, addr = s.recvfrom(512)
    s.sendto(data, addr)
"""
PROBE_TCP = "import socket,sys; socket.create_connection((sys.argv[1], 8080), timeout=1).close()"
PROBE_PING = """
import socket, struct, sys
def checksum(b):
    total = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
body = struct.pack("!HH", 0x77, 1) + b"iotgw"
packet = struct.pack("!BBH", 8, 0, checksum(struct.pack("!BBH", 8, 0, 0) + body + b"\\0")) + body
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(1)
s.sendto(packet, (sys.argv[1], 0))
while True:
    data, addr = s.recvfrom(1500)
    if addr[0] == sys.argv[1] and data[20] == 0:
        break
"""
PROBE_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
s.sendto(b"ping", (sys.argv[1], 53)); assert s.recvfrom(512)[0] == b"ping"
"""


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=20)


def _ok(ns: str, *cmd: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, timeout=10).returncode == 0


@pytest.fixture
def topology():
    tag = f"{os.getpid() % 100000}"
    cli, gw, srv = f"iqc{tag}", f"iqg{tag}", f"iqs{tag}"
    procs: list[subprocess.Popen] = []
    try:
        for ns in (cli, gw, srv):
            _sh("ip", "netns", "add", ns)
        _sh(
            "ip",
            "link",
            "add",
            f"qa{tag}",
            "netns",
            cli,
            "address",
            CLIENT_MAC,
            "type",
            "veth",
            "peer",
            "name",
            f"qb{tag}",
            "netns",
            gw,
        )
        _sh(
            "ip",
            "link",
            "add",
            f"qc{tag}",
            "netns",
            gw,
            "type",
            "veth",
            "peer",
            "name",
            f"qd{tag}",
            "netns",
            srv,
        )
        for ns, dev, addr in (
            (cli, f"qa{tag}", "10.77.1.2/24"),
            (gw, f"qb{tag}", "10.77.1.1/24"),
            (gw, f"qc{tag}", "10.77.2.1/24"),
            (srv, f"qd{tag}", "10.77.2.2/24"),
        ):
            _sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", cli, "route", "add", "default", "via", "10.77.1.1")
        _sh("ip", "-n", srv, "route", "add", "default", "via", "10.77.2.1")
        _sh("ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        procs.append(
            subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    srv,
                    sys.executable,
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    "10.77.2.2",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        procs.append(
            subprocess.Popen(["ip", "netns", "exec", gw, sys.executable, "-c", UDP_ECHO, "10.77.1.1"])
        )
        procs.append(
            subprocess.Popen(["ip", "netns", "exec", srv, sys.executable, "-c", UDP_ECHO, "10.77.2.2"])
        )
        deadline = time.monotonic() + 10
        while not _ok(cli, sys.executable, "-c", PROBE_TCP, "10.77.2.2"):
            assert time.monotonic() < deadline, "test server did not come up"
            time.sleep(0.2)
        yield cli, gw
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in (cli, gw, srv):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _reach(cli: str) -> dict[str, bool]:
    return {
        "ping": _ok(cli, sys.executable, "-c", PROBE_PING, "10.77.2.2"),
        "tcp": _ok(cli, sys.executable, "-c", PROBE_TCP, "10.77.2.2"),
        "dns_to_gateway": _ok(cli, sys.executable, "-c", PROBE_UDP, "10.77.1.1"),
        "dns_forwarded": _ok(cli, sys.executable, "-c", PROBE_UDP, "10.77.2.2"),
    }


def test_quarantine_drops_forwarded_traffic_by_mac_and_lifts(topology):
    cli, gw = topology
    everything = {"ping": True, "tcp": True, "dns_to_gateway": True, "dns_forwarded": True}
    assert _reach(cli) == everything
    with QuarantineFirewall(netns=gw) as fw:
        assert _reach(cli) == everything  # the table alone changes nothing
        fw.add(CLIENT_MAC.upper())
        assert fw.macs() == {CLIENT_MAC}
        # Only the gateway's own DNS stays reachable: a hard-coded outside resolver would bypass the policy.
        assert _reach(cli) == {"ping": False, "tcp": False, "dns_to_gateway": True, "dns_forwarded": False}
        fw.sync([])  # approved
        assert _reach(cli) == everything
        fw.sync([CLIENT_MAC, "02:77:00:00:00:99"])
        assert _reach(cli)["tcp"] is False
        fw.remove(CLIENT_MAC)
        assert fw.macs() == {"02:77:00:00:00:99"}
        assert _reach(cli)["tcp"] is True
    tables = subprocess.run(
        ["ip", "netns", "exec", gw, "nft", "list", "tables"], capture_output=True, text=True
    )
    assert "iotgw" not in tables.stdout  # removed on exit


def test_bad_mac_and_missing_table_are_clear_errors(topology):
    _, gw = topology
    fw = QuarantineFirewall(netns=gw)
    with pytest.raises(NftError, match="nft list set"):
        fw.macs()
    with pytest.raises(ValueError, match="not a MAC"):
        fw.add("not-a-mac")
