"""The gateway's side of federation: confirmed devices out of a real store, round alerts through the outbox.

The store is filled the real way: ``iotgw replay`` feeds IoT-Sentinel captures through the capture path
(devices, identifications, observation windows), and the owner's confirmations go through the device service
the web UI calls. Alerts go through the durable outbox and are published by the daemon's ``Alerts`` to a real
mosquitto.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.alerts.outbox import recent_alerts
from gateway.alerts.publisher import Alerts
from gateway.config import Config
from gateway.devices import service
from gateway.federation import PSEUDO_MIN_CONFIDENCE, RoundAlerts, export_windows, outbox_sender
from gateway.overview import model_status
from gateway.store.db import Store
from gateway.store.schema import Device, ObservationWindow, OutboxMessage
from identifier.bundle import Bundle
from identifier.federated import homedata, model
from tests.broker import Mosquitto, Recorder
from tests.shared_data import CAPTURES, needs_data
from tests.unprivileged import GID, UID, needs_root, open_scratch, with_python_reachable

ROOT = Path(__file__).resolve().parents[1]
PLUG, CAM, HUB = "50:c7:bf:00:c7:03", "b0:c5:54:25:5b:0e", "00:17:88:24:76:ff"


def iotgw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gateway state directory after replaying a TP-Link plug, a D-Link camera and a Hue bridge joining."""
    if not CAPTURES.is_dir():
        pytest.skip("no shared data")
    state = tmp_path_factory.mktemp("gateway")
    config = state / "iotgw.toml"
    config.write_text(f'[gateway]\nstate_dir = "{state}"\n')
    pcaps = [str(CAPTURES / d / "Setup-A-1-STA.pcap") for d in ("TP-LinkPlugHS110", "D-LinkCam", "HueBridge")]
    done = iotgw("replay", "--config", str(config), *pcaps)
    assert done.returncode == 0, done.stderr[-2000:]
    return state


@needs_data
def test_export_writes_the_owner_s_confirmed_devices_with_their_windows(replayed: Path, tmp_path: Path) -> None:
    store = Store(f"sqlite:///{replayed / 'iotgw.sqlite'}")
    try:
        with store.session() as s:
            identified = {d.mac: d for d in s.query(Device).filter(Device.device_type.is_not(None))}
            stored = {w.mac: w for w in s.query(ObservationWindow)}
        assert {PLUG, CAM, HUB} <= set(identified)  # the replay identified all three
        assert identified[HUB].confidence >= PSEUDO_MIN_CONFIDENCE
        out = tmp_path / "confirmed.jsonl"
        assert export_windows(store, out).owner == 0 and out.read_text() == ""  # nothing confirmed yet

        service.label(store, PLUG, manufacturer="TP-Link", device_type="TP-LinkPlugHS110", category="plug")
        service.label(store, CAM, manufacturer="D-Link", device_type="D-LinkDayCam", category="camera")  # corrected
        exported = export_windows(store, out)
        assert (exported.owner, exported.pseudo, exported.without_window) == (2, 0, 0)
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(r["mac"], r["device_type"], r["source"]) for r in lines] == [
            (PLUG, "TP-LinkPlugHS110", "owner"),
            (CAM, "D-LinkDayCam", "owner"),  # the owner's correction, not the model's guess
        ]
        windows = homedata.load(out)
        for window, mac in zip(windows, (PLUG, CAM), strict=True):
            assert [o.ts for o in window.observations] == [o["t"] for o in stored[mac].observations]
        shipped = Bundle.load()
        data = model.samples(shipped, windows)  # what the ClientApp trains on: timed prefixes, real features
        type_ids = {shipped.labels["device_type"][i] for i in data.y[:, 1] if i >= 0}
        assert type_ids == {"D-LinkDayCam", "TP-LinkPlugHS110"} and len(data.y) > 8

        # Pseudo-labels: the unconfirmed identifications sure enough, and no other.
        unsure = next(mac for mac in identified if mac not in (PLUG, CAM, HUB))
        with store.transaction() as s:
            s.get(Device, unsure).confidence = PSEUDO_MIN_CONFIDENCE - 0.2
        sure = {mac for mac, d in identified.items()
                if mac not in (PLUG, CAM, unsure) and d.confidence >= PSEUDO_MIN_CONFIDENCE and mac in stored}
        with_pseudo = export_windows(store, out, pseudo_labels=True)
        assert (with_pseudo.owner, with_pseudo.pseudo) == (2, len(sure))
        pseudo = {r["mac"]: r for r in map(json.loads, out.read_text().splitlines()) if r["source"] == "pseudo"}
        assert set(pseudo) == sure and HUB in sure and unsure not in pseudo
        assert pseudo[HUB]["device_type"] == "HueBridge"
    finally:
        store.close()


@pytest.fixture
def broker(tmp_path: Path):
    b = Mosquitto(tmp_path)
    b.start()
    yield b
    b.stop()


def test_round_log_becomes_alerts_published_from_the_outbox(tmp_path: Path, broker: Mosquitto) -> None:
    """A night as the ClientApp logs it: round 1 completes and the model is installed, round 2 stops after
    key sharing. The alerts land in the outbox (and history), and the daemon's publisher sends them."""
    store = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    cfg = Config()
    cfg.gateway.name = "home"
    cfg.mqtt.url = broker.url
    log = tmp_path / "rounds.log"
    log.write_text(json.dumps({"ts": 1.0, "event": "stage", "stage": "unmask", "round": "9", "run": 1}) + "\n")
    alerts = RoundAlerts(log, outbox_sender(store, cfg))  # last night's entries were reported last night
    night = [
        *({"event": "stage", "stage": st, "round": "1", "run": 5} for st in ("setup", "share_keys")),
        {"event": "stage", "stage": "collect_masked_vectors", "round": "1", "run": 5},
        {"event": "fit", "round": 1, "weight": 40},
        {"event": "stage", "stage": "unmask", "round": "1", "run": 5},
        {"event": "install", "installed": True, "reason": "installed", "accuracy": 0.9, "accuracy_before": 0.8,
         "round": 1, "version": "fed-5-r1-abcd1234", "previous_version": "20261121-d67c5e54-s0"},
        *({"event": "stage", "stage": st, "round": "2", "run": 5} for st in ("setup", "share_keys")),
    ]
    with log.open("a") as fh:
        for i, entry in enumerate(night):
            fh.write(json.dumps({"ts": 100.0 + i, **entry}) + "\n")
        fh.write('{"ts": 200.0, "event": "sta')  # a line being written: not read yet
    alerts.poll()
    kinds = [(a.kind, a.data.get("round"), a.data.get("status")) for a in reversed(recent_alerts(store))]
    assert kinds == [("federated_round", 1, "ok"), ("model_updated", 1, None)]
    alerts.finish()  # the window ends with round 2 open
    last = recent_alerts(store, 1)[0]
    assert (last.kind, last.data["round"], last.data["status"]) == ("federated_round", 2, "failed")
    assert "share_keys" in last.data["error"]
    shown = model_status(store, cfg).federation  # the web UI's model page: the last round, as it ended
    assert (shown["round"], shown["status"], shown["run_id"]) == (2, "failed", 5) and shown["at"]
    with store.session() as s:
        assert s.query(OutboxMessage).count() == 3  # durable until the broker acknowledges them

    recorder = Recorder(broker, ["iotgw/home/event/#"])
    publisher = Alerts(store, cfg)
    publisher.start()
    try:
        got = recorder.wait(lambda m: True, count=3)
        assert [m.topic.rsplit("/", 1)[1] for m in got] == ["federated_round", "model_updated", "federated_round"]
        body = got[1].json()["data"]
        assert (body["version"], body["previous_version"]) == ("fed-5-r1-abcd1234", "20261121-d67c5e54-s0")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and store.session().query(OutboxMessage).count():
            time.sleep(0.05)
        with store.session() as s:
            assert s.query(OutboxMessage).count() == 0
    finally:
        publisher.stop(drain_s=0)
        recorder.close()
        store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to another user needs root")
def test_keygen_and_join_run_as_root_leave_the_federation_state_to_the_state_directorys_owner(tmp_path: Path) -> None:
    """docs/federation.md has the admin run keygen with sudo; the nightly join then runs as the service user,
    which owns the state directory and must be able to read the key and replace the exported windows."""
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    os.chown(state, 4242, 4243)
    config = tmp_path / "iotgw.toml"
    config.write_text(f'[gateway]\nstate_dir = "{state}"\n')
    made = iotgw("federation", "keygen", "--out", str(state / "federation" / "node_key"))
    assert made.returncode == 0, made.stderr
    joined = iotgw("federation", "join", "--config", str(config), "--superlink", "127.0.0.1:9", "--insecure")
    assert joined.returncode == 0 and "no confirmed devices yet" in joined.stdout, joined.stderr
    fed = state / "federation"
    found = {p.name: (p.stat().st_uid, p.stat().st_gid, stat.S_IMODE(p.stat().st_mode))
             for p in (fed, fed / "node_key", fed / "node_key.pub", fed / "confirmed.jsonl")}
    assert found == {
        "federation": (4242, 4243, 0o700),
        "node_key": (4242, 4243, 0o600),
        "node_key.pub": (4242, 4243, 0o644),
        "confirmed.jsonl": (4242, 4243, 0o600),  # the household's devices and their traffic
    }
    assert sorted(p.name for p in fed.iterdir()) == ["confirmed.jsonl", "node_key", "node_key.pub"]


@needs_root
@needs_data
def test_a_join_run_as_root_names_a_file_its_supernode_user_cannot_use_and_starts_nothing(replayed: Path) -> None:
    """Run by root, the join starts the SuperNode as the state directory's owner. A root-only CA (an admin's
    0600 copy in /etc) would fail its TLS handshake, and a root-owned FLWR_HOME (left by a join run as root
    before) its start: the join names the file and starts nothing."""
    with open_scratch() as scratch:
        state = scratch / "state"
        state.mkdir(mode=0o750)
        os.chown(state, UID, GID)
        with sqlite3.connect(replayed / "iotgw.sqlite") as src, sqlite3.connect(state / "iotgw.sqlite") as dst:
            src.backup(dst)
        store = Store(f"sqlite:///{state / 'iotgw.sqlite'}")
        service.label(store, PLUG, manufacturer="TP-Link", device_type="TP-LinkPlugHS110", category="plug")
        store.close()
        ca = scratch / "ca.pem"
        ca.write_text("-----BEGIN CERTIFICATE-----\n")
        ca.chmod(0o600)
        config = scratch / "iotgw.toml"
        config.write_text(f'[gateway]\nstate_dir = "{state}"\n')
        join = [sys.executable, "-m", "gateway.cli", "federation", "join", "--config", str(config),
                "--superlink", "127.0.0.1:9", "--tls-ca", str(ca), "--window", "5"]
        done = subprocess.run(with_python_reachable(join, scratch), cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        fed = state / "federation"
        assert (done.returncode, done.stderr) == (
            1, f"iotgw federation: {ca}: not readable by uid {UID}, the owner of {fed}, whom the SuperNode runs as\n"
        ), done.stdout
        assert sorted(p.name for p in fed.iterdir()) == ["confirmed.jsonl"]  # no SuperNode, so no log, no FLWR_HOME
        ca.chmod(0o644)
        (fed / "flwr" / "bin").mkdir(mode=0o700, parents=True)
        left = subprocess.run(with_python_reachable(join, scratch), cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert (left.returncode, left.stderr) == (
            1, f"iotgw federation: {fed / 'flwr'}: not writable by uid {UID}, the owner of {fed}, whom the SuperNode "
            "runs as\n"
        ), left.stdout
        assert sorted(p.name for p in fed.iterdir()) == ["confirmed.jsonl", "flwr"]


def test_a_join_without_a_configured_superlink_says_so_and_succeeds(tmp_path: Path) -> None:
    """iotgw-federation.service runs `iotgw federation join --config /etc/iotgw/iotgw.toml` every night, also in
    homes that never joined a federation: that is not a failure."""
    config = tmp_path / "iotgw.toml"
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n')
    done = iotgw("federation", "join", "--config", str(config))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        f"iotgw federation: not configured ([federation] superlink is not set in {config}); not joining\n"
    )
    assert not (tmp_path / "state").exists()  # nothing exported, no store made


def test_a_join_takes_its_superlink_and_tls_from_the_config_and_its_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "iotgw.toml"
    missing_ca = tmp_path / "no-ca.pem"
    config.write_text(
        f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[federation]\nsuperlink = "127.0.0.1:9"\ntls_ca = "{missing_ca}"\ninsecure = true\n'
    )
    from_file = iotgw("federation", "join", "--config", str(config))  # the file's tls_ca, over its insecure
    assert (from_file.returncode, from_file.stderr) == (
        2, f"iotgw: configuration error: {config}: federation.tls_ca: {missing_ca}: no such file\n"
    )
    flagged = iotgw("federation", "join", "--config", str(config), "--insecure")
    assert flagged.returncode == 0, flagged.stderr
    assert "no confirmed devices yet" in flagged.stdout  # it went on to export: the SuperLink came from the file
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n[federation]\ninsecure = true\n')
    given = iotgw("federation", "join", "--config", str(config), "--superlink", "127.0.0.1:9")
    assert given.returncode == 0 and "no confirmed devices yet" in given.stdout, given.stderr
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n[federation]\nsuperlink = 9\n')
    bad = iotgw("federation", "join", "--config", str(config))
    assert bad.returncode != 0 and f"{config}:4: federation.superlink: expected str" in bad.stderr


def test_a_server_given_a_missing_tls_file_or_a_state_dir_that_is_a_file_names_the_flag(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("not used: the server stops before it reads it\n")
    tls = ["--tls-ca", str(pem), "--tls-cert", str(pem)]
    for flags, said in (
        ([*tls, "--tls-key", str(tmp_path / "no.key")], f"--tls-key: {tmp_path / 'no.key'}: no such file"),
        ([*tls, "--tls-key", str(tmp_path)], f"--tls-key: {tmp_path}: a directory, not a file"),
        (["--insecure", "--state-dir", str(pem)], f"--state-dir: {pem} is not a directory"),
    ):
        done = iotgw("federation", "server", "--state-dir", str(tmp_path / "link"), *flags)
        assert (done.returncode, done.stderr) == (2, f"iotgw: configuration error: {said}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem"]


def test_rollback_reinstalls_the_previous_bundle_and_says_so(tmp_path: Path) -> None:
    shipped = Bundle.load()
    state = tmp_path / "federation"  # under the gateway's state directory
    for link, version in (("previous", "fed-1-r3-00000001"), ("current", "fed-2-r3-00000002")):
        # the layout ModelStore.install writes: links to bundle directories beside them
        replace(shipped, version=version).save(state / "model" / f"bundle-{version}")
        os.symlink(f"bundle-{version}", state / "model" / link)
    config = tmp_path / "iotgw.toml"
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path}"\n')
    done = iotgw("federation", "rollback", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert Bundle.load(state / "model" / "current").version == "fed-1-r3-00000001"
    store = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    try:
        (alert,) = recent_alerts(store)
        assert alert.kind == "model_updated" and alert.data == {
            "version": "fed-1-r3-00000001", "previous_version": "fed-2-r3-00000002", "rolled_back": True,
        }
        with store.session() as s:
            assert s.query(OutboxMessage).count() == 0  # MQTT is off in this config: history only
    finally:
        store.close()
    again = iotgw("federation", "rollback", "--config", str(config))
    assert again.returncode == 1 and "no previous model" in again.stderr
