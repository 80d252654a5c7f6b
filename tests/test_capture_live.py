"""The live sniffer and the neighbour table on a real veth pair between two network namespaces.

The client namespace sends real DHCP, DNS (IPv4 and IPv6), mDNS and garbage; the gateway namespace captures.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time

import pytest
from dnslib import DNSRecord

from gateway.capture.frames import parse_frame
from gateway.capture.pcap import Skipped, read_frames
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


ROUTER_THEN_BROKEN = """
import sys
from scapy.all import BOOTP, DHCP, DNS, DNSQR, DNSRR, IP, UDP, Ether, sendp
iface, gw4, gw_mac, router, broken = sys.argv[1:6]
def reply(kind):  # what a router sends a client asking for a lease: nothing the parser reports
    return (Ether(src=router, dst="ff:ff:ff:ff:ff:ff") / IP(src="10.213.0.254", dst="255.255.255.255")
            / UDP(sport=67, dport=68) / BOOTP(op=2, chaddr=bytes.fromhex("020000000002"), yiaddr="10.213.0.50")
            / DHCP(options=[("message-type", kind), ("server_id", "10.213.0.254"), "end"]))
answer = (Ether(src=router, dst=gw_mac) / IP(src="10.213.0.254", dst=gw4) / UDP(sport=53, dport=40000)
          / DNS(qr=1, qd=DNSQR(qname="a.example.com"), an=DNSRR(rrname="a.example.com", rdata="192.0.2.1")))
query = Ether(src=broken, dst=gw_mac) / IP(src="10.213.0.9", dst=gw4) / UDP(sport=4000, dport=53)
frames = {"replies": [reply("offer"), answer, reply("ack")],
          "broken": [query / b"\\x00", query / DNS(rd=1, qd=DNSQR(qname="later.example.com"))]}
sendp(frames[sys.argv[6]], iface=iface, verbose=False)
"""


class DaemonOnVeth:
    """The whole daemon (store, tracker, identifier, alerts) fed by a real sniffer on the gateway's veth, as
    ``Gateway._start_sniffer`` wires it, with the sniffer's events also kept for the test to read."""

    def __init__(self, veth: VethPair, tmp_path) -> None:
        from gateway.config import Config
        from gateway.daemon import Gateway
        from gateway.store.db import Store

        cfg = Config()
        cfg.gateway.state_dir = str(tmp_path / "state")
        cfg.dns.listen = []
        cfg.capture.sniff = False  # started below, in the gateway's namespace
        cfg.store.flush_interval_s = 0.2
        self.store = Store(cfg.db_url)
        self.gateway = Gateway(cfg, self.store)
        self.got = Collector()
        self.veth = veth
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def _sink(self, events: list[Event]) -> None:
        self.got(events)
        self.gateway.ingest(events)

    def __enter__(self) -> DaemonOnVeth:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.gateway.start(), self._loop).result(30)
        self.gateway.sniffer = _sniff(self.veth, self._sink, self.gateway.counters)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(), self._loop).result(30)  # stops the sniffer too
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def handled(self, predicate, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(tracker)`` holds; the consumer drains the queue every 50 ms."""
        deadline = time.monotonic() + timeout
        while not predicate(self.gateway.tracker):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


def test_a_router_that_only_sends_dhcp_replies_is_a_device_from_its_first_frame(veth, tmp_path):
    from gateway.devices.service import forget, get_device
    from gateway.events import DeviceSeen

    router = "02:00:00:00:02:54"
    with DaemonOnVeth(veth, tmp_path) as daemon:
        gw = daemon.gateway
        # its DNS answer never reaches Python (the kernel filter keeps answers out): the replies must do
        veth.client_python(ROUTER_THEN_BROKEN, veth.client_if, veth.gw_ip4, veth.gw_mac, router, "-", "replies")
        assert daemon.handled(lambda _: gw.counters.get("capture_frames") == 2)  # both replies were read
        assert daemon.handled(lambda tracker: router in tracker.devices), daemon.got.events
        first = min(e.ts for e in daemon.got.events if e.mac == router)
        assert [type(e) for e in daemon.got.events] == [DeviceSeen]  # one for two replies: presence, once
        assert gw.tracker.devices[router].first_seen == first and gw._window_start[router] == first
        assert gw.tracker.mac_for("10.213.0.254") == router
        stored = eventually_stored(lambda: get_device(daemon.store, router))
        assert stored.device.first_seen == pytest.approx(first, abs=1e-6) and stored.device.status == "new"

        # deleted in the web UI, it is new again at its next reply (the sniffer reports it once more)
        forget(daemon.store, router)
        assert daemon.handled(lambda tracker: router not in tracker.devices)
        veth.client_python(ROUTER_THEN_BROKEN, veth.client_if, veth.gw_ip4, veth.gw_mac, router, "-", "replies")
        assert daemon.handled(lambda tracker: router in tracker.devices)
        assert gw.tracker.devices[router].first_seen > first


def test_a_device_whose_first_frame_is_malformed_is_present_from_that_frame(veth, tmp_path):
    broken = "02:00:00:00:00:77"
    with DaemonOnVeth(veth, tmp_path) as daemon:
        gw = daemon.gateway
        veth.client_python(ROUTER_THEN_BROKEN, veth.client_if, veth.gw_ip4, veth.gw_mac, "-", broken, "broken")
        assert daemon.got.wait_for(lambda evs: any(getattr(e, "qname", "") == "later.example.com" for e in evs))
        assert daemon.handled(lambda tracker: broken in tracker.devices)
        (query,) = [e for e in daemon.got.events if isinstance(e, DnsQuery)]
        start = gw.tracker.devices[broken].first_seen
        assert gw._window_start[broken] == start < query.ts  # the malformed frame's time, not the query's
        assert gw.tracker.mac_for("10.213.0.9") == broken
        assert gw.counters.get("capture_malformed") == 1


SPOOFED_QUERIES = """
import sys
from scapy.all import DNS, DNSQR, IP, UDP, Ether, sendp
iface, gw4, gw_mac, *macs = sys.argv[1:]
sendp([Ether(src=mac, dst=gw_mac) / IP(src=f"10.213.1.{i + 1}", dst=gw4) / UDP(sport=4000, dport=53)
       / DNS(rd=1, qd=DNSQR(qname="spoofed.example.com")) for i, mac in enumerate(macs)], iface=iface, verbose=False)
"""


def test_a_mac_flood_past_devices_max_makes_room_from_stale_untouched_devices_then_is_counted_not_kept(
        veth, tmp_path, caplog):
    from gateway.alerts.outbox import recent_alerts
    from gateway.devices.service import list_devices
    from gateway.policies import set_device_mode, set_quarantine
    from gateway.store.db import Store
    from gateway.store.schema import Device, DeviceName

    now, day = time.time(), 86400
    stale, labelled, named, policed, recent = (f"02:00:00:00:10:0{i}" for i in range(1, 6))
    seed = Store(f"sqlite:///{tmp_path / 'state' / 'iotgw.sqlite'}")
    with seed.transaction() as s:
        for mac in (stale, labelled, named, policed):  # unseen for two days; all but the first touched by the owner
            s.add(Device(mac=mac, first_seen=now - 9 * day, last_seen=now - 2 * day, status="new"))
        s.add(Device(mac=recent, first_seen=now - 9 * day, last_seen=now - 3600, status="new"))  # seen today
        s.flush()
        s.get(Device, labelled).label_device_type = "HS110"
        s.get(Device, named).name, s.get(Device, named).name_source = "Hall lamp", "user"
        s.add(DeviceName(mac=stale, name="old-plug", source="dhcp", first_seen=now - 9 * day, last_seen=now - 9 * day))
    seed.close()
    set_device_mode(tmp_path / "state", policed, "paused")
    set_quarantine(tmp_path / "state", True)
    spoofed = [f"02:5f:00:00:00:0{i}" for i in range(1, 6)]
    with DaemonOnVeth(veth, tmp_path) as daemon:
        gw = daemon.gateway
        gw.tracker.max_devices = 7
        # the first two fill the room, the third takes the stale untouched device's, the last two find none
        veth.client_python(SPOOFED_QUERIES, veth.client_if, veth.gw_ip4, veth.gw_mac, *spoofed, *spoofed[3:])
        assert daemon.handled(lambda _: gw.counters.get("queries") == 7), gw.counters.values
        kept = {labelled, named, policed, recent, *spoofed[:3]}
        assert set(gw.tracker.devices) == kept
        assert eventually_stored(lambda: {d.mac for d in list_devices(daemon.store)} == kept or None)
        with daemon.store.session() as s:
            assert s.query(DeviceName).filter_by(mac=stale).count() == 0  # its rows went with it
        assert (gw.counters.get("devices_evicted"), gw.counters.get("devices_untracked")) == (1, 2)  # each once
        for mac in spoofed[3:]:  # not kept, yet quarantined as any new device (DNS and the nftables set)
            assert gw.filtering.engine.is_quarantined(gw.filtering.contexts[mac])
            assert mac not in gw._window_start and not gw.alerts.presence.is_online(mac)
        alerts = eventually_stored(lambda: recent_alerts(daemon.store, kind="too_many_devices") or None)
        assert [(a.mac, a.data["max"]) for a in alerts] == [(None, 7)]
    said = [r for r in caplog.records if "too many devices" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"


def test_a_long_mac_flood_past_devices_max_leaves_the_filters_memory_bounded_and_still_quarantines(veth, tmp_path):
    """Each device not kept for want of room still got a filtering context (for its quarantine), and none ever
    went: a flood of spoofed MACs grew the daemon's memory and the nftables set without bound, [devices] max
    notwithstanding. Past twice the bound the contexts of devices neither kept nor stored go (each is made again,
    new, at the device's next packet); the latest flooder is still quarantined."""
    from gateway.policies import set_quarantine

    set_quarantine(tmp_path / "state", True)
    spoofed = [f"02:5e:00:00:00:{i:02x}" for i in range(40)]
    with DaemonOnVeth(veth, tmp_path) as daemon:
        gw = daemon.gateway
        gw.tracker.max_devices = 5
        veth.client_python(SPOOFED_QUERIES, veth.client_if, veth.gw_ip4, veth.gw_mac, *spoofed)
        assert daemon.handled(lambda _: gw.counters.get("queries") == 40), gw.counters.values
        assert set(gw.tracker.devices) == set(spoofed[:5]) and gw.counters.get("devices_untracked") == 35
        assert len(gw.filtering.contexts) <= 2 * 5, len(gw.filtering.contexts)
        for mac in (*spoofed[:5], spoofed[-1]):  # the kept ones and the latest flooder: quarantined as new
            assert gw.filtering.engine.is_quarantined(gw.filtering.contexts[mac])


def eventually_stored(read, timeout: float = 10.0):
    """``read()``'s result once it is not None (the daemon writes in batches)."""
    deadline = time.monotonic() + timeout
    while (result := read()) is None:
        assert time.monotonic() < deadline, "never stored"
        time.sleep(0.1)
    return result


def test_each_sender_is_reported_present_once_however_many_frames_it_sends(veth):
    from gateway.events import DeviceSeen

    got = Collector()
    sniffer = _sniff(veth, got)
    try:
        veth.client_python(SEND_ALL, veth.client_if, veth.gw_ip4, veth.gw_ip6)
        veth.client_python(FLOOD, veth.gw_ip4, "20", "3")  # three bursts: three ring blocks, three sink calls
        assert got.wait_for(lambda evs: sum(isinstance(e, DnsQuery) for e in evs) == 62), got.events
    finally:
        sniffer.stop()
    mac = veth.client_mac
    presence = [(i, e) for i, e in enumerate(got.events) if isinstance(e, DeviceSeen)]
    (dhcp_at,) = [i for i, e in enumerate(got.events) if isinstance(e, DhcpSeen)]
    assert got.calls >= 3 and len(presence) == 1
    ((at, seen),) = presence
    # its first frame is its DHCP request, sent from 0.0.0.0: present with no address, just before it
    assert (at, seen.mac, seen.ip, seen.ts) == (dhcp_at - 1, mac, None, got.events[dhcp_at].ts)


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


TCP_QUERIES = """
import socket, sys, time
from dnslib import DNSRecord
def message(name):
    query = DNSRecord.question(name).pack()
    return len(query).to_bytes(2, "big") + query
gw4, gw6 = sys.argv[1:3]
for server, data in ((gw4, message("tcp4.example.com")), (gw6, message("tcp6.example.org")),
                     (gw4, message("first.example.net") + message("second.example.net"))):
    with socket.create_connection((server, 53)) as s:  # a stub resolver's one write: length and query
        s.sendall(data)
with socket.create_connection((gw4, 53)) as s:  # one writing the length and the query in two calls, as segments
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = message("two-writes.example.com")
    s.sendall(data[:2])
    time.sleep(0.05)  # so the kernel sends the two bytes alone, not joined to the rest (autocorking)
    s.sendall(data[2:])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # sent last: once it is seen, so are the others
    s.sendto(DNSRecord.question("udp.example.com").pack(), (gw4, 53))
"""


def test_dns_queries_over_tcp_pass_the_kernel_filter_and_are_reported(veth):
    """A device whose query went over TCP (after a truncated answer, or always) was unseen: the kernel filter
    passed UDP only. The gateway's listeners take the connections without ever accepting them (the kernel
    answers the handshake and keeps the data), as a resolver there would."""
    got = Collector()
    with veth.enter():
        listeners = [socket.create_server((veth.gw_ip4, 53)),
                     socket.create_server((veth.gw_ip6, 53), family=socket.AF_INET6)]
    sniffer = _sniff(veth, got)
    try:
        veth.client_python(TCP_QUERIES, veth.gw_ip4, veth.gw_ip6)
        assert got.wait_for(lambda evs: any(getattr(e, "qname", "") == "udp.example.com" for e in evs)), got.events
    finally:
        sniffer.stop()
        for listener in listeners:
            listener.close()
    mac = veth.client_mac
    assert [(e.qname, e.client, e.mac) for e in got.events if isinstance(e, DnsQuery)] == [
        ("tcp4.example.com", veth.client_ip4, mac), ("tcp6.example.org", veth.client_ip6, mac),
        ("first.example.net", veth.client_ip4, mac), ("second.example.net", veth.client_ip4, mac),
        ("two-writes.example.com", veth.client_ip4, mac), ("udp.example.com", veth.client_ip4, mac)]
    assert sniffer.counters.get("capture_malformed") == sniffer.counters.get("capture_split_dns") == 0


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
    assert sum(isinstance(e, DnsQuery) for e in got.events) == counters.get("capture_frames")


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
        assert got.wait_for(lambda evs: any(isinstance(e, DnsQuery) for e in evs))
    finally:
        sniffer.stop()
    assert sniffer.counters.get("capture_errors") >= 1
    assert idle_cpu < 0.25


@pytest.mark.parametrize("linktype,option", [(276, []), (113, ["-y", "LINUX_SLL"])], ids=["sll2", "sll"])
def test_a_capture_written_by_tcpdump_on_any_interface_is_read_by_the_clients_mac(tmp_path, linktype, option):
    # the gateway namespace plays the router a home-lab user ran `tcpdump -i any -w lan.pcap` on; a pair of its own,
    # since tcpdump counts packets: the module's pair has been taken down and up by then (its IPv6 addresses gone)
    with veth_pair(f"d{os.getpid()}") as veth:
        _tcpdump_any(veth, tmp_path / "any.pcap", linktype, option)


def _tcpdump_any(veth: VethPair, pcap, linktype: int, option: list[str]) -> None:
    # -c: tcpdump ends itself at the 6th UDP packet (4 from the client, 1 on loopback, 1 sent to the client), so
    # the file is whole when it exits and no wait guesses when the last packet was written; -Z root: tcpdump
    # drops to its own user before opening the file otherwise
    tcpdump = subprocess.Popen(["ip", "netns", "exec", veth.gw, "tcpdump", "-i", "any", *option, "-Z", "root", "-U",
                                "-c", "6", "-w", str(pcap), "udp"], stderr=subprocess.PIPE, text=True)
    try:
        said = [tcpdump.stderr.readline()]  # "listening on any, ..." once its socket is capturing
        while said[-1] and "listening on any" not in said[-1]:  # after "data link type ..."
            said.append(tcpdump.stderr.readline())
        assert said[-1], said
        veth.client_python(SEND_ALL, veth.client_if, veth.gw_ip4, veth.gw_ip6)
        with veth.enter():
            for addr in ("127.0.0.1", veth.client_ip4):  # the router's own: on loopback, and out to the client
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.sendto(b"own", (addr, 9))
        try:
            tcpdump.wait(timeout=30)
        except subprocess.TimeoutExpired:  # fewer packets than counted: SIGINT writes what came, for the asserts
            tcpdump.send_signal(signal.SIGINT)
            tcpdump.wait(timeout=30)
    finally:
        if tcpdump.poll() is None:
            tcpdump.kill()
            tcpdump.wait()
        tcpdump.stderr.close()
    assert int.from_bytes(pcap.read_bytes()[20:24], "little") == linktype
    skipped = Skipped()
    frames = [frame for _, frame in read_frames(pcap, skipped)]
    mac = veth.client_mac
    assert {frame[6:12].hex(":") for frame in frames} == {mac}
    assert {frame[:6].hex(":") for frame in frames} == {"ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "01:00:5e:00:00:fb"}
    # the loopback datagram (libpcap keeps only its incoming copy) and the one the router sent: no LAN device
    assert (skipped.not_ethernet, skipped.outgoing, skipped.short) == (1, 1, 0)
    events = [e for frame in frames for e in parse_frame(frame, 0.0)]
    assert {e.qname for e in events if isinstance(e, DnsQuery)} == {"v4.example.com", "v6.example.org"}
    (dhcp,) = [e for e in events if isinstance(e, DhcpSeen)]
    (mdns,) = [e for e in events if isinstance(e, MdnsSeen)]
    assert dhcp.hostname == "cam-test" and {e.mac for e in events} == {mac} and "_hap._tcp.local" in mdns.services
