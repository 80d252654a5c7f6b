"""The whole daemon on loopback: real dnsmasq upstream, real DNS client sockets, real frames through the
parser, the store, and a policy change applied while it runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import dns.message
import dns.query
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from gateway.capture.frames import parse_frame
from gateway.config import Config
from gateway.daemon import Gateway
from gateway.devices.service import get_device, list_devices
from gateway.policyfile import load_policy, save_policy
from gateway.store.db import Store
from gateway.store.querylog import recent
from identifier.bundle import Bundle
from policy.model import Policy, Rule
from tests.dns_helpers import Dnsmasq, needs_dnsmasq
from tests.ports import free_port

pytestmark = needs_dnsmasq


class RunningGateway:
    def __init__(self, tmp_path, upstream: Dnsmasq) -> None:
        cfg = Config()
        cfg.gateway.state_dir = str(tmp_path / "state")
        cfg.dns.listen = [f"127.0.0.1:{free_port()}"]
        cfg.dns.upstreams = [upstream.address]
        cfg.dns.lan = ["127.0.0.0/8"]
        cfg.capture.sniff = False
        cfg.store.flush_interval_s = 0.2
        self.cfg = cfg
        self.store = Store(cfg.db_url)
        self.gateway = Gateway(cfg, self.store)
        self.port = int(cfg.dns.listen[0].rsplit(":", 1)[1])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RunningGateway:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.gateway.start(), self._loop).result(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def flush(self) -> None:
        """Write what the daemon holds now, as its flush loop does."""
        assert asyncio.run_coroutine_threadsafe(self.gateway._flush(), self._loop).result(30)

    def ask(self, name: str, source_ip: str, rdtype: str = "A") -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source_ip, 0))
            sock.settimeout(5)
            sock.sendto(query.to_wire(), ("127.0.0.1", self.port))
            return dns.message.from_wire(sock.recv(4096))

    def dhcp(self, mac: str, ip: str, hostname: str) -> None:
        frame = (Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                 / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")))
                 / DHCP(options=[("message-type", "request"), ("requested_addr", ip),
                                 ("hostname", hostname.encode()), ("param_req_list", [1, 3, 6]), "end"]))
        self.gateway.ingest(parse_frame(bytes(frame), time.time()))


def kettle_asks_for_a_lease(gw: RunningGateway, mac: str, ip: str) -> None:
    """A Smarter kettle of a production run the model never saw (``mac``) sends its DHCP request, as the model's
    iKettle2 prototype does, and nothing else: the type stays between its twin products, the maker is plain."""
    from gateway.demo import VirtualDevice, build_frame
    from identifier.observation import DhcpObservation

    kettle = gw.gateway.identifier.prototypes()["iKettle2"]
    virtual = VirtualDevice("kettle", mac, ip, kettle)
    for obs in kettle:
        if isinstance(obs, DhcpObservation):
            gw.gateway.ingest(parse_frame(build_frame(virtual, obs), time.time()))


def eventually(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, LookupError):  # not there yet
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def answers(msg: dns.message.Message) -> set[str]:
    return {rr.to_text() for rrset in msg.answer for rr in rrset}


def test_device_from_dhcp_owns_its_dns_queries_and_policy_applies_live(tmp_path, upstream):
    mac = "02:aa:bb:cc:dd:01"
    with RunningGateway(tmp_path, upstream) as gw:
        gw.dhcp(mac, "127.0.0.21", "living-room-cam")
        eventually(lambda: gw.gateway.tracker.mac_for("127.0.0.21") == mac)
        assert answers(gw.ask("www.example.test", "127.0.0.21")) == {"192.0.2.10"}

        def logged():
            rows = recent(gw.store, mac=mac)
            assert rows and rows[0].qname == "www.example.test" and rows[0].verdict == "allowed"
            return rows
        eventually(logged)
        detail = eventually(lambda: get_device(gw.store, mac))
        assert detail.device.name == "living-room-cam" and detail.device.name_source == "dhcp"
        assert [a.ip for a in detail.addresses] == ["127.0.0.21"]

        # The owner blocks the name for this device only; the running daemon applies it within a second.
        data = load_policy(gw.cfg.state_dir)
        data.policies[f"device:{mac}"] = Policy(rules=[Rule("block", "name", "example.test")])
        save_policy(gw.cfg.state_dir, data)
        eventually(lambda: answers(gw.ask("www.example.test", "127.0.0.21")) == {"0.0.0.0"}, timeout=5)
        # Another client is not affected.
        assert answers(gw.ask("www.example.test", "127.0.0.22")) == {"192.0.2.10"}
        blocked = eventually(lambda: recent(gw.store, mac=mac, verdict="blocked"))
        assert blocked[0].rule and mac in blocked[0].rule


def test_client_without_mac_is_keyed_by_address_then_merged_into_its_mac(tmp_path, upstream):
    mac = "02:aa:bb:cc:dd:02"
    with RunningGateway(tmp_path, upstream) as gw:
        gw.ask("www.example.test", "127.0.0.31")
        eventually(lambda: any(d.mac == "ip:127.0.0.31" for d in list_devices(gw.store)))
        gw.dhcp(mac, "127.0.0.31", "phone")
        gw.ask("other.example.test", "127.0.0.31")

        def merged():
            keys = {d.mac for d in list_devices(gw.store)}
            assert mac in keys and "ip:127.0.0.31" not in keys
            return True
        eventually(merged)
        names = {q.qname for q in recent(gw.store, mac=mac)}
        assert names == {"www.example.test", "other.example.test"}  # the earlier query followed the device


def test_queries_still_waiting_for_the_query_log_follow_a_merged_device(tmp_path, upstream):
    """The merge moves the address's past queries to the MAC in the query log, but queries the query log had
    not written yet were written afterwards under the address: lost from the device's history for good."""
    mac = "02:aa:bb:cc:dd:1c"
    gw = RunningGateway(tmp_path, upstream)
    gw.gateway.querylog.flush_interval_s = 3600  # the query log writes only when asked (or at the stop)
    with gw:
        gw.ask("early.example.test", "127.0.0.32")
        eventually(lambda: any(d.mac == "ip:127.0.0.32" for d in list_devices(gw.store)))
        gw.dhcp(mac, "127.0.0.32", "phone")
        eventually(lambda: "ip:127.0.0.32" not in {d.mac for d in list_devices(gw.store)})
    assert {(q.mac, q.qname) for q in recent(gw.store)} == {(mac, "early.example.test")}


def test_restart_keeps_devices_and_does_not_announce_them_again(tmp_path, upstream):
    mac = "02:aa:bb:cc:dd:03"
    with RunningGateway(tmp_path, upstream) as gw:
        gw.dhcp(mac, "127.0.0.41", "plug")
        eventually(lambda: any(d.mac == mac for d in list_devices(gw.store)))
    with RunningGateway(tmp_path, upstream) as gw:
        assert gw.gateway.tracker.mac_for("127.0.0.41") == mac
        gw.ask("www.example.test", "127.0.0.41")
        eventually(lambda: recent(gw.store, mac=mac))
    from gateway.alerts import recent_alerts

    assert [a.mac for a in recent_alerts(gw.store, kind="new_device")] == [mac]


def test_paused_device_mode_blocks_everything_for_that_device_only(tmp_path, upstream):
    from gateway.policies import device_mode, set_device_mode

    mac = "02:aa:bb:cc:dd:04"
    with RunningGateway(tmp_path, upstream) as gw:
        gw.dhcp(mac, "127.0.0.51", "tablet")
        eventually(lambda: gw.gateway.tracker.mac_for("127.0.0.51") == mac)
        set_device_mode(gw.cfg.state_dir, mac, "paused")  # what Home Assistant's policy select calls
        assert device_mode(gw.cfg.state_dir, mac) == "paused"
        eventually(lambda: answers(gw.ask("www.example.test", "127.0.0.51")) == {"0.0.0.0"}, timeout=5)
        assert answers(gw.ask("www.example.test", "127.0.0.52")) == {"192.0.2.10"}
        set_device_mode(gw.cfg.state_dir, mac, "default")
        eventually(lambda: answers(gw.ask("www.example.test", "127.0.0.51")) == {"192.0.2.10"}, timeout=5)


def test_query_outside_the_learned_profile_raises_one_anomaly_alert_per_domain(tmp_path, upstream):
    from gateway.alerts import recent_alerts
    from gateway.devices.service import label

    mac = "02:aa:bb:cc:dd:05"
    with RunningGateway(tmp_path, upstream) as gw:
        profile = gw.gateway.filtering.engine.profile("HueBridge")
        assert profile, "the shipped model bundle has a learned profile for the Hue bridge"
        gw.dhcp(mac, "127.0.0.61", "Philips-hue")
        eventually(lambda: any(d.mac == mac for d in list_devices(gw.store)))
        label(gw.store, mac, manufacturer="Philips", device_type="HueBridge", category="hub")
        eventually(lambda: gw.gateway.filtering.contexts.get(mac) is not None
                   and gw.gateway.filtering.contexts[mac].device_type == "HueBridge")
        for name in ("www.example.test", "other.example.test", "www.example.test"):
            gw.ask(name, "127.0.0.61")
        inside = next(iter(profile))
        gw.ask(f"www.{inside}", "127.0.0.61")  # inside the profile: no alert (the upstream says NXDOMAIN)
        alerts = eventually(lambda: recent_alerts(gw.store, kind="anomaly", mac=mac))
        time.sleep(1.5)  # let any further (wrong) alerts arrive
        alerts = recent_alerts(gw.store, kind="anomaly", mac=mac)
        assert [a.data["domain"] for a in alerts] == ["www.example.test"]  # one per SLD, none for the profile


def test_a_device_querying_ever_new_domains_outside_its_profile_is_alerted_a_bounded_number_of_times(
        tmp_path, upstream, caplog):
    """Each new domain outside a device's learned profile raised one alert and stayed in a set for good, so a device
    querying generated names raised an alert a query and grew the daemon's memory without end. Now a device gets
    at most ANOMALY_DOMAINS_MAX such alerts a run; the rest are counted and said once in the log."""
    from gateway.alerts import recent_alerts
    from gateway.devices.service import label
    from gateway.filtering import ANOMALY_DOMAINS_MAX

    mac = "02:aa:bb:cc:dd:43"
    with RunningGateway(tmp_path, upstream) as gw:
        gw.dhcp(mac, "127.0.0.62", "Philips-hue")
        eventually(lambda: any(d.mac == mac for d in list_devices(gw.store)))
        label(gw.store, mac, manufacturer="Philips", device_type="HueBridge", category="hub")
        eventually(lambda: gw.gateway.filtering.contexts.get(mac) is not None
                   and gw.gateway.filtering.contexts[mac].device_type == "HueBridge")
        extra = 20
        for i in range(ANOMALY_DOMAINS_MAX + extra):
            gw.ask(f"www.generated{i}.test", "127.0.0.62")
        eventually(lambda: gw.gateway.counters.get("anomalies_unreported") == extra)
        alerts = eventually(lambda: (a := recent_alerts(gw.store, kind="anomaly", mac=mac, limit=1000))
                            and len(a) >= ANOMALY_DOMAINS_MAX and a)
        assert {a.data["domain"] for a in alerts} == {f"www.generated{i}.test" for i in range(ANOMALY_DOMAINS_MAX)}
        assert len(gw.gateway.filtering._anomalous[mac]) == ANOMALY_DOMAINS_MAX
    assert len([r for r in caplog.records if "outside its profile" in r.message]) == 1


def test_a_new_device_sending_fat_mdns_packets_keeps_a_bounded_observation_window(tmp_path, upstream):
    """mDNS packets of compressed 255-character names are 11 kB of JSON each in a device's observation window: 2000
    of them made a 22 MB window, held in memory and rewritten to the store at every flush of the device's first
    minute. Now a window holds at most WINDOW_MAX_CHARS; what comes after is counted, as past WINDOW_MAX_OBS."""
    import json

    import dnslib

    from gateway.daemon import WINDOW_MAX_CHARS
    from gateway.store.schema import ObservationWindow

    mac = "02:aa:bb:cc:dd:44"
    suffix = ".".join(["x" * 63] * 3) + ".local"

    def fat(k: int) -> bytes:
        record = dnslib.DNSRecord(dnslib.DNSHeader(qr=1, aa=1))
        for i in range(54):  # 1.4 kB on the wire: every name after the first is a label and a pointer
            record.add_answer(dnslib.RR(f"n{k}-{i}.{suffix}", dnslib.QTYPE.A, rdata=dnslib.A("127.0.0.63"), ttl=120))
        return bytes(Ether(src=mac, dst="01:00:5e:00:00:fb") / IP(src="127.0.0.63", dst="224.0.0.251")
                     / UDP(sport=5353, dport=5353) / record.pack())

    packets = 2 * WINDOW_MAX_CHARS // 11_000
    with RunningGateway(tmp_path, upstream) as gw:
        for k in range(packets):
            gw.gateway.ingest(parse_frame(fat(k), time.time()))
        eventually(lambda: gw.gateway.counters.get("window_observations_dropped") > 0)

        def stored() -> list[dict]:
            with gw.store.session() as s:
                window = s.get(ObservationWindow, mac)
                return window.observations if window is not None else []

        observations = eventually(lambda: len(stored()) == len(gw.gateway._windows[mac]) and stored())
        assert len(json.dumps(observations)) <= WINDOW_MAX_CHARS < packets * 11_000
        assert observations[0]["names"][0] == f"n0-0.{suffix}"  # the first ones, as past WINDOW_MAX_OBS


def test_a_flood_beyond_the_event_queue_is_counted_not_silently_lost(tmp_path, monkeypatch):
    import gateway.daemon
    from gateway.events import DnsQuery

    monkeypatch.setattr(gateway.daemon, "QUEUE_MAX", 5)
    cfg = Config()
    cfg.gateway.state_dir = str(tmp_path)
    gw = Gateway(cfg, Store(cfg.db_url))  # not started: nothing drains the queue
    query = DnsQuery(1.0, "127.0.0.9", None, "x.example.test", 1, "example.test")
    for _ in range(4):
        gw.emit_query(query)
    gw.ingest([query, query])  # fits: the bound is checked before a batch
    gw.emit_query(query)
    gw.ingest([query] * 3)
    assert len(gw._queue) == 6
    assert gw.counters.get("events_dropped") == 4


def test_dns_keeps_answering_while_another_process_holds_the_database_write_lock(tmp_path, upstream):
    """A new device's alert is a database write. Made on the event loop, it stopped every DNS answer for as long
    as another writer (the web UI, the CLI) held the lock: up to the 30 s busy timeout, past systemd's watchdog."""
    import sqlite3

    from gateway.alerts import recent_alerts

    with RunningGateway(tmp_path, upstream) as gw:
        lock = sqlite3.connect(tmp_path / "state" / "iotgw.sqlite", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        clients = [f"127.0.0.{100 + n}" for n in range(8)]
        try:
            for client in clients:  # each is a new device, and its alert waits for the lock
                assert answers(gw.ask("www.example.test", client)) == {"192.0.2.10"}
                time.sleep(0.1)  # the consumer's tick: each query is taken off the queue before the next
        finally:
            lock.execute("COMMIT")
            lock.close()
        # and once the lock is free, every alert is recorded: none was lost for the wait
        eventually(lambda: {a.mac for a in recent_alerts(gw.store, kind="new_device")} >= {f"ip:{c}" for c in clients})


def test_a_stop_during_a_flush_lets_it_finish_and_handle_its_errors(tmp_path, upstream):
    """SIGTERM while a flush waits on the database: the flush was cancelled under its worker thread, so when the
    write then failed nobody took the batch back or wrote it device by device: every device in it was lost."""
    import sqlite3

    from sqlalchemy import text

    from gateway.events import DhcpSeen

    good, refused = "02:aa:bb:cc:dd:0c", "02:aa:bb:cc:dd:0d"
    gw = RunningGateway(tmp_path, upstream).__enter__()
    with gw.store.transaction() as s:  # a row the database refuses: the batch is written again device by device
        s.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON device_names WHEN NEW.name = 'refused-name' "
                       "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
    lock = sqlite3.connect(tmp_path / "state" / "iotgw.sqlite", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        gw.gateway.ingest([DhcpSeen(time.time(), good, "127.0.0.91", hostname="good-name"),
                           DhcpSeen(time.time(), refused, "127.0.0.92", hostname="refused-name")])
        # taken by a flush, whose write now waits for the lock
        eventually(lambda: all(mac in gw.gateway.tracker.devices and not gw.gateway.tracker.devices[mac].new
                               for mac in (good, refused)))
        stopping = asyncio.run_coroutine_threadsafe(gw.gateway.stop(), gw._loop)
        time.sleep(0.5)  # the stop is under way while the flush still waits
    finally:
        lock.execute("COMMIT")
        lock.close()
    stopping.result(60)
    gw._loop.call_soon_threadsafe(gw._loop.stop)
    gw._thread.join(5)
    store = Store(gw.cfg.db_url)
    assert {n.name for n in get_device(store, good).names} == {"good-name"}
    assert get_device(store, refused).names == []  # its device is written, its refused name alone is dropped


def test_an_identification_of_an_address_keyed_device_follows_it_into_its_mac(tmp_path, upstream):
    """Identified while keyed by its address, then mapped to its MAC before the next flush: the identification
    was written for the address-keyed device, which the merge had just removed, so it was silently dropped."""
    from gateway.events import AddressSeen, DhcpSeen, DnsQuery

    mac, ip = "02:aa:bb:cc:dd:0e", "127.0.0.93"
    with RunningGateway(tmp_path, upstream) as gw:
        t0 = time.time()
        # one ingest, so one flush holds it all: two queries a window apart (the second ends the window, and
        # its identification is due), then the DHCP request that names the address's MAC
        gw.gateway.ingest([
            DnsQuery(t0, ip, None, "www.example.test", 1, "example.test"),
            DnsQuery(t0 + 61, ip, None, "www.example.test", 1, "example.test"),
            DhcpSeen(t0 + 62, mac, ip, hostname="thing"),
            AddressSeen(t0 + 62, mac, ip, "dhcp"),
        ])
        detail = eventually(lambda: get_device(gw.store, mac).identifications)
        assert len(detail) == 1 and detail[0].decided_after_s is None
        assert f"ip:{ip}" not in {d.mac for d in list_devices(gw.store)}
        with gw.store.session() as s:
            from gateway.store.schema import ObservationWindow
            window = s.get(ObservationWindow, mac)
            # the MAC's own window (open, from its DHCP request) is the one kept, as for a merge across flushes
            assert window is not None and {o["kind"] for o in window.observations} == {"dhcp"}


def test_an_identification_of_an_address_keyed_device_follows_it_into_its_mac_after_a_failed_flush(tmp_path,
                                                                                                   upstream):
    """Identified under its address and taken by a flush; mapped to its MAC while that flush waited on the
    database; the flush then failed (a full disk) and took its batch back, the identification still under the
    address, which the merge had removed: the next flush dropped it as the identification of a deleted device."""
    import sqlite3

    from gateway.events import AddressSeen, DhcpSeen, DnsQuery

    mac, ip = "02:aa:bb:cc:dd:13", "127.0.0.99"
    with RunningGateway(tmp_path, upstream) as gw:
        lock = sqlite3.connect(tmp_path / "state" / "iotgw.sqlite", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            t0 = time.time()
            # two queries a window apart: the second ends the window, and its identification is due
            gw.gateway.ingest([DnsQuery(t0, ip, None, "www.example.test", 1, "example.test"),
                               DnsQuery(t0 + 61, ip, None, "www.example.test", 1, "example.test")])
            # taken by a flush, whose write now waits for the lock
            eventually(lambda: f"ip:{ip}" in gw.gateway.tracker.devices and not gw.gateway._pending_identities
                       and gw.gateway.tracker.devices[f"ip:{ip}"].stored is not None)
            gw.gateway.ingest([DhcpSeen(t0 + 62, mac, ip, hostname="thing"), AddressSeen(t0 + 62, mac, ip, "dhcp")])
            eventually(lambda: f"ip:{ip}" not in gw.gateway.tracker.devices)  # merged meanwhile
            # the identification's row fails as on a full disk (an OperationalError), once
            lock.execute("CREATE TRIGGER fail BEFORE INSERT ON identifications "
                         "BEGIN SELECT * FROM no_such_table; END")
        finally:
            lock.execute("COMMIT")
        eventually(lambda: gw.gateway.counters.get("store_errors") >= 1)
        lock.execute("DROP TRIGGER fail")
        lock.close()
        detail = eventually(lambda: get_device(gw.store, mac).identifications)
        assert len(detail) == 1 and detail[0].decided_after_s is None
        assert f"ip:{ip}" not in {d.mac for d in list_devices(gw.store)}


def test_a_known_device_at_a_new_address_keeps_its_identification(tmp_path, upstream, monkeypatch):
    """A device whose first query from a new address came before its MAC was known there (a new lease) met the
    gateway as an address-keyed device, merged into its MAC moments later. Its window and session moved to the
    MAC, whose own window had long closed: identified again from a session that never saw its MAC or DHCP
    request, it was called unknown, and that replaced what it had been identified as."""
    import gateway.daemon
    from gateway.alerts import recent_alerts

    monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)
    mac = "5c:cf:7f:99:a0:02"
    with RunningGateway(tmp_path, upstream) as gw:
        kettle_asks_for_a_lease(gw, mac, "127.0.0.94")
        first = eventually(lambda: get_device(gw.store, mac).identifications, timeout=5)
        assert first[0].known and first[0].manufacturer == "Smarter"

        gw.ask("www.example.test", "127.0.0.95")  # a new lease, its MAC not yet known there
        eventually(lambda: "ip:127.0.0.95" in gw.gateway.tracker.devices)
        gw.dhcp(mac, "127.0.0.95", "kettle")
        eventually(lambda: "ip:127.0.0.95" not in {d.mac for d in list_devices(gw.store)})
        # past the end of any window the merge could have opened, and one more flush
        eventually(lambda: not gw.gateway._window_due and not gw.gateway._pending_identities, timeout=5)
        written = gw.gateway.tracker._generation
        eventually(lambda: gw.gateway.tracker.written > written)
        detail = get_device(gw.store, mac)
        assert [(i.known, i.device_type) for i in detail.identifications] == [(True, first[0].device_type)]
        assert detail.device.known and detail.device.manufacturer == "Smarter"
        assert not recent_alerts(gw.store, kind="unknown_device", mac=mac)


def test_a_refused_row_at_shutdown_costs_only_its_device_not_the_query_log(tmp_path):
    """The final write at shutdown had none of the flush loop's handling: one row the database refused raised out
    of stop(), so the other devices' changes and the queries still buffered for the query log were never written
    (and the daemon exited with a traceback)."""
    from sqlalchemy import text

    from gateway.events import DhcpSeen, DnsQuery

    good, refused = "02:aa:bb:cc:dd:1a", "02:aa:bb:cc:dd:1b"
    cfg = Config()
    cfg.gateway.state_dir = str(tmp_path / "state")
    cfg.dns.listen = []
    cfg.capture.sniff = False
    cfg.store.flush_interval_s = 3600  # nothing is written before the stop
    store = Store(cfg.db_url)
    with store.transaction() as s:
        s.execute(text(f"CREATE TRIGGER refuse BEFORE INSERT ON devices WHEN NEW.mac = '{refused}' "
                       "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
    gw = Gateway(cfg, store)

    async def run() -> None:
        await gw.start()
        now = time.time()
        gw.ingest([DhcpSeen(now, good, "10.0.0.26", hostname="good-name"),
                   DhcpSeen(now, refused, "10.0.0.27", hostname="refused-name"),
                   DnsQuery(now, "10.0.0.26", good, "good.example.test", 1, "example.test"),
                   DnsQuery(now, "10.0.0.27", refused, "refused.example.test", 1, "example.test")])
        await gw.stop()

    asyncio.run(run())
    assert get_device(store, good).device.name == "good-name"
    assert refused not in {d.mac for d in list_devices(store)}
    assert {q.qname for q in recent(store)} == {"good.example.test", "refused.example.test"}


def test_a_device_deleted_in_the_web_ui_is_forgotten_and_comes_back_as_new(tmp_path, upstream):
    from gateway.alerts import recent_alerts
    from gateway.devices.service import forget, set_status

    mac = "02:aa:bb:cc:dd:06"
    with RunningGateway(tmp_path, upstream) as gw:
        gw.dhcp(mac, "127.0.0.71", "old-name")
        first = eventually(lambda: get_device(gw.store, mac)).device.first_seen
        set_status(gw.store, mac, "approved", by="api", publish=False)
        time.sleep(0.05)
        forget(gw.store, mac)  # what the web UI's delete button calls
        eventually(lambda: mac not in gw.gateway.tracker.devices)
        assert gw.gateway.tracker.mac_for("127.0.0.71") is None  # its addresses went with it
        gw.ask("www.example.test", "127.0.0.71")
        time.sleep(4 * gw.cfg.store.flush_interval_s)
        assert mac not in {d.mac for d in list_devices(gw.store)}  # not written back by a stale tracker

        gw.dhcp(mac, "127.0.0.71", "new-name")  # re-detection: a genuinely new device
        detail = eventually(lambda: get_device(gw.store, mac))
        assert detail.device.status == "new" and detail.device.first_seen > first
        assert {n.name for n in detail.names} == {"new-name"}
        eventually(lambda: [a.mac for a in recent_alerts(gw.store, kind="new_device")].count(mac) == 2)


def test_a_name_the_owner_cleared_is_not_written_back_by_the_daemon(tmp_path, upstream):
    """The daemon loaded the owner's name at start and wrote it back at its next flush after the owner cleared it
    in the web UI: the device is called what it calls itself again, not what the owner no longer wants."""
    from gateway.devices.service import rename

    mac = "02:aa:bb:cc:dd:31"
    with RunningGateway(tmp_path, upstream) as gw:
        gw.dhcp(mac, "127.0.0.131", "esp-1234")
        eventually(lambda: get_device(gw.store, mac))
        rename(gw.store, mac, "Kitchen cam")
    with RunningGateway(tmp_path, upstream) as gw:  # a restart: the owner's name is in the store it loads
        rename(gw.store, mac, "")  # what the web UI's rename with an empty name calls
        asked = time.time()
        gw.ask("www.example.test", "127.0.0.131")  # the device is seen again: the flush writes its row
        device = eventually(lambda: (d := get_device(gw.store, mac).device).last_seen >= asked and d)
        assert (device.name, device.name_source) == ("esp-1234", "dhcp")
        assert "Kitchen cam" in {n.name for n in get_device(gw.store, mac).names}  # the history keeps it


def test_a_deleted_device_is_not_marked_present_again_by_its_events_still_queued_for_the_alert_thread(
        tmp_path, upstream):
    """The alert thread waits on the database (another writer holds its lock) while a device's packets queue up
    behind it; the owner deletes the device meanwhile. Its removal reached presence at once, and the packets queued
    before it then marked it present again: ten minutes later came a device_offline alert for a deleted device."""
    import sqlite3

    from sqlalchemy import delete

    from gateway.alerts import recent_alerts
    from gateway.events import DhcpSeen
    from gateway.store.schema import Address, Device, DeviceName, DhcpFingerprint

    mac, stall, marker = "02:aa:bb:cc:dd:10", "02:aa:bb:cc:dd:11", "02:aa:bb:cc:dd:12"
    with RunningGateway(tmp_path, upstream) as gw:
        tracker = gw.gateway.tracker
        gw.dhcp(mac, "127.0.0.96", "cam")
        eventually(lambda: mac in tracker.devices and tracker.devices[mac].stored is not None
                   and tracker.devices[mac].stored <= tracker.written)
        # deleted as the web UI does, but unnoticed until the policy file below moves
        with gw.store.transaction() as s:
            for table in (Address, DeviceName, DhcpFingerprint):
                s.execute(delete(table).where(table.mac == mac))
            s.execute(delete(Device).where(Device.mac == mac))
        lock = sqlite3.connect(tmp_path / "state" / "iotgw.sqlite", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            gw.dhcp(stall, "127.0.0.97", "stall")  # its new_device alert waits for the lock, and the feed behind it
            later = time.time()  # before the marker's: idle no shorter than it
            gw.gateway.ingest([DhcpSeen(later, mac, "127.0.0.96", hostname="cam")])
            eventually(lambda: tracker.devices[mac].last_seen == later)  # handled: queued for the alert thread
            save_policy(gw.cfg.state_dir, load_policy(gw.cfg.state_dir))
            eventually(lambda: mac not in tracker.devices)  # the delete is noticed
            gw.dhcp(marker, "127.0.0.98", "marker")
        finally:
            lock.execute("COMMIT")
            lock.close()
        eventually(lambda: recent_alerts(gw.store, kind="new_device", mac=marker), timeout=30)
        gw.gateway.alerts.presence.idle_timeout_s = 1.0
        eventually(lambda: recent_alerts(gw.store, kind="device_offline", mac=marker))
        assert not recent_alerts(gw.store, kind="device_offline", mac=mac)
        assert not gw.gateway.alerts.presence.is_online(mac)


def test_a_row_the_database_refuses_loses_only_its_own_devices_changes(tmp_path, upstream):
    from sqlalchemy import text

    good, refused = "02:aa:bb:cc:dd:0a", "02:aa:bb:cc:dd:0b"
    with RunningGateway(tmp_path, upstream) as gw:
        with gw.store.transaction() as s:  # a refusal that is no full disk (an IntegrityError, not Operational)
            s.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON device_names WHEN NEW.name = 'refused-name' "
                           "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
        frames = []
        for mac, ip, name in ((good, "127.0.0.81", "good-name"), (refused, "127.0.0.82", "refused-name")):
            frames.append(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                          / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")))
                          / DHCP(options=[("message-type", "request"), ("requested_addr", ip),
                                          ("hostname", name.encode()), "end"]))
        # one ingest: both devices are in the same flush
        gw.gateway.ingest([e for frame in frames for e in parse_frame(bytes(frame), time.time())])
        detail = eventually(lambda: get_device(gw.store, good))
        assert [n.name for n in detail.names] == ["good-name"] and [a.ip for a in detail.addresses] == ["127.0.0.81"]
        eventually(lambda: get_device(gw.store, refused))  # its device row is written, its refused name dropped
        assert get_device(gw.store, refused).names == []
        assert gw.gateway.counters.get("flush_errors") >= 1
        gw.ask("www.example.test", "127.0.0.81")
        gw.ask("www.example.test", "127.0.0.82")
        eventually(lambda: len(recent(gw.store, mac=refused)) == 1)
        # neither was taken for deleted by the owner
        assert {good, refused} <= set(gw.gateway.tracker.devices)
        assert {good, refused} <= {d.mac for d in list_devices(gw.store)}


def test_a_device_deleted_between_flushes_is_not_written_back(tmp_path):
    """The race the refresh loop cannot close alone: traffic after the delete, flushed before it is noticed."""
    from gateway.devices.service import forget
    from gateway.devices.tracker import DeviceTracker
    from gateway.events import AddressSeen, DhcpSeen

    mac = "02:aa:bb:cc:dd:07"
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    tracker = DeviceTracker(store)

    def seen(ts: float) -> list[str]:
        changes = tracker.observe(DhcpSeen(ts, mac, "10.0.0.7", hostname="cam"))
        changes += tracker.observe(AddressSeen(ts, mac, "10.0.0.7", "dhcp"))
        return [c.kind for c in changes]

    assert seen(1.0) == ["new_device", "renamed"]
    tracker.flush()
    forget(store, mac)
    assert seen(2.0) == []  # the delete is not noticed yet
    tracker.flush()
    assert list_devices(store) == []
    assert mac not in tracker.devices and tracker.mac_for("10.0.0.7") is None
    assert seen(3.0) == ["new_device", "renamed"]
    tracker.flush()
    assert get_device(store, mac).device.first_seen == 3.0


def test_an_address_keyed_device_is_merged_into_its_mac_after_a_restart(tmp_path):
    from gateway.devices.tracker import DeviceTracker
    from gateway.events import AddressSeen, DhcpSeen, DnsQuery

    mac = "02:aa:bb:cc:dd:09"
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    tracker = DeviceTracker(store)
    tracker.observe(DnsQuery(1.0, "10.0.0.9", None, "a.example.com", 1, "example.com"))
    tracker.flush()
    tracker = DeviceTracker(store)  # a restart: an ip: device has no addresses row to find it by
    changes = tracker.observe(DhcpSeen(2.0, mac, "10.0.0.9", hostname="cam"))
    changes += tracker.observe(AddressSeen(2.0, mac, "10.0.0.9", "dhcp"))
    tracker.flush()
    assert ("merged", mac, "ip:10.0.0.9") in [(c.kind, c.key, c.old_key) for c in changes]
    assert [d.mac for d in list_devices(store)] == [mac]
    assert get_device(store, mac).device.first_seen == 1.0


def test_dhcp_renewals_without_vendor_class_store_their_fingerprint_once(tmp_path):
    """NULLs never match a UNIQUE constraint: the tracker itself must know the fingerprints it stored."""
    from gateway.devices.tracker import DeviceTracker
    from gateway.events import DhcpSeen

    mac = "02:aa:bb:cc:dd:08"
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    renewal = DhcpSeen(1.0, mac, "10.0.0.8", hostname=None, param_list=(1, 3, 6, 15), vendor_class=None)
    tracker = DeviceTracker(store)
    for day in range(3):
        tracker.observe(replace(renewal, ts=1.0 + day * 86400))
        tracker.flush()
    tracker = DeviceTracker(store)  # a restart
    tracker.observe(replace(renewal, ts=4 * 86400))
    tracker.observe(replace(renewal, ts=4 * 86400, hostname="esp_1234"))  # a new fingerprint is still stored
    tracker.flush()
    assert sorted((f.param_list, f.hostname or "") for f in get_device(store, mac).fingerprints) == [
        ("1,3,6,15", ""), ("1,3,6,15", "esp_1234")]


def test_a_name_used_again_after_another_is_the_newest_after_a_restart_and_when_the_owner_clears_theirs(tmp_path):
    """A device named A, then B, then A again is called A; but A's row kept the last_seen of its first use, so
    clearing the owner's name (which picks the latest of the device's own names) called it B."""
    from gateway.devices.service import rename
    from gateway.devices.tracker import DeviceTracker
    from gateway.events import DhcpSeen

    mac = "02:aa:bb:cc:dd:0a"
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    tracker = DeviceTracker(store)
    for ts, hostname in ((1.0, "plug-a"), (2.0, "plug-b"), (3.0, "plug-a")):
        tracker.observe(DhcpSeen(ts, mac, "10.0.0.10", hostname=hostname, param_list=(1, 3, 6), vendor_class=None))
        tracker.flush()
    assert get_device(store, mac).device.name == "plug-a"
    rename(store, mac, "Kitchen plug")
    rename(store, mac, "")
    assert (get_device(store, mac).device.name, get_device(store, mac).device.name_source) == ("plug-a", "dhcp")
    restarted = DeviceTracker(store).devices[mac]  # a restart: plug-a is still the newest of its own names
    assert [n for n in restarted.names if n[0] == "dhcp"][-1] == ("dhcp", "plug-a")


def test_repeated_mdns_announcements_wait_once_while_the_store_refuses_writes(tmp_path):
    """A device announces the same mDNS services every few minutes. Each announcement queued a row, and while
    the store refused the batch (a full disk: the daemon takes it back for the next flush) they piled up in
    memory without bound. Now a service waits once, is stored once, and after a restart is not queued again."""
    from gateway.devices.tracker import DeviceTracker
    from gateway.events import MdnsSeen

    mac = "02:aa:bb:cc:dd:09"
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    announce = MdnsSeen(1.0, mac, "10.0.0.9", names=("speaker.local",), services=("_googlecast._tcp.local",
                                                                                     "_spotify-connect._tcp.local"))
    tracker = DeviceTracker(store)
    for outage_flush in range(5):
        for n in range(200):
            tracker.observe(replace(announce, ts=1.0 + outage_flush * 2 + n / 100))
        batch = tracker.take()
        tracker.restore(batch)  # what the daemon does with a batch the store refused
        assert len(batch.services) == 2
    tracker.flush()
    assert sorted(m.service for m in get_device(store, mac).services) == [
        "_googlecast._tcp.local", "_spotify-connect._tcp.local"]
    tracker = DeviceTracker(store)  # a restart
    tracker.observe(replace(announce, ts=100.0, services=(*announce.services, "_airplay._tcp.local")))
    assert [row["service"] for row in tracker.take().services] == ["_airplay._tcp.local"]


def test_a_quiet_device_window_closes_on_time_and_its_identification_concludes(tmp_path, upstream, monkeypatch):
    import gateway.daemon
    from gateway.alerts import recent_alerts
    from gateway.store.schema import Identification, ObservationWindow

    monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)
    mac = "02:aa:bb:cc:dd:08"
    with RunningGateway(tmp_path, upstream) as gw:
        assert gw.gateway.identifier is not None, "the shipped model bundle loads"
        gw.dhcp(mac, "127.0.0.81", "thing")  # one packet, then silence: no later packet closes the window
        gw.ask("www.example.test", "127.0.0.81")
        alert = eventually(lambda: recent_alerts(gw.store, kind="unknown_device", mac=mac), timeout=5)[0]
        assert alert.data["decided_after_s"] is None  # concluded at the window's end, never decided
        assert mac not in gw.gateway._sessions and mac not in gw.gateway._windows

        def stored():
            with gw.store.session() as s:
                idents = s.query(Identification).filter_by(mac=mac).all()
                window = s.get(ObservationWindow, mac)
                assert len(idents) == 1 and window is not None
                return idents[0], window
        ident, window = eventually(stored)
        assert not ident.known and ident.device_type == "unknown" and ident.alternatives
        assert {o["kind"] for o in window.observations} >= {"dhcp", "dns"}
        assert get_device(gw.store, mac).device.device_type == "unknown"


def test_a_known_product_never_sure_of_its_model_concludes_as_its_best_guess_not_unknown(tmp_path, upstream,
                                                                                           monkeypatch):
    """A Smarter kettle from a production run the model never saw: iKettle2 and SmarterCoffee send the same first
    minute, so the type never reaches the bar to commit, yet the maker is plain. At the window's end it is
    named, as ``iotgw identify`` names it (known, ``decided_after_s`` None), not called an unknown device."""
    import gateway.daemon
    from gateway.alerts import recent_alerts

    monkeypatch.setattr(gateway.daemon, "WINDOW_S", 1.0)
    mac = "5c:cf:7f:99:a0:01"
    with RunningGateway(tmp_path, upstream) as gw:
        kettle_asks_for_a_lease(gw, mac, "127.0.0.82")
        alert = eventually(lambda: recent_alerts(gw.store, kind="device_identified", mac=mac), timeout=5)[0]
        assert alert.data["manufacturer"] == "Smarter" and alert.data["decided_after_s"] is None
        assert alert.data["device_type"] in ("iKettle2", "SmarterCoffee") and alert.data["confidence"] < 0.9
        assert not recent_alerts(gw.store, kind="unknown_device", mac=mac)
        def stored():
            detail = get_device(gw.store, mac)
            assert detail.identifications
            return detail.device, detail.identifications[0]
        device, ident = eventually(stored)
        assert ident.known and ident.device_type == alert.data["device_type"] and ident.decided_after_s is None
        assert device.known and device.device_type == ident.device_type and device.decided_after_s is None


def test_a_model_installed_by_federated_retraining_is_picked_up_without_a_restart(tmp_path, upstream):
    shipped = Bundle.load()
    with RunningGateway(tmp_path, upstream) as gw:
        assert gw.gateway.identifier.bundle.version == shipped.version
        installed = gw.cfg.federation_dir / "model" / "current"
        installed.parent.mkdir(parents=True)
        (installed.parent / "broken").mkdir()
        (installed.parent / "broken" / "bundle.json").write_text("{")
        os.symlink(installed.parent / "broken", installed)  # a damaged install: the running model goes on
        time.sleep(1.5)
        assert gw.gateway.identifier.bundle.version == shipped.version
        # what ModelStore.install does: a complete bundle beside the link, then a new link renamed over it
        replace(shipped, version="federated-r7").save(installed.parent / "bundle-r7")
        os.symlink("bundle-r7", installed.parent / ".current.tmp")
        os.replace(installed.parent / ".current.tmp", installed)
        deadline = time.monotonic() + 5
        while gw.gateway.identifier.bundle.version != "federated-r7":
            assert time.monotonic() < deadline, "the installed model was never loaded"
            time.sleep(0.1)
        # Devices met from now on are identified by it.
        gw.ask("fresh.example.test", "127.0.0.77")
        deadline = time.monotonic() + 5
        while "ip:127.0.0.77" not in gw.gateway._sessions:
            assert time.monotonic() < deadline, "no identification session for a new device"
            time.sleep(0.1)
        assert gw.gateway._sessions["ip:127.0.0.77"].ident.bundle.version == "federated-r7"


def test_a_confirmed_device_names_its_production_block_for_the_next_unit(tmp_path, upstream):
    from gateway.devices.service import label

    first, second = "5c:cf:7f:99:90:01", "5c:cf:7f:99:90:02"  # one production run, unknown to the bundle
    with RunningGateway(tmp_path, upstream) as gw:
        assert gw.gateway.identifier.block_prior(second) is None
        gw.dhcp(first, "127.0.0.62", "ESP_999001")
        eventually(lambda: any(d.mac == first for d in list_devices(gw.store)))
        label(gw.store, first, manufacturer="Smarter", device_type="SmarterCoffee", category="appliance")
        eventually(lambda: gw.gateway.identifier.block_prior(second) is not None)
        prior = gw.gateway.identifier.block_prior(second)
        types = gw.gateway.identifier.labels["device_type"]
        assert types[int(prior.argmax())] == "SmarterCoffee"
    with RunningGateway(tmp_path, upstream) as gw:  # after a restart, from the store
        assert gw.gateway.identifier.block_prior(second) is not None


def test_a_device_sending_new_names_every_packet_keeps_only_the_newest_of_each_kind(tmp_path, caplog):
    """A device (or a LAN host) announcing a new mDNS name, service, DHCP hostname and address in every packet
    grew the tracker's memory and the database without bound. Now each kind keeps its newest HISTORY_ROWS, in
    memory and in the store, said once in the log; the DHCP hostname outlives the mDNS flood, and a restart keeps
    the bound."""
    from scapy.layers.dns import DNS, DNSRR
    from sqlalchemy import func, select

    from gateway.capture.frames import Senders
    from gateway.devices.tracker import HISTORY_ROWS, DeviceTracker
    from gateway.store.schema import Address, DeviceName, DhcpFingerprint, MdnsService

    mac = "02:aa:bb:cc:dd:41"
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")

    def announce(i: int) -> bytes:
        return bytes(Ether(src=mac, dst="01:00:5e:00:00:fb") / IP(src=f"10.0.{i // 250}.{i % 250 + 1}",
                                                                  dst="224.0.0.251")
                     / UDP(sport=5353, dport=5353)
                     / DNS(qr=1, aa=1, qd=None, an=[DNSRR(rrname=f"host-{i}.local", type="A", rdata="10.0.0.2"),
                                                    DNSRR(rrname=f"_s{i}._tcp.local", type="PTR",
                                                          rdata=f"i{i}._s{i}._tcp.local")]))

    def lease(hostname: str, extra: int) -> bytes:
        return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                     / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex(mac.replace(":", "")))
                     / DHCP(options=[("message-type", "request"), ("requested_addr", "10.9.0.1"),
                                     ("hostname", hostname.encode()), ("param_req_list", [1, 3, 6, extra]), "end"]))

    def rows() -> dict[str, int]:
        with store.session() as s:
            return {t.__tablename__: s.scalar(select(func.count()).select_from(t).where(t.mac == mac))
                    for t in (DeviceName, MdnsService, DhcpFingerprint, Address)}

    def stored_names() -> set[tuple[str, str]]:
        with store.session() as s:
            return set(s.execute(select(DeviceName.source, DeviceName.name).where(DeviceName.mac == mac)))

    tracker, senders = DeviceTracker(store), Senders()
    flood = 3 * HISTORY_ROWS
    frames = [lease("esp-1234", 0)] + [announce(i) for i in range(flood)] + [lease(f"dh-{i}", i % 250 + 1)
                                                                           for i in range(flood)]
    for n, frame in enumerate(frames):
        events = senders.first(frame, 1.0 + n) if frame[6:12] not in senders.known else []
        for event in events + parse_frame(frame, 1.0 + n):
            tracker.observe(event)
        if n % 97 == 0:
            tracker.flush()
    tracker.flush()
    # names: dhcp and mdns each bounded apart (the newest dhcp ones, esp-1234 long pushed out by dh-*)
    assert rows() == {"device_names": 2 * HISTORY_ROWS, "mdns_services": HISTORY_ROWS,
                      "dhcp_fingerprints": HISTORY_ROWS, "addresses": HISTORY_ROWS}
    dev = tracker.devices[mac]
    assert (len(dev.names), len(dev.services), len(dev.fingerprints), len(dev.addresses)) == (
        2 * HISTORY_ROWS, HISTORY_ROWS, HISTORY_ROWS, HISTORY_ROWS)
    assert len([ip for ip, key in tracker.ip_to_key.items() if key == mac]) == HISTORY_ROWS
    names = stored_names()
    assert names == set(dev.names)
    assert ("mdns", f"host-{flood - 1}") in names and ("mdns", "host-0") not in names
    assert get_device(store, mac).device.name == f"dh-{flood - 1}"
    assert tracker.counters.get("history_dropped") > 0
    assert len([r for r in caplog.records if "only the newest" in r.message]) == 1

    # The mDNS flood alone cannot push out the DHCP hostname, and a name dropped then sent again is kept.
    tracker.observe(parse_frame(lease("esp-1234", 0), 10_000.0)[0])
    for i in range(flood, 2 * flood):
        for event in parse_frame(announce(i), 10_001.0 + i):
            tracker.observe(event)
    tracker.observe(parse_frame(announce(0), 20_000.0)[0])  # host-0 again, long dropped
    tracker.flush()
    names = stored_names()
    assert ("dhcp", "esp-1234") in names and ("mdns", "host-0") in names
    assert names == set(tracker.devices[mac].names) == set(DeviceTracker(store).devices[mac].names)  # a restart
    assert rows() == {"device_names": 2 * HISTORY_ROWS, "mdns_services": HISTORY_ROWS,
                      "dhcp_fingerprints": HISTORY_ROWS, "addresses": HISTORY_ROWS}


def test_a_store_grown_before_the_history_bound_is_trimmed_at_the_first_flush(tmp_path):
    """A database written before the bound holds every name a device ever sent: the tracker loads only the newest
    and its first flush deletes the rest, keeping the owner's names and the device's current best name."""
    from sqlalchemy import func, select

    from gateway.devices.service import rename
    from gateway.devices.tracker import HISTORY_ROWS, DeviceTracker
    from gateway.store.schema import Device, DeviceName, MdnsService

    mac = "02:aa:bb:cc:dd:42"
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with store.transaction() as s:
        s.add(Device(mac=mac, first_seen=1.0, last_seen=1.0, name="cam-1", name_source="dhcp"))
        s.flush()
        s.add(DeviceName(mac=mac, name="cam-1", source="dhcp", first_seen=1.0, last_seen=1.0))
        for i in range(3 * HISTORY_ROWS):
            s.add(DeviceName(mac=mac, name=f"m{i}", source="mdns", first_seen=2.0 + i, last_seen=2.0 + i))
            s.add(MdnsService(mac=mac, service=f"_s{i}._tcp.local", first_seen=2.0 + i))
    rename(store, mac, "Porch camera")
    tracker = DeviceTracker(store)
    assert len(tracker.devices[mac].names) == HISTORY_ROWS + 2 and len(tracker.devices[mac].services) == HISTORY_ROWS
    tracker.flush()
    with store.session() as s:
        names = set(s.execute(select(DeviceName.source, DeviceName.name).where(DeviceName.mac == mac)))
        services = s.scalar(select(func.count()).select_from(MdnsService).where(MdnsService.mac == mac))
    assert names == set(tracker.devices[mac].names)
    assert {("dhcp", "cam-1"), ("user", "Porch camera"), ("mdns", f"m{3 * HISTORY_ROWS - 1}")} <= names
    assert ("mdns", "m0") not in names and services == HISTORY_ROWS
    assert (tracker.devices[mac].name, tracker.devices[mac].name_source) == ("cam-1", "dhcp")


def test_dns_clients_past_devices_max_make_room_from_stale_untouched_devices_then_are_answered_but_not_kept(
        tmp_path, upstream, caplog):
    from gateway.alerts.outbox import recent_alerts
    from gateway.overview import summary
    from gateway.policies import set_quarantine
    from gateway.store.schema import Address, Device, ObservationWindow

    now = time.time()
    seed = Store(f"sqlite:///{tmp_path / 'state' / 'iotgw.sqlite'}")
    with seed.transaction() as s:
        # a day and more unseen: the untouched one may go; the approved one and the recent one stay
        s.add(Device(mac="ip:192.0.2.1", first_seen=now - 9e5, last_seen=now - 2e5, status="new"))
        s.add(ObservationWindow(mac="ip:192.0.2.1", started_at=now - 9e5, observations=[]))
        s.add(Device(mac="ip:192.0.2.2", first_seen=now - 9e5, last_seen=now - 3e5, status="approved"))
        s.add(Device(mac="ip:192.0.2.3", first_seen=now - 9e5, last_seen=now - 3600, status="new"))
        s.add(Device(mac="02:aa:bb:cc:dd:70", first_seen=now - 9e5, last_seen=now - 2e5, status="new"))
        s.flush()
        s.add(Address(ip="127.0.0.70", mac="02:aa:bb:cc:dd:70", source="dhcp", first_seen=now, last_seen=now))
    seed.close()
    set_quarantine(tmp_path / "state", True, ["www.example.test"])
    with RunningGateway(tmp_path, upstream) as gw:
        tracker = gw.gateway.tracker
        tracker.max_devices = 6
        clients = [f"127.0.0.{50 + i}" for i in range(6)]
        for ip in clients:  # the first two fill the room there is, the next two take the stale untouched ones'
            assert answers(gw.ask("www.example.test", ip)) == {"192.0.2.10"}
        # the last two find none to make room: answered, under quarantine as any new device, but not kept
        for ip in clients[4:] * 2:
            assert answers(gw.ask("www.example.test", ip)) == {"192.0.2.10"}
            assert answers(gw.ask("other.example.test", ip)) == {"0.0.0.0"}  # not on the quarantine allow list
        eventually(lambda: len(recent(gw.store, mac="ip:127.0.0.55")) == 5)  # logged under their address

        kept = {"ip:192.0.2.2", "ip:192.0.2.3", *(f"ip:{ip}" for ip in clients[:4])}
        assert set(tracker.devices) == kept
        eventually(lambda: {d.mac for d in list_devices(gw.store)} == kept)
        with gw.store.session() as s:  # their rows went with them
            assert s.get(ObservationWindow, "ip:192.0.2.1") is None and s.get(Address, "127.0.0.70") is None
        assert tracker.mac_for("127.0.0.70") is None
        counters = gw.gateway.counters
        assert (counters.get("devices_evicted"), counters.get("devices_untracked")) == (2, 2)  # each once
        eventually(lambda: summary(gw.store).untracked == 2)  # on the dashboard and in /api/v1/summary
        alerts = eventually(lambda: recent_alerts(gw.store, kind="too_many_devices"))
        assert [(a.mac, a.data) for a in alerts] == [
            (None, {"max": 6, "message": "too many devices: possible MAC flood"})]
    said = [r for r in caplog.records if "too many devices" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"


@contextlib.contextmanager
def _evicted_stale_device(tmp_path, upstream) -> Iterator[tuple[RunningGateway, str, float]]:
    """A running daemon whose one stored device (unseen for two days, untouched, its DHCP name stored) was just
    forgotten in memory to make room for a new device, its rows not yet deleted: nothing is written before the
    test calls ``flush``. Yields the daemon, the stale device and its first_seen."""
    from gateway.store.schema import Device, DeviceName

    now = time.time()
    stale, first_seen = "02:aa:bb:cc:dd:71", now - 9e5
    seed = Store(f"sqlite:///{tmp_path / 'state' / 'iotgw.sqlite'}")
    with seed.transaction() as s:
        s.add(Device(mac=stale, first_seen=first_seen, last_seen=now - 2e5, status="new"))
        s.flush()
        s.add(DeviceName(mac=stale, name="old-plug", source="dhcp", first_seen=first_seen, last_seen=first_seen))
    seed.close()
    gw = RunningGateway(tmp_path, upstream)
    gw.cfg.store.flush_interval_s = 3600  # written when the test says (and at the stop)
    with gw:
        tracker = gw.gateway.tracker
        tracker.max_devices = len(tracker.devices)
        gw.dhcp("02:aa:bb:cc:dd:72", "127.0.0.72", "newcomer")
        eventually(lambda: "02:aa:bb:cc:dd:72" in tracker.devices)
        assert stale not in tracker.devices and gw.gateway.counters.get("devices_evicted") == 1
        yield gw, stale, first_seen


def test_a_device_given_a_policy_of_its_own_while_it_is_evicted_keeps_its_rows(tmp_path, upstream):
    """Evicted in memory, then given a policy by the owner before the daemon reloaded policy.json: the store's
    delete knew nothing of policies and deleted the device and its rows, while its policy stayed for a device
    that was gone. The delete now reads policy.json and never deletes a device with a policy of its own."""
    from gateway.policies import load, set_device_mode
    from gateway.store.schema import Device, DeviceName

    with _evicted_stale_device(tmp_path, upstream) as (gw, stale, first_seen):
        set_device_mode(tmp_path / "state", stale, "paused")  # the owner, a moment after the eviction
        gw.flush()
        with gw.store.session() as s:
            row = s.get(Device, stale)
            assert row is not None and row.first_seen == first_seen
            assert s.query(DeviceName).filter_by(mac=stale).count() == 1
    assert load(tmp_path / "state").policies[f"device:{stale}"].paused


def test_an_evicted_device_the_owner_named_meanwhile_comes_back_as_itself_without_a_new_device_alert(
        tmp_path, upstream):
    """Evicted in memory, then named by the owner before the flush: the delete spared its rows, yet its next
    packet made it a new device again (a second new_device alert to MQTT and Home Assistant, a new observation
    window, first_seen lost in the daemon). It is now loaded back from the store, as at start."""
    from gateway.alerts.outbox import recent_alerts
    from gateway.devices.service import rename

    with _evicted_stale_device(tmp_path, upstream) as (gw, stale, first_seen):
        tracker = gw.gateway.tracker
        rename(gw.store, stale, "Hall lamp")
        gw.flush()
        tracker.max_devices = 10
        gw.dhcp(stale, "127.0.0.71", "old-plug")
        gw.dhcp("02:aa:bb:cc:dd:73", "127.0.0.73", "later")  # its alert is recorded after any the stale one raised
        eventually(lambda: recent_alerts(gw.store, kind="new_device", mac="02:aa:bb:cc:dd:73"))
        assert recent_alerts(gw.store, kind="new_device", mac=stale) == []
        dev = tracker.devices[stale]
        assert dev.first_seen == first_seen and ("dhcp", "old-plug") in dev.names and not dev.new
        assert stale not in gw.gateway._window_start  # no second identification
        assert tracker.mac_for("127.0.0.71") == stale
        gw.flush()
        device = get_device(gw.store, stale).device
        assert (device.first_seen, device.name, device.name_source) == (first_seen, "Hall lamp", "user")


def test_run_on_an_interface_that_is_not_there_says_so_naming_the_flag_or_key_and_starts_nothing(tmp_path):
    """The sniffer's bind failed with "[Errno 19] No such device" in a traceback, after the DNS server was up."""
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    config = tmp_path / "iotgw.toml"
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n[capture]\ninterface = "nosuch1"\n')
    for flags, said in ((["--interface", "nosuch0"], "--interface: no network interface 'nosuch0'"),
                        ([], f"{config}: capture.interface: no network interface 'nosuch1'")):
        proc = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(config), "--dns-listen",
                               f"127.0.0.1:{port}", *flags], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[1], stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr == f"iotgw: configuration error: {said} here (see `ip link`)\n"
    assert not (tmp_path / "state").exists()
