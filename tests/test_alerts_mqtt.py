"""Alerts over a real mosquitto: every kind with its schema, plain and TLS; Home Assistant discovery and the
quarantine switch end to end; a broker outage under a burst and a killed daemon lose nothing and keep order;
an overflowing outbox drops the oldest and says so."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jinja2
import pytest

from gateway import accounts
from gateway.alerts import Alerts, PolicyHooks, recent_alerts
from gateway.config import Config, ConfigError
from gateway.daemon import record_identity
from gateway.devices.service import forget, get_device, label, rename
from gateway.events import ALERT_KINDS, Alert, DnsQuery
from gateway.store.db import Store
from gateway.store.schema import Device, OutboxMessage, Query
from identifier.stream import Identity
from tests.broker import Mosquitto, Recorder, make_ca, wait_until
from tests.webui_seed import config as web_config
from webui.app import create_app

ROOT = Path(__file__).resolve().parents[1]
MAC1, MAC2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
GW = "home_gw"  # the gateway name "home gw" as it appears in topics

# The published contract, written out independently of gateway.alerts.payloads: a change there breaks this.
OPT_STR, NUM, OPT_NUM = (str, type(None)), (int, float), (int, float, type(None))
ENVELOPE = {"schema": (int,), "kind": (str,), "gateway": (str,), "ts": NUM, "time": (str,), "mac": OPT_STR,
            "device": (dict, type(None)), "data": (dict,)}
DATA = {
    "new_device": {"vendor": OPT_STR, "name": OPT_STR, "ip": OPT_STR},
    "device_identified": {"manufacturer": OPT_STR, "device_type": OPT_STR, "category": OPT_STR,
                          "confidence": NUM, "decided_after_s": OPT_NUM},
    "unknown_device": {"confidence": NUM, "decided_after_s": OPT_NUM},
    "device_online": {"offline_s": OPT_NUM},
    "device_offline": {"last_seen": NUM, "idle_timeout_s": NUM},
    "blocked_summary": {"count": (int,), "since": NUM, "until": NUM, "top": (list,)},
    "quarantine_entered": {"by": (str,)},
    "quarantine_lifted": {"by": (str,)},
    "anomaly": {"domain": (str,), "reason": (str,)},
    "model_updated": {"version": (str,), "previous_version": OPT_STR},
    "federated_round": {"round": (int,), "status": (str,), "error": OPT_STR},
    "alerts_dropped": {"dropped": (int,), "oldest_ts": NUM, "newest_ts": NUM},
    "too_many_devices": {"max": (int,), "message": (str,)},
}
EXAMPLES = {
    "new_device": (MAC1, {"vendor": "Espressif", "name": "<script>plug</script>", "ip": "192.168.1.20"}),
    "device_identified": (MAC1, {"manufacturer": "TP-Link", "device_type": "HS110", "category": "plug",
                                 "confidence": 0.93, "decided_after_s": 4.2}),
    "unknown_device": (MAC2, {"confidence": 0.31, "decided_after_s": 30.0}),
    "device_online": (MAC1, {"offline_s": 912.5}),
    "device_offline": (MAC1, {"last_seen": 1.7e9, "idle_timeout_s": 600.0}),
    "blocked_summary": (MAC1, {"count": 12, "since": 1.7e9, "until": 1.7e9 + 200, "top": [
        {"name": "ads.example.com", "count": 10}]}),
    "quarantine_entered": (MAC2, {"by": "web"}),
    "quarantine_lifted": (MAC2, {"by": "web"}),
    "anomaly": (MAC1, {"domain": "evil.example", "reason": "outside the learned profile"}),
    "model_updated": (None, {"version": "2", "previous_version": "1"}),
    "federated_round": (None, {"round": 3, "status": "failed", "error": "too few homes"}),
    "alerts_dropped": (None, {"dropped": 5, "oldest_ts": 1.0, "newest_ts": 2.0}),
    "too_many_devices": (None, {"max": 1000, "message": "too many devices: possible MAC flood"}),
}
ID = re.compile(r"[a-zA-Z0-9_-]+")


@pytest.fixture
def store(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path / 'state' / 'iotgw.sqlite'}")
    now = time.time()
    with s.transaction() as t:
        t.add(Device(mac=MAC1, first_seen=now, last_seen=now, vendor="Espressif", name="Kitchen plug",
                     manufacturer="TP-Link", device_type="HS110", category="plug", status="new"))
        t.add(Device(mac=MAC2, first_seen=now, last_seen=now - 3600, vendor="Raspberry Pi", status="new"))
    yield s
    s.close()


def _broker(tmp_path: Path, name: str, tls=None) -> Mosquitto:
    d = tmp_path / name
    d.mkdir()
    b = Mosquitto(d, tls=tls)
    b.start()
    return b


@pytest.fixture
def broker(tmp_path: Path):
    b = _broker(tmp_path, "broker")
    yield b
    b.stop()


@pytest.fixture
def running():
    started: list[Alerts] = []
    yield started
    for a in started:
        a.stop(drain_s=0)


def make_alerts(store: Store, url: str, running: list, *, ca: str = "", outbox_max: int = 10000,
                policy: PolicyHooks | None = None, name: str = "home gw") -> Alerts:
    cfg = Config()
    cfg.gateway.name = name
    cfg.mqtt.url = url
    cfg.mqtt.ca_file = ca
    cfg.mqtt.outbox_max = outbox_max
    alerts = Alerts(store, cfg, policy=policy, blocked_interval_s=1.0)
    alerts.start()
    running.append(alerts)
    return alerts


def check_shape(value: dict, spec: dict, where: str) -> None:
    for key, types in spec.items():
        assert key in value, f"{where}: missing {key}"
        assert isinstance(value[key], types), f"{where}: {key} is {type(value[key]).__name__}"


def outbox_rows(store: Store) -> int:
    with store.session() as s:
        return s.query(OutboxMessage).count()


def test_every_alert_kind_arrives_with_its_schema(store, broker, running):
    rec = Recorder(broker, ["iotgw/#"])
    alerts = make_alerts(store, broker.url, running)
    assert set(EXAMPLES) == set(ALERT_KINDS) == set(DATA)
    for kind, (mac, data) in EXAMPLES.items():
        alerts.send(Alert(kind, time.time(), mac, data))
    got = rec.wait(lambda m: "/event/" in m.topic, count=len(EXAMPLES))
    assert [m.topic for m in got] == [f"iotgw/{GW}/event/{k}" for k in EXAMPLES]
    for m in got:
        assert not m.retain, "events must never be retained"
        body = m.json()
        check_shape(body, ENVELOPE, m.topic)
        assert body["schema"] == 1 and body["gateway"] == GW
        check_shape(body["data"], DATA[body["kind"]], m.topic)
        assert (body["mac"], body["data"]) == EXAMPLES[body["kind"]]
    kitchen = next(m.json() for m in got if m.topic.endswith("/device_identified"))
    assert kitchen["device"]["name"] == "Kitchen plug"
    # Status: retained "online" once connected.
    status = rec.wait(lambda m: m.topic == f"iotgw/{GW}/status")
    assert status[-1].payload == b"online"
    wait_until(lambda: outbox_rows(store) == 0)  # acknowledged alerts leave the outbox ...
    assert [r.kind for r in recent_alerts(store, 100)] == list(reversed(EXAMPLES))  # ... and stay in history
    rec.close()


def test_a_malformed_alert_is_refused_at_its_source(store, running):
    alerts = make_alerts(store, "", running)  # MQTT off: the history still records
    with pytest.raises(ValueError, match="device_type"):
        alerts.send(Alert("device_identified", time.time(), MAC1, {"manufacturer": "x"}))
    with pytest.raises(ValueError, match="mac"):
        alerts.send(Alert("new_device", time.time(), None, {"vendor": None, "name": None, "ip": None}))
    with pytest.raises(ValueError, match="unknown alert kind"):
        alerts.send(Alert("nonsense", time.time(), None, {}))
    alerts.send(Alert("model_updated", time.time(), None, {"version": "3", "previous_version": None}))
    assert [r.kind for r in recent_alerts(store)] == ["model_updated"]
    assert outbox_rows(store) == 0  # nothing queued for a broker that is not configured


@pytest.mark.parametrize("ca_name", ["missing.pem", "not-a-cert.pem"])
def test_a_ca_file_that_cannot_be_used_is_a_configuration_error_naming_it(store, tmp_path, ca_name):
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    cfg = Config()
    cfg.mqtt.url, cfg.mqtt.ca_file = "mqtts://127.0.0.1:8883", str(tmp_path / ca_name)
    with pytest.raises(ConfigError, match=rf"mqtt\.ca_file '{re.escape(str(tmp_path / ca_name))}': not usable"):
        Alerts(store, cfg)  # before: a bare FileNotFoundError (no file named) or SSLError, and the daemon died


def test_tls_with_a_test_ca(store, tmp_path, running):
    certs = tmp_path / "certs"
    certs.mkdir()
    ca, cert, key = make_ca(certs)
    broker = _broker(tmp_path, "tlsbroker", tls=(ca, cert, key))
    try:
        rec = Recorder(broker, ["iotgw/#"], ca=ca)
        alerts = make_alerts(store, broker.url, running, ca=str(ca))
        alerts.send(Alert("anomaly", time.time(), MAC1, {"domain": "x.example", "reason": "new"}))
        got = rec.wait(lambda m: m.topic.endswith("/event/anomaly"))
        assert got[0].json()["data"]["domain"] == "x.example"
        # A gateway that does not trust the broker's CA never connects, and keeps its alerts.
        other = tmp_path / "other"
        other.mkdir()
        wrong_ca = make_ca(other)[0]
        stranger = make_alerts(store, broker.url, running, ca=str(wrong_ca), name="stranger")
        time.sleep(1.5)
        assert not stranger.link.connected.is_set()
        rec.close()
    finally:
        broker.stop()


def discovery_rules(topic: str, payload: dict, gateway_id: str) -> None:
    """Home Assistant's rules for device-based discovery, as its MQTT docs state them."""
    m = re.fullmatch(r"homeassistant/device/([^/]+)/config", topic)
    assert m and ID.fullmatch(m.group(1)), topic
    for key in ("device", "origin", "components"):
        assert key in payload, f"{topic}: {key} is required"
    assert payload["origin"]["name"]
    dev = payload["device"]
    assert dev.get("identifiers") or dev.get("connections")
    for uid in dev.get("identifiers", []):
        assert ID.fullmatch(uid)
    for comp_id, comp in payload["components"].items():
        assert ID.fullmatch(comp_id)
        if comp["platform"] == "device_automation":  # a device trigger: no entity, no unique_id
            assert comp["automation_type"] == "trigger" and comp["type"] and comp["subtype"]
            assert re.fullmatch(r"[a-zA-Z0-9_/-]+", comp["topic"]), comp["topic"]
            continue
        assert ID.fullmatch(comp["unique_id"])
        assert comp["platform"] in {"sensor", "switch", "select", "device_tracker", "binary_sensor"}
        for key in ("state_topic", "command_topic"):
            if key in comp:
                assert re.fullmatch(r"[a-zA-Z0-9_/-]+", comp[key]), comp[key]  # no wildcards, no spaces
    if dev["identifiers"] != [gateway_id]:
        assert dev["via_device"] == gateway_id


def test_home_assistant_discovery_and_removal(store, broker, running):
    rec = Recorder(broker, ["homeassistant/#", "iotgw/+/device/#"])
    policies = {MAC1: "default"}
    hooks = PolicyHooks(options=lambda: ["default", "strict", "open"], current=policies.get,
                        apply=policies.__setitem__)
    alerts = make_alerts(store, broker.url, running, policy=hooks)
    configs = rec.wait(lambda m: m.topic.endswith("/config"), count=3)
    by_topic = {m.topic: m for m in configs}
    gid = f"iotgw_{GW}"
    dev1 = f"{gid}_020000000001"
    assert set(by_topic) == {f"homeassistant/device/{n}/config" for n in (gid, dev1, f"{gid}_020000000002")}
    for m in configs:
        discovery_rules(m.topic, m.json(), gid)
    late = Recorder(broker, ["homeassistant/#"], client_id="late-subscriber")  # Home Assistant started later
    assert all(m.retain for m in late.wait(lambda m: m.topic.endswith("/config"), count=3))
    late.close()
    p1 = by_topic[f"homeassistant/device/{dev1}/config"].json()
    assert p1["device"]["connections"] == [["mac", MAC1]]
    assert (p1["device"]["manufacturer"], p1["device"]["model"]) == ("TP-Link", "HS110")
    platforms = sorted(c["platform"] for c in p1["components"].values() if c["platform"] != "device_automation")
    assert platforms == ["device_tracker", "select", "sensor", "sensor", "sensor", "sensor", "switch"]
    counters = [c for c in p1["components"].values() if c.get("state_class") == "total_increasing"]
    assert {c["name"] for c in counters} == {"Queries today", "Blocked today"}
    select = next(c for c in p1["components"].values() if c["platform"] == "select")
    assert select["options"] == ["default", "strict", "open"]

    state = rec.wait(lambda m: m.topic == f"iotgw/{GW}/device/{dev1}/state")[-1].json()
    assert state["presence"] == "home" and state["quarantine"] == "OFF" and state["policy"] == "default"
    assert rec.wait(lambda m: m.topic == f"iotgw/{GW}/device/{gid}_020000000002/state")[-1].json()[
        "presence"] == "not_home"  # last seen an hour ago, beyond the idle timeout

    # The policy select's command reaches the hook the daemon passed in.
    rec.publish(select["command_topic"], "strict")
    wait_until(lambda: policies[MAC1] == "strict")
    rec.publish(select["command_topic"], "not-an-option")
    time.sleep(0.5)
    assert policies[MAC1] == "strict"

    # Home Assistant restarts: discovery comes again.
    rec.clear()
    rec.publish("homeassistant/status", "online")
    assert len(rec.wait(lambda m: m.topic.endswith("/config"), count=3)) >= 3

    # A forgotten device's entities are removed with an empty retained config.
    rec.clear()
    forget(store, MAC2)
    alerts.device_removed(MAC2)
    gone = rec.wait(lambda m: m.topic == f"homeassistant/device/{gid}_020000000002/config")
    assert gone[-1].payload == b""

    # Changes made outside the daemon (web UI): only what differs is sent again.
    rec.clear()
    rename(store, MAC1, "Toaster")
    alerts.sync_devices()
    rec.wait(lambda m: m.topic.endswith("/config"))
    time.sleep(0.5)
    renamed = rec.on(lambda m: m.topic.endswith("/config"))
    assert [m.topic for m in renamed] == [f"homeassistant/device/{dev1}/config"]
    assert renamed[0].json()["device"]["name"] == "Toaster"
    forget(store, MAC1)
    alerts.sync_devices()
    assert rec.wait(lambda m: m.topic == f"homeassistant/device/{dev1}/config", count=2)[-1].payload == b""
    rec.close()


def test_home_assistant_gets_at_most_ha_devices_max_devices_approved_first_then_the_oldest(store, broker, running):
    """A LAN host spoofing source MACs makes a device of each (the sniffer reports every sender): each became a
    retained discovery config and seven entities in the owner's Home Assistant, without bound."""
    now = time.time()
    approved, late = "02:00:00:00:00:a1", "02:00:00:00:00:b1"
    flood = [f"02:66:00:00:00:{i:02x}" for i in range(40)]
    with store.transaction() as t:
        for i, mac in enumerate(flood):
            t.add(Device(mac=mac, first_seen=now + 1 + i, last_seen=now + 1 + i, status="new"))
        t.add(Device(mac=approved, first_seen=now + 100, last_seen=now + 100, status="approved"))
    rec = Recorder(broker, ["homeassistant/#", f"iotgw/{GW}/#"])
    cfg = Config()
    cfg.gateway.name, cfg.mqtt.url, cfg.mqtt.ha_devices_max = "home gw", broker.url, 3
    alerts = Alerts(store, cfg)
    alerts.start()
    running.append(alerts)
    gid = f"iotgw_{GW}"
    node = {mac: f"{gid}_{mac.replace(':', '')}" for mac in (MAC1, MAC2, approved, late, *flood)}
    # the gateway's state ends the first pass, which sent every config and device state before it
    totals = rec.wait(lambda m: m.topic == f"iotgw/{GW}/state")[0].json()
    assert totals["devices"] == 2 + len(flood) + 1  # the gateway still counts them all
    configs = {m.topic for m in rec.on(lambda m: m.topic.endswith("/config") and m.payload)}
    assert configs == {f"homeassistant/device/{n}/config" for n in (gid, node[approved], node[MAC1], node[MAC2])}
    states = {m.topic for m in rec.on(lambda m: m.topic.endswith("/state") and "/device/" in m.topic)}
    assert states == {f"iotgw/{GW}/device/{node[mac]}/state" for mac in (approved, MAC1, MAC2)}

    # A device met now (the flood goes on) is not announced either; the passes after it say when it had its turn.
    with store.transaction() as t:
        t.add(Device(mac=late, first_seen=time.time(), last_seen=time.time(), status="new"))
    alerts.device_changed(late)
    rename(store, MAC1, "Toaster")
    alerts.device_changed(MAC1)
    rec.wait(lambda m: m.topic == f"homeassistant/device/{node[MAC1]}/config" and b"Toaster" in m.payload)
    rename(store, MAC2, "Kettle")
    alerts.device_changed(MAC2)
    rec.wait(lambda m: m.topic == f"homeassistant/device/{node[MAC2]}/config" and b"Kettle" in m.payload)
    assert not rec.on(lambda m: node[late] in m.topic)
    rec.close()


def test_an_address_keyed_device_merged_into_its_mac_leaves_home_assistant(tmp_path, broker):
    import asyncio
    import threading

    from gateway.alerts.homeassistant import device_id
    from gateway.daemon import Gateway
    from gateway.events import AddressSeen, DhcpSeen

    cfg = Config()
    cfg.gateway.name = "home gw"
    cfg.gateway.state_dir = str(tmp_path / "gw")
    cfg.dns.listen = []  # events are handed in; no DNS server needed
    cfg.capture.sniff = False
    cfg.store.flush_interval_s = 0.2
    cfg.mqtt.url = broker.url
    gw_store = Store(cfg.db_url)
    gateway = Gateway(cfg, gw_store)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    rec = Recorder(broker, ["homeassistant/#"])
    mac = "02:00:00:00:00:55"
    old_topic, new_topic = (f"homeassistant/device/{device_id('home gw', key)}/config" for key in ("ip:10.0.0.5", mac))
    try:
        asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(30)
        gateway.ingest([DnsQuery(time.time(), "10.0.0.5", None, "a.example.com", 1, "example.com")])
        assert rec.wait(lambda m: m.topic == old_topic and m.payload)
        now = time.time()
        gateway.ingest([DhcpSeen(now, mac, "10.0.0.5", hostname="cam", message_type=3),
                        AddressSeen(now, mac, "10.0.0.5", "dhcp")])
        assert rec.wait(lambda m: m.topic == new_topic and m.payload)
        assert rec.wait(lambda m: m.topic == old_topic and not m.payload)  # the ghost is removed
    finally:
        asyncio.run_coroutine_threadsafe(gateway.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        rec.close()
        gw_store.close()


def test_configs_of_devices_forgotten_while_down_are_removed(store, broker, running):
    rec = Recorder(broker, ["homeassistant/#"])
    ours, theirs = f"iotgw_{GW}_0200000000aa", "iotgw_other_0200000000aa"
    for nid, via in ((ours, f"iotgw_{GW}"), (theirs, "iotgw_other")):
        device = {"identifiers": [nid], "via_device": via}
        stale = {"device": device, "origin": {"name": "iotgw"}, "components": {}}
        rec.publish(f"homeassistant/device/{nid}/config", json.dumps(stale), retain=True)
    make_alerts(store, broker.url, running)
    assert rec.wait(lambda m: m.topic == f"homeassistant/device/{ours}/config" and not m.payload)
    time.sleep(1)
    assert not rec.on(lambda m: m.topic == f"homeassistant/device/{theirs}/config" and not m.payload)
    rec.close()


def test_only_retained_configs_are_checked_not_the_echo_of_a_live_publish(store, broker, running):
    """The publisher hears its own discovery configs back (MQTT 3.1.1 has no no-local): the echo of a config sent
    before a deletion unpublished the device a second time, and every rediscovery made one table read per echo.
    Only a config left on the broker (retained, met on subscribing) can be a ghost."""
    rec = Recorder(broker, ["homeassistant/#"])
    make_alerts(store, broker.url, running)
    rec.wait(lambda m: m.topic.endswith("/config"), count=3)
    rec.clear()
    echo = f"homeassistant/device/iotgw_{GW}_0200000000bb/config"  # hangs under this gateway, in no device row
    device = {"identifiers": [f"iotgw_{GW}_0200000000bb"], "via_device": f"iotgw_{GW}"}
    rec.publish(echo, json.dumps({"device": device, "origin": {"name": "iotgw"}, "components": {}}), retain=False)
    # Handled after the echo, in order, by the same thread: any removal of the echo comes before the rediscovery.
    rec.publish("homeassistant/status", "online")
    rec.wait(lambda m: m.topic == f"homeassistant/device/iotgw_{GW}/config")
    assert not rec.on(lambda m: m.topic == echo and not m.payload)
    rec.close()


def test_a_device_deleted_during_a_failing_publishing_pass_still_leaves_home_assistant(store, broker, running,
                                                                                     tmp_path):
    """A publishing pass took the pending removals and then failed on the database; the removal was lost with it,
    and the deleted device stayed in Home Assistant until the next full resync. The store is made unreadable for
    real (its device table renamed away by another connection), then readable again."""
    import sqlite3

    ghost = f"homeassistant/device/iotgw_{GW}_020000000002/config"
    rec = Recorder(broker, ["homeassistant/#"])
    alerts = make_alerts(store, broker.url, running)
    rec.wait(lambda m: m.topic == ghost and m.payload)
    forget(store, MAC2)
    db = sqlite3.connect(tmp_path / "state" / "iotgw.sqlite", isolation_level=None)
    db.execute("ALTER TABLE devices RENAME TO devices_away")
    try:
        with alerts._todo_lock:  # what device_removed and sync_devices leave, taken by one pass, which reads the table
            alerts._removed.add(MAC2)
            alerts._sync = True
        alerts._wake.set()
        time.sleep(2.5)  # a few passes fail meanwhile (the publisher retries every second)
        assert not rec.on(lambda m: m.topic == ghost and not m.payload)
    finally:
        db.execute("ALTER TABLE devices_away RENAME TO devices")
        db.close()
    assert rec.wait(lambda m: m.topic == ghost and not m.payload)
    rec.close()


def test_a_device_deleted_while_the_broker_is_away_leaves_home_assistant_even_if_its_retained_config_comes_first(
        store, broker):
    """Deleted in the web UI while the broker was away, a device has only the broker's retained config left to
    remove on reconnect. That config may be handled before the reconnect's rediscovery (the publisher's thread
    was busy): the device map cached from the previous connection still listed it and the config stayed, a
    ghost in Home Assistant. The test plays the publisher's thread to make that order certain."""
    cfg = Config()
    cfg.gateway.name, cfg.mqtt.url = "home gw", broker.url
    alerts = Alerts(store, cfg)
    gid = f"iotgw_{GW}"
    kept, ghost = (f"homeassistant/device/{gid}_{n}/config" for n in ("020000000001", "020000000002"))
    rec = Recorder(broker, ["homeassistant/#"])
    alerts.link.start()
    try:
        wait_until(alerts.link.connected.is_set)
        alerts._discovery()  # the first connection: every device's config, retained
        rec.wait(lambda m: m.topic == ghost and m.payload)
        broker.stop()
        wait_until(lambda: not alerts.link.connected.is_set())
        forget(store, MAC2)
        alerts.sync_devices()  # what the daemon does after a change in the web UI
        alerts._messages.clear()
        rec.clear()
        broker.start()
        wait_until(lambda: any(t == ghost for t, _ in list(alerts._messages)))
        alerts._handle_messages()  # the broker's retained configs first ...
        alerts._discovery()  # ... then the reconnect's rediscovery
        assert rec.wait(lambda m: m.topic == ghost and not m.payload)
        late = Recorder(broker, ["homeassistant/#"], client_id="late-subscriber")  # Home Assistant starting
        late.wait(lambda m: m.topic == kept)
        assert not late.on(lambda m: m.topic == ghost)
        late.close()
    finally:
        alerts.link.stop()
        rec.close()


def test_device_states_still_reach_home_assistant_while_the_policy_file_is_broken(store, broker, tmp_path, running):
    from gateway.policies import MODES, device_mode
    from gateway.policyfile import policy_path

    state_dir = tmp_path / "gwstate"
    state_dir.mkdir()
    policy_path(state_dir).write_text("{ half-edited by hand")  # what the daemon's own hooks then read
    hooks = PolicyHooks(options=lambda: MODES, current=lambda mac: device_mode(state_dir, mac),
                        apply=lambda mac, mode: None)
    rec = Recorder(broker, [f"iotgw/{GW}/#"])
    make_alerts(store, broker.url, running, policy=hooks)
    state = rec.wait(lambda m: m.topic == f"iotgw/{GW}/device/iotgw_{GW}_020000000001/state")[-1].json()
    assert state["presence"] == "home" and state["policy"] is None
    assert rec.wait(lambda m: m.topic == f"iotgw/{GW}/state")[-1].json()["devices"] == 2
    rec.close()


def test_quarantine_switch_end_to_end(store, broker, running):
    rec = Recorder(broker, ["homeassistant/#", "iotgw/#"])
    make_alerts(store, broker.url, running)
    config = rec.wait(lambda m: m.topic == f"homeassistant/device/iotgw_{GW}_020000000002/config")[-1].json()
    switch = next(c for c in config["components"].values() if c["platform"] == "switch")
    rec.publish(switch["command_topic"], "ON")
    wait_until(lambda: get_device(store, MAC2).device.status == "quarantined")
    entered = rec.wait(lambda m: m.topic.endswith("/event/quarantine_entered"))[0].json()
    assert entered["mac"] == MAC2 and entered["data"]["by"] == "home_assistant"
    rec.wait(lambda m: m.topic.endswith("020000000002/state") and m.json()["quarantine"] == "ON")
    rec.publish(switch["command_topic"], "OFF")
    wait_until(lambda: get_device(store, MAC2).device.status == "approved")
    rec.wait(lambda m: m.topic.endswith("/event/quarantine_lifted"))
    rec.publish(switch["command_topic"], "maybe")  # hostile payloads change nothing
    time.sleep(0.5)
    assert get_device(store, MAC2).device.status == "approved"
    rec.close()


def test_every_change_of_a_devices_quarantine_is_one_alert_saying_who_made_it(store, broker, running, tmp_path):
    """quarantine_entered and quarantine_lifted went out only when Home Assistant's switch changed a quarantine:
    the owner's changes in the web UI and through the API, most of them, raised none, and an automation on them
    missed them. Now every change raises one, once, ``by`` whoever made it; Home Assistant's switch, whose status
    write the daemon then reloads, still raises one."""
    cfg = web_config(tmp_path)  # the store fixture's database, MQTT on: what the web UI's process reads
    cfg.mqtt.url = broker.url
    accounts.set_password(store, "correct horse battery")
    _, secret = accounts.create_token(store, "script", "write")
    app = create_app(store, cfg)
    web, api = app.test_client(), app.test_client()
    web.get("/login")
    with web.session_transaction() as session:
        csrf = session["csrf_token"]
    assert web.post("/login", data={"username": "admin", "password": "correct horse battery",
                                    "csrf_token": csrf}).status_code == 302
    with web.session_transaction() as session:
        csrf = session["csrf_token"]
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    rec = Recorder(broker, ["homeassistant/#", "iotgw/+/event/#"])
    alerts = make_alerts(store, broker.url, running)
    config = rec.wait(lambda m: m.topic == f"homeassistant/device/iotgw_{GW}_020000000002/config")[-1].json()
    switch = next(c for c in config["components"].values() if c["platform"] == "switch")

    for _ in range(2):  # the second time the status is what it was: no change, no alert
        r = web.post(f"/devices/{MAC2}/status", data={"status": "quarantined", "csrf_token": csrf})
        assert r.status_code == 302
    assert api.patch(f"/api/v1/devices/{MAC2}", json={"status": "approved"}).status_code == 200
    assert api.patch(f"/api/v1/devices/{MAC2}", json={"status": "new"}).status_code == 200  # not quarantined either
    rec.publish(switch["command_topic"], "ON")
    wait_until(lambda: get_device(store, MAC2).device.status == "quarantined")
    alerts.sync_devices()  # what the daemon does on the device table's new revision
    rec.publish(switch["command_topic"], "OFF")
    wait_until(lambda: get_device(store, MAC2).device.status == "approved")
    alerts.sync_devices()
    # In order behind everything before it: once it is here, so is every quarantine alert raised before it.
    alerts.send(Alert("model_updated", time.time(), None, {"version": "2", "previous_version": "1"}))
    rec.wait(lambda m: m.topic.endswith("/event/model_updated"))
    said = [(m.json()["kind"], m.json()["mac"], m.json()["data"]["by"])
            for m in rec.on(lambda m: "/event/quarantine_" in m.topic)]
    assert said == [("quarantine_entered", MAC2, "web"), ("quarantine_lifted", MAC2, "api"),
                    ("quarantine_entered", MAC2, "home_assistant"), ("quarantine_lifted", MAC2, "home_assistant")]
    # The web UI's alert list has each once too.
    assert [r.data["by"] for r in recent_alerts(store, kind="quarantine_entered")] == ["home_assistant", "web"]
    rec.close()


def test_home_assistant_gets_no_unknown_manufacturer_or_model_only_what_is_known(store, broker, running):
    """After an ``unknown_device`` answer the store holds "unknown" for every label, and a device never identified
    has none: both went to Home Assistant's device registry as manufacturer and model "unknown", replacing the
    MAC vendor and, for a device merged with ours by its MAC from another integration, that one's real model.
    Home Assistant keeps a registry field that a config leaves out, so what is not known is left out."""
    david, bare = "02:00:00:00:00:0d", "02:00:00:00:00:0e"
    now = time.time()
    with store.transaction() as t:
        t.add(Device(mac=david, first_seen=now, last_seen=now, vendor="David Electronics Co., LTD.", status="new"))
        t.add(Device(mac=bare, first_seen=now, last_seen=now, status="new"))  # a locally administered MAC: no OUI
    with store.transaction() as t:  # what the daemon stores of an unknown_device answer
        guess = Identity("TP-Link", "HS110", "plug", 0.31, False, 30.0, model_version="1")
        record_identity(t, t.get(Device, david), now, guess.claimed())
    assert get_device(store, david).device.manufacturer == "unknown"
    rec = Recorder(broker, ["homeassistant/#", "iotgw/+/device/#"])
    make_alerts(store, broker.url, running)

    def block(mac: str) -> dict:
        topic = f"homeassistant/device/iotgw_{GW}_{mac.replace(':', '')}/config"
        return rec.wait(lambda m: m.topic == topic)[-1].json()["device"]

    assert block(david)["manufacturer"] == "David Electronics Co., LTD." and "model" not in block(david)
    assert "manufacturer" not in block(bare) and "model" not in block(bare)
    assert (block(MAC1)["manufacturer"], block(MAC1)["model"]) == ("TP-Link", "HS110")
    state = rec.wait(lambda m: m.topic == f"iotgw/{GW}/device/iotgw_{GW}_02000000000d/state")[-1].json()
    assert state["manufacturer"] == "David Electronics Co., LTD." and state["category"] is None
    rec.close()


def test_home_assistant_shows_the_owners_labels_over_the_identifiers_answer(store, broker, running):
    """The owner's correction is the device's identity everywhere else (policy, the web UI, federated training);
    Home Assistant got the model's answer, or nothing for a device the model called unknown."""
    david = "02:00:00:00:00:0d"
    now = time.time()
    with store.transaction() as t:
        t.add(Device(mac=david, first_seen=now, last_seen=now, vendor="David Electronics Co., LTD.", status="new"))
    with store.transaction() as t:
        guess = Identity("TP-Link", "HS110", "plug", 0.31, False, 30.0, model_version="1")
        record_identity(t, t.get(Device, david), now, guess.claimed())
    label(store, MAC1, manufacturer="TP-Link", device_type="Kasa HS100", category="plug")
    rec = Recorder(broker, ["homeassistant/#", "iotgw/+/device/#"])
    alerts = make_alerts(store, broker.url, running)

    def shown(mac: str) -> tuple[dict, dict]:
        nid = f"iotgw_{GW}_{mac.replace(':', '')}"
        config = rec.wait(lambda m: m.topic == f"homeassistant/device/{nid}/config")[-1].json()["device"]
        state = rec.wait(lambda m: m.topic == f"iotgw/{GW}/device/{nid}/state")[-1].json()
        return config, state

    config, state = shown(MAC1)
    assert (config["manufacturer"], config["model"], state["device_type"]) == ("TP-Link", "Kasa HS100", "Kasa HS100")
    label(store, david, manufacturer="Withings", device_type="Body scale", category="health")
    alerts.sync_devices()  # what the daemon does when the web UI or the CLI changed a device
    wait_until(lambda: shown(david)[1]["device_type"] == "Body scale")
    config, state = shown(david)
    assert (config["manufacturer"], state["manufacturer"], state["device_type"], state["category"]) == (
        "Withings", "Withings", "Body scale", "health")
    rec.close()


def test_the_gateway_shows_in_home_assistant_by_its_configured_name(store, broker, running):
    """``[gateway] name = "home gw"`` showed as "home_gw": the id's sanitised form was the device's name too."""
    rec = Recorder(broker, ["homeassistant/#"])
    make_alerts(store, broker.url, running, name="home gw")
    config = rec.wait(lambda m: m.topic == f"homeassistant/device/iotgw_{GW}/config")[-1].json()
    assert config["device"]["name"] == "home gw" and config["device"]["identifiers"] == [f"iotgw_{GW}"]
    rec.close()


def left_behind(broker: Mosquitto, part: str) -> list[str]:
    """The retained topics with ``part`` in their name that a Home Assistant starting now would get."""
    late = Recorder(broker, ["homeassistant/#", "iotgw/#"], client_id=f"late-{time.monotonic_ns()}")
    try:
        # After the retained messages a new subscription gets: once it is here, they all are.
        late.publish("iotgw/test/marker", b"x")
        late.wait(lambda m: m.topic == "iotgw/test/marker")
        return sorted(m.topic for m in late.on(lambda m: m.retain and m.payload and part in m.topic))
    finally:
        late.close()


def test_renaming_the_gateway_clears_what_home_assistant_got_under_the_old_name(store, broker, running):
    """Only configs under the current gateway id were ever cleared: after a rename of ``[gateway] name``, the
    gateway and every device stayed in Home Assistant twice, the old ones unavailable, for good."""
    rec = Recorder(broker, ["homeassistant/#", "iotgw/#"])
    old = make_alerts(store, broker.url, running, name="old gw")
    rec.wait(lambda m: m.topic.startswith("homeassistant/device/iotgw_old_gw") and m.payload, count=3)
    rec.wait(lambda m: m.topic.startswith("iotgw/old_gw/device/") and m.topic.endswith("/state"), count=2)
    running.remove(old)
    old.stop(drain_s=0)
    make_alerts(store, broker.url, running, name="home gw")
    rec.wait(lambda m: m.topic.startswith(f"homeassistant/device/iotgw_{GW}") and m.payload, count=3)

    wait_until(lambda: not left_behind(broker, "old_gw"))
    # and the new name's are there, the devices under the new gateway
    config = rec.on(lambda m: m.topic == f"homeassistant/device/iotgw_{GW}_020000000001/config")[-1].json()
    assert config["device"]["via_device"] == f"iotgw_{GW}"
    rec.close()


def test_a_gateway_online_under_the_earlier_name_keeps_what_it_announced(store, broker, running):
    """Two gateways on one broker, both named by default, and the owner renames one: the other, online under the
    earlier name, keeps its gateway and devices in Home Assistant."""
    rec = Recorder(broker, ["homeassistant/#", "iotgw/#"])
    first = make_alerts(store, broker.url, running, name="iotgw")
    rec.wait(lambda m: m.topic.startswith("homeassistant/device/iotgw_iotgw") and m.payload, count=3)
    running.remove(first)
    first.stop(drain_s=0)
    rec.publish("iotgw/iotgw/status", "online", retain=True)  # the other home's gateway, connected
    make_alerts(store, broker.url, running, name="kitchen")
    rec.wait(lambda m: m.topic.startswith("homeassistant/device/iotgw_kitchen") and m.payload, count=3)
    # The broker took the new gateway's subscriptions before its configs, so the retained messages are with it;
    # Home Assistant's "online" comes after them and makes it announce everything again after handling them.
    rec.publish("homeassistant/status", "online")
    rec.wait(lambda m: m.topic.startswith("homeassistant/device/iotgw_kitchen") and m.payload, count=6)
    kept = left_behind(broker, "iotgw")
    assert [t for t in kept if t.endswith("/config") and "kitchen" not in t] == [
        f"homeassistant/device/iotgw_iotgw{node}/config" for node in ("", "_020000000001", "_020000000002")]
    assert {"iotgw/iotgw/status", "iotgw/iotgw/state"} <= set(kept)
    rec.close()


def test_quarantine_and_policy_are_config_entities_that_device_and_area_actions_leave_alone(store, broker, running):
    """Home Assistant expands an action aimed at a device or an area ("turn off everything in the kitchen", or a
    smart plug's own device, which Home Assistant merges with ours by the MAC in ``connections``) to that device's
    entities without an ``entity_category``: a plain quarantine switch was turned on or off with them."""
    hostile = ('"Plug" #/+ <img src=x onerror=alert(1)>' + "x" * 300)[:200]  # a DHCP name: what a device sends
    with store.transaction() as t:
        t.get(Device, MAC1).name = hostile
    rec = Recorder(broker, ["homeassistant/#"])
    hooks = PolicyHooks(options=lambda: ["default", "strict"], current=lambda mac: "default",
                        apply=lambda mac, choice: None)
    make_alerts(store, broker.url, running, policy=hooks)
    message = rec.wait(lambda m: m.topic == f"homeassistant/device/iotgw_{GW}_020000000001/config")[-1]
    config = message.json()
    assert config["device"]["name"] == hostile  # carried as JSON text; never part of a topic
    by_platform = {c["platform"]: c for c in config["components"].values()}
    assert by_platform["switch"]["entity_category"] == "config"
    assert by_platform["select"]["entity_category"] == "config"
    # What the owner watches stays primary: presence and the counters show on dashboards and answer area actions.
    primary = [c for c in config["components"].values() if c["platform"] in ("device_tracker", "sensor")]
    assert primary and not any("entity_category" in c for c in primary)
    rec.close()


def fires(trigger: dict, payload: bytes) -> bool:
    """Whether Home Assistant's MQTT device trigger fires on ``payload``: its value template (Jinja, with
    ``value_json``), if any, rendered and compared with the trigger's ``payload``, if any."""
    if trigger.get("payload") is None:
        return True
    value = payload.decode()
    if trigger.get("value_template"):
        value = jinja2.Template(trigger["value_template"]).render(value_json=json.loads(payload))
    return value == trigger["payload"]


def test_alerts_are_device_triggers_in_home_assistant_for_the_gateway_and_for_each_device(store, broker, running):
    """An automation "when the kitchen plug goes offline / is blocked / looks anomalous", or "when any new device
    appears", is picked in Home Assistant's automation editor under the device: no topic, template or MAC to type."""
    rec = Recorder(broker, ["homeassistant/#", f"iotgw/{GW}/event/#"])
    alerts = make_alerts(store, broker.url, running)
    gid = f"iotgw_{GW}"
    dev1, dev2 = f"{gid}_020000000001", f"{gid}_020000000002"
    configs = {m.topic.split("/")[2]: m.json() for m in rec.wait(lambda m: m.topic.endswith("/config"), count=3)}

    def triggers(node: str) -> dict[str, dict]:
        found = [c for c in configs[node]["components"].values() if c["platform"] == "device_automation"]
        pairs = [(t["type"], t["subtype"]) for t in found]
        assert len(set(pairs)) == len(pairs), "type and subtype must be unique within a device"
        return {t["type"]: t for t in found}

    on_gateway, on_dev1, on_dev2 = triggers(gid), triggers(dev1), triggers(dev2)
    assert set(on_gateway) == set(ALERT_KINDS)
    assert set(on_dev1) == set(on_dev2) == set(ALERT_KINDS) - {
        "new_device", "model_updated", "federated_round", "alerts_dropped", "too_many_devices"}

    for kind, mac in (("device_offline", MAC1), ("device_offline", MAC2), ("anomaly", MAC2), ("new_device", MAC2)):
        alerts.send(Alert(kind, time.time(), mac, EXAMPLES[kind][1]))
    published = rec.wait(lambda m: "/event/" in m.topic, count=4)
    fired = {node: [(m.topic.rsplit("/", 1)[1], m.json()["mac"]) for m in published
                    if (t := on.get(m.topic.rsplit("/", 1)[1])) and m.topic == t["topic"] and fires(t, m.payload)]
             for node, on in ((gid, on_gateway), (dev1, on_dev1), (dev2, on_dev2))}
    assert fired[gid] == [("device_offline", MAC1), ("device_offline", MAC2), ("anomaly", MAC2), ("new_device", MAC2)]
    assert fired[dev1] == [("device_offline", MAC1)]
    assert fired[dev2] == [("device_offline", MAC2), ("anomaly", MAC2)]
    rec.close()


def test_an_alert_of_a_device_just_met_carries_its_device_once_the_store_has_it(store, broker, running):
    """The daemon raises new_device (and often its identification) at a device's first packet; the tracker stores the
    device at its next flush, up to 2 s later. The alert went out at once, its "device" null, so an automation's
    message with ``payload_json.device.status`` (quarantined or not) worked for some devices and not others."""
    mac3, gone = "02:00:00:00:00:03", "02:00:00:00:00:04"
    rec = Recorder(broker, [f"iotgw/{GW}/event/#"])
    alerts = make_alerts(store, broker.url, running)
    assert alerts.device_wait_s == 5.0  # two flushes of 2 s and a second
    alerts.device_wait_s = 60  # a slow machine must not turn the wait into a publish without the device
    wait_until(alerts.link.connected.is_set)
    alerts.send(Alert("new_device", time.time(), mac3, {"vendor": "Espressif", "name": None, "ip": "192.168.1.30"}))
    alerts.send(Alert("device_offline", time.time(), MAC1, EXAMPLES["device_offline"][1]))
    time.sleep(1.5)  # the tracker's flush comes later than the publisher's next pass
    now = time.time()
    with store.transaction() as t:
        t.add(Device(mac=mac3, first_seen=now, last_seen=now, vendor="Espressif", status="quarantined"))
    first, after = rec.wait(lambda m: "/event/" in m.topic, count=2)
    assert first.json()["device"]["status"] == "quarantined" and first.json()["device"]["vendor"] == "Espressif"
    assert after.json()["kind"] == "device_offline"  # waited behind it: the order holds

    # A device forgotten (or never stored) before its alert went out does not hold the alerts forever.
    alerts.device_wait_s = 0.5
    alerts.send(Alert("new_device", time.time(), gone, {"vendor": None, "name": None, "ip": None}))
    alerts.send(Alert("device_online", time.time(), MAC1, {"offline_s": 5.0}))
    late = rec.wait(lambda m: "/event/" in m.topic, count=4)[2:]
    assert [(m.json()["kind"], m.json()["device"]) for m in late][0] == ("new_device", None)
    assert late[1].json()["kind"] == "device_online"
    rec.close()


def test_a_device_state_goes_out_when_what_it_shows_changes_and_its_counters_once_a_minute(store, broker, running):
    """The daemon says a device changed at every flush of its packets (2 s). Each time the publisher read the whole
    day's query log for its counters (about 0.7 s at 200,000 queries) and sent its state: in a busy home a pass took
    seconds per active device, alerts waited behind it, and Home Assistant recorded a state every 2 s a device."""
    rec = Recorder(broker, [f"iotgw/{GW}/#"])
    cfg = Config()
    cfg.gateway.name, cfg.mqtt.url = "home gw", broker.url
    alerts = Alerts(store, cfg, state_interval_s=3600)  # the minute's refresh is brought on below, not waited for
    alerts.start()
    running.append(alerts)
    topic = f"iotgw/{GW}/device/iotgw_{GW}_020000000001/state"
    assert rec.wait(lambda m: m.topic == topic)[-1].json()["queries_today"] == 0
    rec.clear()
    with store.querylog_session() as s:
        s.add_all(Query(ts=time.time(), client="192.168.1.20", mac=MAC1, qname="a.example.com", qtype=1,
                        sld="example.com", verdict="allowed", source="dns") for _ in range(5))
        s.commit()
    alerts.device_changed(MAC1)  # its packets were flushed: last_seen moved, nothing Home Assistant shows
    for mark in ("1", "2"):  # the second alert goes out in a pass that began after the change was taken
        alerts.send(Alert("model_updated", time.time(), None, {"version": mark, "previous_version": None}))
        rec.wait(lambda m, mark=mark: m.topic.endswith("/event/model_updated") and m.json()["data"]["version"] == mark)
    assert not rec.on(lambda m: m.topic == topic)

    with store.transaction() as t:  # what it shows changed: sent at once
        t.get(Device, MAC1).status = "quarantined"
    alerts.device_changed(MAC1)
    assert rec.wait(lambda m: m.topic == topic)[-1].json()["quarantine"] == "ON"
    rec.publish("homeassistant/status", "online")  # like the minute's refresh, reads the counters again
    rec.wait(lambda m: m.topic == topic and m.json()["queries_today"] == 5)
    rec.close()


def test_broker_outage_under_a_burst_loses_nothing_and_keeps_order(store, broker, running):
    rec = Recorder(broker, [f"iotgw/{GW}/event/#"])
    alerts = make_alerts(store, broker.url, running)
    n = 600
    for i in range(n):
        data = {"round": i, "status": "finished", "error": None}
        alerts.send(Alert("federated_round", time.time(), None, data))
        if i == 150:
            broker.stop()  # mid-burst: some sent, some in flight, the rest not yet handed over
    time.sleep(2)
    assert outbox_rows(store) > 0
    broker.start()

    def first_seen() -> list[int]:  # QoS 1 is at least once: a resend may repeat, never reorder
        return list(dict.fromkeys(m.json()["data"]["round"] for m in rec.on(lambda m: True)))

    wait_until(lambda: len(first_seen()) >= n, timeout=90)  # count distinct alerts, not deliveries
    assert first_seen() == list(range(n))
    wait_until(lambda: outbox_rows(store) == 0)
    rec.close()


def test_daemon_killed_with_unsent_alerts_sends_them_after_restart(store, tmp_path, running):
    (tmp_path / "kb").mkdir()
    broker = Mosquitto(tmp_path / "kb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        # The broker is up: the daemon says online; killed, its last will says offline.
        broker.start()
        rec = Recorder(broker, ["iotgw/killtest/#"])
        daemon = subprocess.Popen([sys.executable, str(ROOT / "tests" / "alerts_daemon.py"), store.url,
                                   broker.url, "0"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        rec.wait(lambda m: m.topic == "iotgw/killtest/status" and m.payload == b"online")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        rec.wait(lambda m: m.topic == "iotgw/killtest/status" and m.payload == b"offline")
        broker.stop()

        # The broker is away: alerts pile up in the outbox; the daemon dies with them unsent.
        daemon = subprocess.Popen([sys.executable, str(ROOT / "tests" / "alerts_daemon.py"), store.url,
                                   broker.url, "50"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert daemon.stdout.readline().strip() == "sent"
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        assert outbox_rows(store) == 50

        broker.start()
        make_alerts(store, broker.url, running, name="killtest")
        got = rec.wait(lambda m: "/event/" in m.topic, count=50)
        assert list(dict.fromkeys(m.json()["data"]["version"] for m in got)) == [f"v{i}" for i in range(50)]
        wait_until(lambda: outbox_rows(store) == 0)
        rec.close()
    finally:
        broker.stop()


def test_overflow_drops_the_oldest_and_says_so(store, tmp_path, running):
    d = tmp_path / "ob"
    d.mkdir()
    broker = Mosquitto(d)  # configured but not started: the gateway cannot publish
    alerts = make_alerts(store, broker.url, running, outbox_max=10)
    t0 = time.time()
    for i in range(25):
        alerts.send(Alert("model_updated", t0 + i, None, {"version": f"v{i}", "previous_version": None}))
    assert outbox_rows(store) == 10
    assert alerts.outbox.dropped_total() == 16  # 15 over the bound, and one more to make room for the notice
    try:
        broker.start()
        rec = Recorder(broker, [f"iotgw/{GW}/event/#"])
        got = rec.wait(lambda m: True, count=10)
        bodies = [m.json() for m in got]
        notice = next(b for b in bodies if b["kind"] == "alerts_dropped")
        assert notice["data"] == {"dropped": 16, "oldest_ts": t0, "newest_ts": t0 + 15}
        kept = [b["data"]["version"] for b in bodies if b["kind"] == "model_updated"]
        assert kept == [f"v{i}" for i in range(16, 25)]  # the newest survive, in order
        rec.close()
    finally:
        broker.stop()


@contextmanager
def three_alerts_in_flight(store, tmp_path, running) -> Iterator[tuple[Recorder, Alerts, Config, float]]:  # noqa: ANN001
    """A publisher whose outbox holds 10, its mosquitto paused (connected, never acknowledging) once v0..v2 (versions
    "0".."2") are with paho: those stay in flight. Yields (recorder, alerts, config, t0); the broker resumes on leaving
    and the outbox empties."""
    d = tmp_path / "paused"
    d.mkdir()
    broker = Mosquitto(d)
    broker.start()
    try:
        rec = Recorder(broker, [f"iotgw/{GW}/event/#"])
        cfg = Config()
        cfg.gateway.name, cfg.mqtt.url, cfg.mqtt.outbox_max = "home gw", broker.url, 10
        alerts = Alerts(store, cfg, max_inflight=3)
        alerts.start()
        running.append(alerts)
        wait_until(alerts.link.connected.is_set)
        broker.proc.send_signal(signal.SIGSTOP)
        t0 = time.time()
        for i in range(3):
            alerts.send(Alert("model_updated", t0 + i, None, {"version": f"{i}", "previous_version": None}))
        wait_until(lambda: alerts.outbox.handed_over == 3)
        yield rec, alerts, cfg, t0
        broker.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: outbox_rows(store) == 0, timeout=60)
        rec.close()
    finally:
        if broker.proc:
            broker.proc.send_signal(signal.SIGCONT)
        broker.stop()


def test_overflow_spares_and_does_not_count_alerts_already_handed_to_the_broker(store, tmp_path, running):
    """Alerts handed to the MQTT client are delivered once the broker answers, whatever the outbox does: an
    overflow that deleted them counted them as dropped although they arrived."""
    n = 25
    with three_alerts_in_flight(store, tmp_path, running) as (rec, alerts, _, t0):
        for i in range(3, n):
            alerts.send(Alert("model_updated", t0 + i, None, {"version": f"{i}", "previous_version": None}))
    bodies = [m.json() for m in rec.on(lambda m: True)]
    delivered = {b["data"]["version"] for b in bodies if b["kind"] == "model_updated"}
    assert {"0", "1", "2"} <= delivered
    notice = next(b for b in bodies if b["kind"] == "alerts_dropped")["data"]
    lost = [i for i in range(n) if f"{i}" not in delivered]
    assert notice == {"dropped": len(lost), "oldest_ts": t0 + lost[0], "newest_ts": t0 + lost[-1]}
    assert alerts.outbox.dropped_total() == len(lost)


def test_alerts_of_the_federation_command_never_drop_what_the_daemon_handed_to_the_broker(store, tmp_path, running):
    """`iotgw federation join` records its alerts through an outbox of its own, which cannot know what the daemon's
    publisher handed to paho: its overflow deleted those rows and counted them as dropped although they arrived."""
    from gateway.federation import outbox_sender

    n = 25
    with three_alerts_in_flight(store, tmp_path, running) as (rec, alerts, cfg, t0):
        federation = outbox_sender(store, cfg)  # as the federation process makes it
        for i in range(3, n):
            federation(Alert("federated_round", t0 + i, None, {"round": i, "status": "ok", "error": None}))
    bodies = [m.json() for m in rec.on(lambda m: True)]
    delivered = {int(b["data"].get("version") or b["data"].get("round") or 0) for b in bodies
                 if b["kind"] in ("model_updated", "federated_round")}
    lost = [i for i in range(n) if i not in delivered]
    assert {0, 1, 2} <= delivered
    assert alerts.outbox.dropped_total() == len(lost)  # what was counted lost is what never arrived


def test_observed_events_become_presence_and_blocked_summaries(store, broker, running):
    rec = Recorder(broker, [f"iotgw/{GW}/event/#"])
    alerts = make_alerts(store, broker.url, running)
    now = time.time()
    for i in range(40):  # MAC2 was idle for an hour: back online with its first query
        alerts.observe(DnsQuery(now + i * 0.01, "192.168.1.9", MAC2, f"ads{i % 3}.example", 1, "example.com",
                                verdict="blocked"))
    online = rec.wait(lambda m: m.topic.endswith("/device_online"))
    assert online[0].json()["mac"] == MAC2
    summary = rec.wait(lambda m: m.topic.endswith("/blocked_summary"))  # one per interval, not 40
    time.sleep(1.5)
    assert len(rec.on(lambda m: m.topic.endswith("/blocked_summary"))) == 1
    data = summary[0].json()["data"]
    assert data["count"] == 40 and data["top"][0] == {"name": "ads0.example", "count": 14}
    rec.close()
