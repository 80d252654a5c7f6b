"""The store against a real PostgreSQL server: migrations, devices (tracker and the web UI's service functions)
and the query log. The test starts its own server (initdb + pg_ctl on a loopback port) and removes it after.

Needs PostgreSQL's server binaries (Debian ``postgresql``) and psycopg (the ``postgres`` extra); skips with the
reason when either is missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from gateway import accounts
from gateway.config import Config
from gateway.devices.service import forget, get_device, list_devices, rename, set_status
from gateway.devices.tracker import DeviceTracker
from gateway.events import AddressSeen, DhcpSeen, DnsQuery, MdnsSeen
from gateway.store.db import Store
from gateway.store.querylog import QueryLogWriter, counts_since, recent
from gateway.store.schema import ConfigBase, LoginDevice, Query, QueryLogBase
from tests.ports import free_port
from webui.app import create_app

psycopg = pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[postgres]')")

_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))


def _run_as_owner(cmd: list[str]) -> None:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` system user."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    if not _BIN:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    bindir = Path(_BIN[-1])
    if os.geteuid() == 0:
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    # Not pytest's tmp_path: its parent is private to root, and the server runs as 'postgres'.
    data = Path(tempfile.mkdtemp(prefix="iotgw-pg-"))
    if os.geteuid() == 0:
        os.chown(data, owner.pw_uid, owner.pw_gid)
    port = free_port(kind=socket.SOCK_STREAM)
    started = False
    try:
        _run_as_owner([str(bindir / "initdb"), "-D", str(data / "db"), "-U", "iotgw", "--auth=trust", "-E", "UTF8",
                       "--no-sync"])
        _run_as_owner([str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w",
                       "-t", "60", "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off",
                       "start"])
        started = True
        with psycopg.connect(f"host=127.0.0.1 port={port} user=iotgw dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE iotgw")
        yield f"postgresql://iotgw@127.0.0.1:{port}/iotgw"  # the psycopg driver is implied
    finally:
        if started:
            _run_as_owner([str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop"])
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def store(pg_url: str) -> Iterator[Store]:
    store = Store(pg_url)
    yield store
    store.close()


def test_migrations_build_the_models_schema_and_run_twice(store):
    assert store.engine.dialect.name == "postgresql"
    store.migrate()  # a second time: nothing to do, nothing fails
    with store.engine.connect() as conn:  # one database holds both (querylog_url: a server URL is shared)
        diff = compare_metadata(MigrationContext.configure(conn), [ConfigBase.metadata, QueryLogBase.metadata])
    assert diff == [], f"the migrations and the models differ on PostgreSQL: {diff}"


def test_devices_tracked_merged_renamed_and_forgotten(store):
    mac = "02:aa:00:00:00:01"
    tracker = DeviceTracker(store)
    # A client first known only by its address, then its DHCP request shows the MAC: one device.
    tracker.observe(DnsQuery(1.0, "10.9.0.7", None, "a.example.com", 1, "example.com"))
    tracker.flush()
    assert [d.mac for d in list_devices(store)] == ["ip:10.9.0.7"]
    for event in (DhcpSeen(2.0, mac, "10.9.0.7", hostname="cam", param_list=(1, 3, 6), vendor_class="udhcp"),
                  AddressSeen(2.0, mac, "10.9.0.7", "dhcp"),
                  MdnsSeen(3.0, mac, "10.9.0.7", names=("cam.local",), services=("_hap._tcp.local",)),
                  DhcpSeen(4.0, mac, "10.9.0.7", hostname="cam", param_list=(1, 3, 6), vendor_class="udhcp")):
        tracker.observe(event)
    tracker.flush()
    tracker.observe(MdnsSeen(5.0, mac, "10.9.0.7", names=("cam.local",), services=("_hap._tcp.local",)))
    tracker.flush()  # the same service again: the unique constraint skips it (ON CONFLICT DO NOTHING)

    detail = get_device(store, mac)
    assert [d.mac for d in list_devices(store)] == [mac]
    assert (detail.device.first_seen, detail.device.last_seen) == (1.0, 5.0)
    assert (detail.device.name, detail.device.name_source) == ("cam", "dhcp")
    assert [a.ip for a in detail.addresses] == ["10.9.0.7"]
    assert {(n.source, n.name) for n in detail.names} == {("dhcp", "cam"), ("mdns", "cam")}
    assert [s.service for s in detail.services] == ["_hap._tcp.local"]
    assert detail.fingerprints and detail.fingerprints[0].param_list == "1,3,6"

    rename(store, mac, "Front door")
    set_status(store, mac, "approved", by="api", publish=False)
    assert list_devices(store, search="front")[0].status == "approved"
    tracker.observe(DhcpSeen(6.0, mac, "10.9.0.7", hostname="other"))
    tracker.flush()
    assert get_device(store, mac).device.name == "Front door"  # the owner's name wins over DHCP

    forget(store, mac)
    tracker.observe(DhcpSeen(7.0, mac, "10.9.0.7", hostname="cam"))
    tracker.flush()  # the tracker had not heard of the delete: it must not write the device back
    assert list_devices(store) == []
    assert store.bump_revision("devices_revision") >= 2


@pytest.mark.parametrize("options", [
    [("param_req_list", list(range(100, 200)))],  # legal, and 400 characters as "100,101,..."
    [("hostname", b"cam\x00era"), ("vendor_class_id", b"udhcp\x001.2")],  # PostgreSQL refuses NUL in text
    [("hostname", b"h" * 150), ("hostname", b"h" * 150)],  # RFC 3396: a 300-byte name in two option 12s
], ids=["long-param-list", "nul", "split-hostname"])
def test_a_hostile_dhcp_request_loses_no_other_devices_changes(store, options):
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    from gateway.capture.frames import parse_frame

    ordinary, hostile = "02:aa:00:00:03:01", "02:aa:00:00:03:02"
    frame = bytes(Ether(src=hostile, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                  / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex(hostile.replace(":", "")))
                  / DHCP(options=[("message-type", "request"), *options, "end"]))
    tracker = DeviceTracker(store)
    tracker.observe(DnsQuery(1.0, "10.9.3.1", ordinary, "www.example.com", 1, "example.com"))
    for event in parse_frame(frame, 2.0):
        tracker.observe(event)
    tracker.flush()
    assert {ordinary, hostile} <= {d.mac for d in list_devices(store)}
    (fingerprint,) = get_device(store, hostile).fingerprints
    assert all(len(v or "") <= 255 and "\x00" not in (v or "")
               for v in (fingerprint.hostname, fingerprint.param_list, fingerprint.vendor_class))
    tracker.observe(DnsQuery(60.0, "10.9.3.1", ordinary, "www.example.com", 1, "example.com"))
    assert tracker.write(tracker.take()) == set()  # nobody is taken for deleted by the owner
    forget(store, ordinary)
    forget(store, hostile)


def test_a_device_flooding_names_keeps_only_the_newest_of_each_kind_on_postgresql(store):
    """The tracker's bound trims with a window function and refreshes a dropped row seen again with ON CONFLICT DO
    UPDATE: both on PostgreSQL too, with a batch the store refused and then took carrying a name twice."""
    from gateway.devices.tracker import HISTORY_ROWS
    from gateway.store.schema import Address, DeviceName, DhcpFingerprint, MdnsService

    mac = "02:aa:00:00:00:41"
    tracker = DeviceTracker(store)
    for i in range(2 * HISTORY_ROWS):
        ip = f"10.41.{i // 250}.{i % 250 + 1}"
        for event in (MdnsSeen(1.0 + i, mac, ip, names=(f"h{i}.local",), services=(f"_s{i}._tcp.local",)),
                      DhcpSeen(1.0 + i, mac, ip, hostname=f"d{i}", param_list=(1, 3, i % 250)),
                      AddressSeen(1.0 + i, mac, ip, "packet")):
            tracker.observe(event)
    batch = tracker.take()
    tracker.restore(batch)  # refused: carried again by the next take, with what came since
    tracker.observe(MdnsSeen(1000.0, mac, None, names=("h0.local",), services=()))  # dropped, and again
    tracker.flush()
    with store.session() as s:
        counts = {t.__tablename__: s.scalar(select(func.count()).select_from(t).where(t.mac == mac))
                  for t in (DeviceName, MdnsService, DhcpFingerprint, Address)}
        names = set(s.execute(select(DeviceName.source, DeviceName.name).where(DeviceName.mac == mac)))
    assert counts == {"device_names": 2 * HISTORY_ROWS, "mdns_services": HISTORY_ROWS,
                      "dhcp_fingerprints": HISTORY_ROWS, "addresses": HISTORY_ROWS}
    assert names == set(tracker.devices[mac].names) and ("mdns", "h0") in names


def test_query_log_written_read_counted_and_pruned(store):
    writer = QueryLogWriter(store, days=1, max_rows=30)
    now = time.time()
    mac = "02:aa:00:00:00:02"
    writer.add(DnsQuery(now - 2 * 86400 if i < 5 else now - 60 + i, "10.9.0.8", mac, f"n{i}.example.com", 1,
                        "example.com", 0, 1.5, "blocked" if i % 10 == 0 else "allowed", None, "server")
               for i in range(40))
    assert writer.flush() == 40
    rows = recent(store, mac=mac, limit=5)
    assert [r.qname for r in rows] == [f"n{i}.example.com" for i in range(39, 34, -1)]
    assert (rows[0].latency_ms, rows[0].verdict, rows[0].source) == (1.5, "allowed", "server")
    assert recent(store, search="n3", verdict="blocked")[0].qname == "n30.example.com"
    assert counts_since(store, now - 3600)[mac] == (35, 3)
    assert writer.prune(now) == 10  # 5 older than a day, then the oldest beyond 30 rows
    with store.querylog_session() as s:
        assert s.scalar(select(func.count()).select_from(Query)) == 30


def test_a_long_or_refused_query_name_loses_only_its_own_row(store):
    mac = "02:aa:00:00:00:07"
    long_name = "\\001" * 189 + ".example.com"  # dnslib spells each unprintable byte so
    names = ["before.example.com", long_name, "nul\x00.example.com", "after.example.com"]
    writer = QueryLogWriter(store)
    writer.add(DnsQuery(time.time(), "10.9.0.7", mac, name, 1, "example.com", rule="r" * 300, rule_words="w" * 1200)
               for name in names)
    assert writer.flush() == 3  # PostgreSQL refuses NUL in text: that row alone is dropped
    assert writer.rejected == 1
    writer.add([DnsQuery(time.time(), "10.9.0.7", mac, "later.example.com", 1, "example.com")])
    assert writer.flush() == 1  # the writer goes on
    rows = recent(store, mac=mac)
    assert [r.qname for r in rows] == ["later.example.com", "after.example.com", long_name[:255], "before.example.com"]
    assert (len(rows[1].rule), len(rows[1].rule_words)) == (255, 1000)


def test_alerts_two_processes_enqueue_reach_the_publisher_in_id_order(store):
    """The web UI's alert got its id first but commits after the daemon's: the publisher's cursor must not pass
    it. Writer A stands for the other process, mid-transaction after ``lock_order`` and its insert."""
    import threading

    from sqlalchemy import delete, insert

    from gateway.alerts.outbox import Outbox, lock_order
    from gateway.events import Alert
    from gateway.store.schema import OutboxMessage

    with store.transaction() as s:
        s.execute(delete(OutboxMessage))
    box = Outbox(store)
    with store.engine.connect() as conn:
        tx = conn.begin()
        lock_order(conn)
        conn.execute(insert(OutboxMessage.__table__),
                     {"ts": time.time(), "kind": "quarantine_entered", "mac": "02:00:00:00:00:01",
                      "data": {"by": "web"}})
        daemon = threading.Thread(target=box.put, args=(Alert("device_online", time.time(), "02:00:00:00:00:02",
                                                              {"offline_s": 5.0}),))
        daemon.start()
        daemon.join(1.0)
        # what the publisher sees meanwhile: nothing committed past the uncommitted row
        seen_meanwhile = [r.kind for r in box.pending(0, 10)]
        tx.commit()
    daemon.join(10)
    assert not daemon.is_alive()
    assert seen_meanwhile == []
    rows = box.pending(0, 10)
    assert [r.kind for r in rows] == ["quarantine_entered", "device_online"] and rows[0].id < rows[1].id


def test_device_cookies_on_postgresql_lock_out_the_cookie_renew_and_are_revoked_by_a_new_password(store):
    """The device-cookie rows on PostgreSQL: failures with a cookie lock it and not the address, a login renews it
    in place, and a new password revokes it."""
    from sqlalchemy import func, select

    from gateway.store.schema import LoginAddress, LoginDevice

    accounts.set_password(store, "correct horse battery")
    cookie = accounts.issue_device_cookie(store, "admin", now=100.0)
    for _ in range(accounts.MAX_FAILED_LOGINS):
        assert not accounts.verify_login(store, "admin", "typo", "192.168.1.10", device=cookie, now=200.0)
    with pytest.raises(accounts.LockedOut) as locked:
        accounts.verify_login(store, "admin", "correct horse battery", "192.168.1.10", device=cookie, now=201.0)
    assert locked.value.cause == "device"
    assert accounts.verify_login(store, "admin", "correct horse battery", "192.168.1.10", now=202.0)
    renewed = accounts.issue_device_cookie(store, "admin", replacing=cookie, now=203.0)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(LoginAddress)) == 0
        assert s.scalars(select(LoginDevice.cookie_sha256)).all() == [accounts._cookie_sha256(renewed)]
    accounts.set_password(store, "another long password")
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(LoginDevice)) == 0


def test_a_login_renewing_a_device_cookie_waits_while_a_failure_with_that_cookie_is_counted(store, monkeypatch):
    """Two tabs of one browser: one logs in (its new cookie replaces the old), the other types a wrong password
    with the old cookie at the same moment. The count of the old cookie's failures is kept under the account's
    row lock; the renewal deleted that row without the lock, under the counting login's feet, which then failed
    with a StaleDataError (a 500 on the login page) instead of saying the password was wrong."""
    accounts.set_password(store, "correct horse battery")
    cookie = accounts.issue_device_cookie(store, "admin")
    real = accounts._refuse_if_locked
    calls, renewal = [], {}

    def _lock_waits() -> int:
        with store.engine.connect() as conn:
            return conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                        ).scalar()

    def refuse_then_renew(user, known, row, now):  # noqa: ANN001, ANN202
        real(user, known, row, now)
        calls.append(known)
        if len(calls) == 2:  # the counting transaction, with the cookie's row loaded: the other tab's login ends
            thread = threading.Thread(target=lambda: renewal.update(
                cookie=accounts.issue_device_cookie(store, "admin", replacing=cookie)))
            renewal["thread"] = thread
            thread.start()
            while thread.is_alive() and not _lock_waits():  # until done, or waiting for this login's lock
                time.sleep(0.01)

    monkeypatch.setattr(accounts, "_refuse_if_locked", refuse_then_renew)
    assert accounts.verify_login(store, "admin", "typo", "192.168.1.10", device=cookie) is False
    renewal["thread"].join()
    assert calls[1] is not None  # the failure was the cookie's, counted against it
    with store.session() as s:
        assert s.scalars(select(LoginDevice.cookie_sha256)).all() == [accounts._cookie_sha256(renewal["cookie"])]


def test_a_nul_in_a_login_name_search_or_device_is_a_400_from_the_web_ui_not_a_500(store, tmp_path):
    cfg = Config()
    cfg.gateway.state_dir = str(tmp_path / "state")
    accounts.set_password(store, "correct horse battery")
    client = create_app(store, cfg).test_client()
    client.get("/login")
    with client.session_transaction() as session:
        csrf = session["csrf_token"]
    form = {"username": "ad\x00min", "password": "x", "csrf_token": csrf}
    assert client.post("/login", data=form).status_code == 400
    form = {"username": "admin", "password": "correct horse battery", "csrf_token": csrf}
    assert client.post("/login", data=form).status_code == 302
    for url in ("/api/v1/devices/%00", "/api/v1/devices?q=a%00", "/api/v1/queries?q=%00", "/api/v1/queries?mac=%00",
                "/devices?q=%00", "/devices/a%00b", "/queries?%00=x"):
        r = client.get(url)
        assert r.status_code == 400 and "NUL" in r.get_data(as_text=True), url
    assert client.get("/api/v1/devices?q=a").status_code == 200


def test_a_device_the_owner_names_while_it_is_evicted_keeps_its_rows_on_postgresql(store, pg_url):
    """Making room past [devices] max, the tracker checked that the chosen device was still untouched, then
    deleted it: a name the owner gave it in between (committed while the delete waited on the row) was deleted
    with it. The delete itself now says "untouched", which PostgreSQL checks again on the row it waited for."""
    import threading

    from sqlalchemy import select

    from gateway.events import DeviceSeen
    from gateway.store.schema import Device, DeviceName

    now = time.time()
    stale, newcomer = "02:ab:00:00:00:01", "02:ab:00:00:00:02"
    with store.transaction() as s:
        s.add(Device(mac=stale, first_seen=now - 9e5, last_seen=now - 2e5, status="new"))
        s.flush()
        s.add(DeviceName(mac=stale, name="cam", source="dhcp", first_seen=now - 9e5, last_seen=now - 9e5))
    tracker = DeviceTracker(store, max_devices=0)
    tracker.max_devices = len(tracker.devices)
    tracker.keep(set(tracker.devices) - {stale})  # the other tests' devices stay: the stale one makes room
    tracker.observe(DeviceSeen(now, newcomer, None))
    assert stale not in tracker.devices
    with psycopg.connect(pg_url) as owner:  # the web UI renaming it, not yet committed
        owner.execute("UPDATE devices SET name = 'Porch camera', name_source = 'user' WHERE mac = %s", (stale,))
        writer = threading.Thread(target=tracker.flush)
        writer.start()
        deadline = time.monotonic() + 20
        with psycopg.connect(pg_url, autocommit=True) as watch:
            while not watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                    " AND datname = current_database()").fetchone()[0]:
                assert time.monotonic() < deadline and writer.is_alive(), "the tracker's write never waited"
                time.sleep(0.05)
        owner.commit()
    writer.join(20)
    with store.session() as s:
        row = s.get(Device, stale)
        assert row is not None and (row.name, row.name_source) == ("Porch camera", "user")
        assert s.scalars(select(DeviceName.name).where(DeviceName.mac == stale)).all() == ["cam"]
        assert s.get(Device, newcomer) is not None
