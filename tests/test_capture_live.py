"""The live sniffer and the neighbour table on a real veth pair between two network namespaces.

The client namespace sends real DHCP, DNS (IPv4 and IPv6), mDNS and garbage; the gateway namespace captures.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from dnslib import DNSRecord

from gateway.capture.sniffer import Sniffer
from gateway.devices.neighbours import NeighbourTable
from gateway.events import Counters, DhcpSeen, DnsQuery, Event, MdnsSeen
from tests.capture_netns import VethPair, sh, veth_pair

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and AF_PACKET"),
]

SEND_ALL = """
import socket, sys
from scapy.all import BOOTP, DHCP, DNS, DNSQR, DNSRR, IP, UDP, Ether, get_if_hwaddr, sendp
iface, gw4, gw6 = sys.argv[1:4]
mac = get_if_hwaddr(iface)
chaddr = bytes.fromhex(mac.replace(":", ""))
opts = [("message-type", "request"), ("requested_addr", "10.213.0.2"), ("hostname", b"cam-test"),
        ("param_req_list", [1, 3, 6, 15, 119, 252]), ("vendor_class_id", b"udhcp 1.30"), "end"]
sendp(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
      / UDP(sport=68, dport=67) / BOOTP(chaddr=chaddr, xid=7) / DHCP(options=opts),
      iface=iface, verbose=False)
for family, server, name in ((socket.AF_INET, gw4, "v4.example.com"),
                             (socket.AF_INET6, gw6, "v6.example.org")):
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(bytes(DNS(id=1, rd=1, qd=DNSQR(qname=name))), (server, 53))
announce = DNS(qr=1, aa=1, an=[DNSRR(rrname="cam-test.local", type="A", rdata="10.213.0.2"),
                               DNSRR(rrname="_hap._tcp.local", type="PTR", rdata="Cam Test._hap._tcp.local")])
sendp(Ether(src=mac, dst="01:00:5e:00:00:fb") / IP(src="10.213.0.2", dst="224.0.0.251")
      / UDP(sport=5353, dport=5353) / announce, iface=iface, verbose=False)
"""

SEND_GARBAGE_THEN_QUERY = """
import socket, sys
from dnslib import DNSRecord
from scapy.all import BOOTP, IP, UDP, Ether, get_if_hwaddr, sendp
iface, gw4, gw_mac = sys.argv[1:4]
base = Ether(src=get_if_hwaddr(iface), dst=gw_mac) / IP(src="10.213.0.2", dst=gw4)
bad = [base / UDP(sport=4000, dport=53) / b"\\x00",
       base / UDP(sport=4001, dport=53) / (b"\\x12\\x34\\x01\\x00\\x00\\x05" + b"\\x00" * 4),
       base / UDP(sport=5353, dport=5353) / (b"\\xff" * 11),
       base / UDP(sport=68, dport=67) / BOOTP(op=1)]  # no DHCP magic cookie
sendp(bad, iface=iface, verbose=False)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.sendto(DNSRecord.question("after.example.com").pack(), (gw4, 53))
"""

FLOOD = """
import socket, sys, time
from dnslib import DNSRecord
gw4, n, bursts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1
query = DNSRecord.question("flood.example.com").pack()
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for burst in range(bursts):
        time.sleep(0.05 if burst else 0)  # longer than the ring's block timeout: each burst fills a block
        for _ in range(n):
            s.sendto(query, (gw4, 53))
"""

SEND_TAGGED = """
import sys
from scapy.all import BOOTP, DHCP, DNS, DNSQR, IP, UDP, Dot1Q, Ether, get_if_hwaddr, sendp
iface, gw4 = sys.argv[1:3]
mac = get_if_hwaddr(iface)
# The receiving kernel takes the outer tag off; the inner one stays in the frame the sniffer reads.
qinq = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=100) / Dot1Q(vlan=7)
opts = [("message-type", "discover"), ("hostname", b"tagged-cam"), ("param_req_list", [1, 3, 6]), "end"]
sendp([qinq / IP(src="10.213.0.2", dst=gw4) / UDP(sport=4000, dport=53) / DNS(rd=1, qd=DNSQR(qname="qinq.example.com")),
       qinq / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
       / BOOTP(chaddr=bytes.fromhex(mac.replace(":", ""))) / DHCP(options=opts),
       Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=100) / IP(src="10.213.0.2", dst=gw4)
       / UDP(sport=4001, dport=53) / DNS(rd=1, qd=DNSQR(qname="single.example.com"))],
      iface=iface, verbose=False)
"""

UDP_TO_GATEWAY = """
import socket, sys
for addr in sys.argv[1:]:
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        s.send(b"hello")
        s.settimeout(1)
        try:  # the gateway's "port unreachable" shows it could answer, so it has resolved us
            s.recv(64)
        except (ConnectionRefusedError, TimeoutError):  # ICMP errors are rate-limited: a timeout is fine too
            pass
"""


@pytest.fixture(scope="module")
def veth():
    with veth_pair(f"t{os.getpid()}") as pair:
        yield pair


class Collector:
    """A sink that keeps every event and lets a test wait for the ones it expects."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.calls = 0
        self._changed = threading.Condition()

    def __call__(self, events: list[Event]) -> None:
        with self._changed:
            self.calls += 1
            self.events.extend(events)
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.events), timeout)


def _sniff(veth: VethPair, sink, counters: Counters | None = None, **kwargs) -> Sniffer:
    with veth.enter():
        sniffer = Sniffer(veth.gw_if, sink, counters, **kwargs)
        sniffer.start()
    return sniffer


def test_dhcp_dns_v4_v6_and_mdns_reported_once_by_client_mac(veth):
    got = Collector()
    sniffer = _sniff(veth, got)
    try:
        veth.client_python(SEND_ALL, veth.client_if, veth.gw_ip4, veth.gw_ip6)
        mac = veth.client_mac

        def complete(events):
            names = {e.qname for e in events if isinstance(e, DnsQuery)}
            kinds = {type(e) for e in events}
            return {DhcpSeen, MdnsSeen} <= kinds and {"v4.example.com", "v6.example.org"} <= names

        assert got.wait_for(complete), got.events
        time.sleep(0.3)  # a duplicate would arrive right behind the original
    finally:
        sniffer.stop()

    queries = [e for e in got.events if isinstance(e, DnsQuery)]
    by_name = {q.qname: q for q in queries}
    assert sorted(q.qname for q in queries) == ["v4.example.com", "v6.example.org"]  # each exactly once
    assert (by_name["v4.example.com"].mac, by_name["v4.example.com"].client) == (mac, veth.client_ip4)
    assert (by_name["v6.example.org"].mac, by_name["v6.example.org"].client) == (mac, veth.client_ip6)
    assert all(q.source == "capture" and abs(q.ts - time.time()) < 60 for q in queries)
    (dhcp,) = [e for e in got.events if isinstance(e, DhcpSeen)]
    assert (dhcp.mac, dhcp.hostname, dhcp.param_list, dhcp.vendor_class, dhcp.ip) == (
        mac, "cam-test", (1, 3, 6, 15, 119, 252), "udhcp 1.30", "10.213.0.2")
    (mdns,) = [e for e in got.events if isinstance(e, MdnsSeen)]
    assert mdns.mac == mac and "_hap._tcp.local" in mdns.services
    assert set(mdns.names) == {"cam-test.local", "Cam Test._hap._tcp.local"}
    assert sniffer.counters.get("capture_malformed") == 0


def test_malformed_frames_are_counted_and_capture_goes_on(veth):
    got = Collector()
    sniffer = _sniff(veth, got)
    try:
        veth.client_python(SEND_GARBAGE_THEN_QUERY, veth.client_if, veth.gw_ip4, veth.gw_mac)
        assert got.wait_for(lambda evs: any(getattr(e, "qname", "") == "after.example.com" for e in evs))
    finally:
        sniffer.stop()
    assert sniffer.counters.get("capture_malformed") == 4
    assert sniffer.counters.get("capture_frames") == 5


def test_vlan_tagged_frames_are_captured_with_one_or_two_tags(veth):
    got = Collector()
    sniffer = _sniff(veth, got)
    try:
        veth.client_python(SEND_TAGGED, veth.client_if, veth.gw_ip4)

        def complete(events):
            names = {e.qname for e in events if isinstance(e, DnsQuery)}
            return {"qinq.example.com", "single.example.com"} <= names and any(
                isinstance(e, DhcpSeen) for e in events)
        assert got.wait_for(complete), got.events
    finally:
        sniffer.stop()
    mac = veth.client_mac
    dhcp = next(e for e in got.events if isinstance(e, DhcpSeen))
    assert (dhcp.mac, dhcp.hostname) == (mac, "tagged-cam")
    assert {(e.mac, e.client) for e in got.events if isinstance(e, DnsQuery)} == {(mac, veth.client_ip4)}
    assert sniffer.counters.get("capture_malformed") == 0


def test_own_outgoing_queries_are_not_reported(veth):
    got = Collector()
    sniffer = _sniff(veth, got)
    try:
        with veth.enter(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # from the gateway
            s.sendto(DNSRecord.question("out.example.com").pack(), (veth.client_ip4, 53))
        veth.client_python(FLOOD, veth.gw_ip4, "1")
        assert got.wait_for(lambda evs: any(getattr(e, "qname", "") == "flood.example.com" for e in evs))
        time.sleep(0.2)
    finally:
        sniffer.stop()
    assert [e.qname for e in got.events if isinstance(e, DnsQuery)] == ["flood.example.com"]


SEND_TO_SELF_AND_OUTSIDE = """
import socket, sys
from dnslib import DNSRecord
from scapy.all import IP, UDP, Ether, get_if_hwaddr, sendp
iface, gw4, gw6, gw_mac = sys.argv[1:5]
for family, server in ((socket.AF_INET, gw4), (socket.AF_INET6, gw6)):
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(DNSRecord.question("self.example.com").pack(), (server, 53))
# A device with a hard-coded resolver: the frame goes to the gateway's MAC, routed onward.
sendp(Ether(src=get_if_hwaddr(iface), dst=gw_mac) / IP(src="10.213.0.2", dst="192.0.2.53")
      / UDP(sport=4000, dport=53) / DNSRecord.question("outside.example.com").pack(), iface=iface, verbose=False)
"""


def test_queries_to_the_gateways_own_dns_are_left_to_the_dns_server(veth):
    got = Collector()
    sniffer = _sniff(veth, got, skip_dns_to_self=True)
    try:
        veth.client_python(SEND_TO_SELF_AND_OUTSIDE, veth.client_if, veth.gw_ip4, veth.gw_ip6, veth.gw_mac)
        assert got.wait_for(lambda evs: any(getattr(e, "qname", "") == "outside.example.com" for e in evs))
        time.sleep(0.3)  # the queries to the gateway were sent first
    finally:
        sniffer.stop()
    assert [e.qname for e in got.events if isinstance(e, DnsQuery)] == ["outside.example.com"]


def test_sink_exception_is_counted_and_capture_goes_on(veth):
    got = Collector()
    failed = threading.Event()

    def failing_once(events):
        if not failed.is_set():
            failed.set()
            raise RuntimeError("sink bug")
        got(events)

    sniffer = _sniff(veth, failing_once)
    try:
        veth.client_python(FLOOD, veth.gw_ip4, "1")
        assert failed.wait(10)
        veth.client_python(FLOOD, veth.gw_ip4, "1")
        assert got.wait_for(lambda evs: len(evs) == 1)
    finally:
        sniffer.stop()
    assert sniffer.counters.get("capture_sink_errors") == 1
    assert sniffer._thread is None and sniffer._sock is None  # stop() closed it cleanly


def test_kernel_drops_are_counted_when_the_sink_falls_behind(veth):
    release = threading.Event()
    got = Collector()

    def slow(events):
        release.wait(10)  # hold the sniffer thread so the tiny socket buffer overflows
        got(events)

    counters = Counters()
    sniffer = _sniff(veth, slow, counters, ring_bytes=0)  # the smallest ring: two blocks
    try:
        veth.client_python(FLOOD, veth.gw_ip4, "1")  # its block reaches the sink, which holds the thread
        # Two bursts fill the two blocks of the ring; the next two find it full, and the kernel drops them.
        veth.client_python(FLOOD, veth.gw_ip4, "100", "4")
        release.set()
        time.sleep(0.5)
    finally:
        release.set()
        sniffer.stop()
    assert counters.get("capture_dropped") > 0
    assert counters.get("capture_frames") + counters.get("capture_dropped") == 401
    assert len(got.events) == counters.get("capture_frames")


def test_neighbour_table_maps_client_ipv4_and_ipv6_to_its_mac(veth):
    # Any datagram to the gateway makes the client resolve it (ARP request, NDP solicitation), which
    # teaches the gateway's kernel the client's MAC for both addresses (as a ping would).
    veth.client_python(UDP_TO_GATEWAY, veth.gw_ip4, veth.gw_ip6)
    with veth.enter():
        table = NeighbourTable(ttl=600, min_interval=30)
        deadline = time.monotonic() + 5
        while len(table.items()) < 2 and time.monotonic() < deadline:  # NDP may still be completing
            table.refresh(force=True)
            time.sleep(0.1)
        assert table.lookup(veth.client_ip4) == veth.client_mac
        assert table.lookup("fd13:0213:0::2") == veth.client_mac  # any spelling of the address
        assert table.lookup("10.213.0.99") is None
        assert table.refresh() is False  # rate-limited: the miss above already re-read the table
        sh("ip", "neigh", "flush", "dev", veth.gw_if)
        table.refresh(force=True)
        assert table.lookup(veth.client_ip4, refresh_on_miss=False) == veth.client_mac  # kept for the TTL
        table.ttl = 0
        table.refresh(force=True)
        assert table.lookup(veth.client_ip4, refresh_on_miss=False) is None


def test_capture_survives_the_interface_going_down_and_up(veth):
    got = Collector()
    sniffer = _sniff(veth, got)
    try:
        with veth.enter():
            sh("ip", "link", "set", veth.gw_if, "down")
            time.sleep(0.5)
            cpu = time.process_time()
            time.sleep(0.5)
            idle_cpu = time.process_time() - cpu  # a thread spinning on poll() errors would burn ~0.5 s
            sh("ip", "link", "set", veth.gw_if, "up")
        veth.client_python(FLOOD, veth.gw_ip4, "1")
        assert got.wait_for(lambda evs: len(evs) == 1)
    finally:
        sniffer.stop()
    assert sniffer.counters.get("capture_errors") >= 1
    assert idle_cpu < 0.25
