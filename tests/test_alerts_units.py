"""The pure parts of alerting: presence with an idle timeout, blocked-query summaries, the outbox's bound and
history, broker URLs and Home Assistant ids. No broker needed."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.alerts import BlockedSummariser, Outbox, Presence, recent_alerts
from gateway.alerts.homeassistant import command_topic, device_id, parse_command
from gateway.alerts.mqtt import parse_url
from gateway.events import Alert, DnsQuery
from gateway.store.db import Store

ID = re.compile(r"[a-zA-Z0-9_-]+")


def q(ts: float, mac: str | None, name: str, verdict: str = "blocked") -> DnsQuery:
    return DnsQuery(ts, "10.0.0.2", mac, name, 1, name, verdict=verdict)


@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    yield s
    s.close()


def test_presence_goes_offline_after_the_idle_timeout_and_back_online():
    p = Presence(idle_timeout_s=60)
    assert p.seen("m1", 100.0) is None  # first sighting: the new_device alert speaks for it
    assert p.expire(150.0) == [] and p.is_online("m1")
    (off,) = p.expire(161.0)
    assert (off.kind, off.mac, off.data["last_seen"]) == ("device_offline", "m1", 100.0)
    assert p.expire(500.0) == []  # said once
    back = p.seen("m1", 400.0)
    assert back.kind == "device_online" and back.data["offline_s"] == 300.0
    assert p.seen("m1", 401.0) is None


def test_presence_seeded_from_the_store_sends_nothing_until_something_changes():
    p = Presence(idle_timeout_s=60)
    p.seed("old", last_seen=0.0, now=1000.0)
    p.seed("fresh", last_seen=990.0, now=1000.0)
    assert not p.is_online("old") and p.is_online("fresh")
    assert [a.mac for a in p.expire(1051.0)] == ["fresh"]
    assert p.seen("old", 1100.0).kind == "device_online"


def test_a_clock_jump_neither_sends_every_device_offline_nor_keeps_one_online(store):
    from gateway.alerts import Alerts
    from gateway.config import Config

    def offline() -> list[str]:
        return [r.mac for r in recent_alerts(store, kind="device_offline")]

    # The wall clock jumps an hour forward (NTP after a Pi booted without a real-time clock) right after a
    # device spoke: it is not an hour idle. The publisher's ticks are called with that wall time; no broker.
    ahead = Alerts(store, Config(), idle_timeout_s=2)
    t0 = time.time()
    ahead._tick(t0)
    ahead.observe(q(t0, "m1", "a.example", verdict="allowed"))
    ahead._tick(time.time() + 3600)
    assert offline() == []

    # An hour backward: a device that then stays quiet still goes offline after the idle timeout, and its
    # blocked queries are still summarised after the interval, not an hour later.
    behind = Alerts(store, Config(), idle_timeout_s=2, blocked_interval_s=2)
    t0 = time.time()
    behind._tick(t0)
    behind.observe(q(t0, "m2", "ads.example"))
    deadline = time.monotonic() + 20
    while not (offline() and recent_alerts(store, kind="blocked_summary")) and time.monotonic() < deadline:
        behind._tick(time.time() - 3600)
        time.sleep(0.1)
    assert offline() == ["m2"]
    assert [r.data["count"] for r in recent_alerts(store, kind="blocked_summary")] == [1]


def test_blocked_queries_make_one_summary_per_device_and_interval():
    s = BlockedSummariser(interval_s=300, top=2)
    for i in range(1000):
        s.add(q(1000.0 + i * 0.1, "m1", ["a.ads", "b.ads", "c.ads"][i % 3 if i % 2 else 0]))
    s.add(q(1001.0, "m2", "x.ads"))
    s.add(q(1001.0, "m2", "ok.example", verdict="allowed"))  # not blocked: not counted
    s.add(q(1001.0, None, "x.ads"))  # no device: nothing to say about whom
    assert s.flush(1200.0) == []  # the interval is not over
    alerts = {a.mac: a for a in s.flush(1301.0)}
    assert set(alerts) == {"m1", "m2"}
    m1 = alerts["m1"].data
    assert m1["count"] == 1000 and m1["since"] == 1000.0 and m1["until"] == pytest.approx(1099.9)
    assert [t["name"] for t in m1["top"]] == ["a.ads", "b.ads"]
    assert alerts["m2"].data["count"] == 1
    assert s.flush(2000.0) == []  # a new window starts only with the next blocked query


def test_summariser_memory_is_bounded_under_random_names():
    s = BlockedSummariser(interval_s=1)
    for i in range(5000):
        s.add(q(1.0, "m1", f"{i}.random.example"))
    (a,) = s.flush(10.0)
    assert a.data["count"] == 5000  # counted in full, though only the first thousand names are ranked


def test_shutdown_flushes_every_open_window():
    s = BlockedSummariser(interval_s=300)
    s.add(q(1.0, "m1", "a.ads"))
    assert [a.mac for a in s.flush(2.0, all_windows=True)] == ["m1"]


def test_outbox_is_bounded_and_keeps_one_drop_notice(store):
    box = Outbox(store, max_rows=5)
    for i in range(5):
        data = {"version": str(i), "previous_version": None}
        assert box.put(Alert("model_updated", float(i), None, data)) == 0
    assert box.put(Alert("model_updated", 5.0, None, {"version": "5", "previous_version": None})) == 2
    assert box.put(Alert("model_updated", 6.0, None, {"version": "6", "previous_version": None})) == 1
    rows = box.pending(0, 100)
    assert [r.kind for r in rows].count("alerts_dropped") == 1 and len(rows) == 5
    notice = next(r for r in rows if r.kind == "alerts_dropped")
    assert notice.data == {"dropped": 3, "oldest_ts": 0.0, "newest_ts": 2.0}
    assert [r.data["version"] for r in rows if r.kind != "alerts_dropped"] == ["3", "4", "5", "6"]
    # Once the notice is with the MQTT client, a further overflow writes a new one.
    box.handed_over = notice.id
    box.put(Alert("model_updated", 7.0, None, {"version": "7", "previous_version": None}))
    kinds = [r.kind for r in box.pending(0, 100)]
    assert kinds.count("alerts_dropped") == 2 and len(kinds) == 5
    assert box.dropped_total() == 5


def test_history_keeps_the_newest_and_filters(store):
    box = Outbox(store, history_keep=10)
    for i in range(30):
        mac = "02:00:00:00:00:01" if i % 2 else "02:00:00:00:00:02"
        box.put(Alert("anomaly", float(i), mac, {"domain": f"d{i}", "reason": "r"}), publish=False)
    assert [r.ts for r in recent_alerts(store, 100)] == [float(i) for i in range(29, 19, -1)]
    assert all(r.mac == "02:00:00:00:00:01" for r in recent_alerts(store, mac="02:00:00:00:00:01"))
    first = recent_alerts(store, 3)
    assert [r.ts for r in recent_alerts(store, 3, before_id=first[-1].id)] == [26.0, 25.0, 24.0]
    assert box.count() == 0  # publish=False: history only


def test_broker_urls():
    assert parse_url("mqtt://broker.lan").port == 1883
    b = parse_url("mqtts://u%40x:p%3Aw@10.0.0.1:18883")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("10.0.0.1", 18883, True, "u@x", "p:w")
    assert parse_url("mqtt://h", "cfguser", "cfgpw").username == "cfguser"
    for bad in ("http://h", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ValueError, match="MQTT URL"):
            parse_url(bad)



@pytest.mark.parametrize("url", [
    "mqtt://alerts:S3cretPw@127.0.0.1:18830x",
    "tcp://alerts:S3cretPw@127.0.0.1:1883",
    "mqtt://alerts:S3cretPw@[::1",
    "mqtt://alerts:S3c@retPw@h:99999",
])
def test_a_refused_broker_url_shows_the_user_but_not_the_password(url):
    with pytest.raises(ValueError, match="MQTT URL 'mqtt://alerts:\\*\\*\\*@|MQTT URL 'tcp://alerts:\\*\\*\\*@") as err:
        parse_url(url)
    assert "S3c" not in str(err.value)

@given(st.text(min_size=1, max_size=40))
def test_home_assistant_ids_are_always_valid(key):
    assert ID.fullmatch(device_id("my gateway/#+", key))


def test_home_assistant_ids_do_not_collide():
    keys = ("ip:1.0.0.15", "ip:10.0.0.15", "ip:10.0.0.1", "aa:bb:cc:dd:ee:ff",
            "ip:::ffff:1.2.3.4", "ip:::ffff:1:2:3:4", "ip:::1.2.3.4", "ip:::1:2:3:4")  # IPv4 written inside IPv6
    assert len({device_id("gw", k) for k in keys}) == len(keys)
    assert device_id("gw", "aa:bb:cc:dd:ee:ff") == "iotgw_gw_aabbccddeeff"


def test_command_topics_round_trip_and_reject_strangers():
    nid = device_id("gw", "aa:bb:cc:dd:ee:ff")
    assert parse_command("gw", command_topic("gw", nid, "quarantine")) == (nid, "quarantine")
    assert parse_command("gw", f"iotgw/other/device/{nid}/quarantine/set") is None
    assert parse_command("gw", f"iotgw/gw/device/{nid}/quarantine") is None

