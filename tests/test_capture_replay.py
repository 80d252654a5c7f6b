"""Replay of capture files through the live path, on real captures from ../shared/data."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from gateway.capture.frames import MalformedPacket, parse_frame
from gateway.capture.pcap import PcapError, read_frames
from gateway.capture.replay import replay
from gateway.events import Counters, DeviceSeen, DhcpSeen, DnsQuery, Event
from tests.cooked_capture import SENTINEL_GATEWAY, as_cooked
from tests.shared_data import CAPTURES, needs_data


def _direct(path: Path) -> list[Event]:
    """What live capture makes of the file's frames: each sender's presence once, then each frame's events."""
    from gateway.capture.frames import Senders

    out: list[Event] = []
    senders = Senders()
    try:
        for ts, frame in read_frames(path):
            out += senders.first(frame, ts) if frame[6:12] not in senders.known else []
            try:
                out.extend(parse_frame(frame, ts, others=True, source="replay"))
            except MalformedPacket:
                pass
    except PcapError:  # a file cut short: the events of its complete records
        pass
    return out


@needs_data
def test_replay_gives_the_same_events_as_parsing_directly():
    pcap = sorted((CAPTURES / "HueBridge").glob("*.pcap"))[0]
    got: list[Event] = []
    counters = Counters()
    result = replay([pcap], got.extend, counters=counters)
    assert got == _direct(pcap)
    assert any(isinstance(e, DhcpSeen) for e in got) and any(isinstance(e, DnsQuery) for e in got)
    assert all(e.source == "replay" for e in got if isinstance(e, DnsQuery))
    assert result.events == len(got) and result.errors == []
    assert result.frames == counters.get("replay_frames") == sum(1 for _ in read_frames(pcap))


@needs_data
@pytest.mark.parametrize("linktype", [113, 276])
def test_replay_of_a_cooked_capture_gives_the_ethernet_ones_events_but_the_capturing_hosts(tmp_path, linktype):
    pcap = sorted((CAPTURES / "HueBridge").glob("*.pcap"))[0]
    cooked = tmp_path / "any.pcap"
    own = as_cooked(pcap, cooked, linktype, host=SENTINEL_GATEWAY)
    got: list[Event] = []
    counters = Counters()
    result = replay([cooked], got.extend, counters=counters)
    assert got == [e for e in _direct(pcap) if e.mac != SENTINEL_GATEWAY]
    assert (result.skipped.outgoing, result.skipped.total, counters.get("replay_skipped")) == (own, own, own)
    assert result.frames == sum(1 for _ in read_frames(pcap)) - own and result.errors == []


@needs_data
def test_replay_reports_a_corrupt_file_by_name_and_goes_on(tmp_path):
    first, last = sorted((CAPTURES / "HueBridge").glob("*.pcap"))[:2]
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"this is not a capture file" * 10)
    truncated = tmp_path / "truncated.pcap"  # a real capture cut mid-record: what it holds is kept, and named
    truncated.write_bytes(first.read_bytes()[:5000])
    got: list[Event] = []
    result = replay([first, garbage, truncated, tmp_path / "missing.pcap", last], got.extend)
    assert len(result.errors) == 3
    assert "garbage.pcap" in result.errors[0] and "missing.pcap" in result.errors[2]
    assert f"{truncated}: truncated after " in result.errors[1]
    # a sender is present once per replay, at its first frame in the first file that has one, stamped with its
    # earliest frame in all of them: the second capture is months older than the first
    earliest: dict[str, float] = {}
    for path in (first, last):
        for ts, frame in read_frames(path):
            mac = frame[6:12].hex(":")
            earliest[mac] = min(earliest.get(mac, ts), ts)
    assert min(ts for ts, _ in read_frames(last)) < min(ts for ts, _ in read_frames(first))
    expected = [DeviceSeen(earliest[e.mac], e.mac, e.ip) if isinstance(e, DeviceSeen) else e for e in _direct(first)]
    expected += [e for e in _direct(truncated) + _direct(last) if not isinstance(e, DeviceSeen)]
    assert got == expected and len(_direct(last)) > 0


def test_realtime_replay_keeps_the_recorded_spacing(tmp_path):
    frames = [Ether(src="02:00:00:00:00:01") / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=4000, dport=53)
              / DNS(rd=1, qd=DNSQR(qname=f"q{i}.example.com")) for i in range(3)]
    for i, frame in enumerate(frames):
        frame.time = 1000.0 + 0.4 * i
    pcap = tmp_path / "spaced.pcap"
    wrpcap(str(pcap), frames)
    arrivals: list[tuple[float, list[str]]] = []
    replay([pcap], lambda evs: arrivals.append((time.monotonic(), [e.qname for e in evs if isinstance(e, DnsQuery)])),
           realtime=True)
    assert [names for _, names in arrivals] == [["q0.example.com"], ["q1.example.com"], ["q2.example.com"]]
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(gap >= 0.35 for gap in gaps), gaps
    fast: list[Event] = []
    replay([pcap], fast.extend)
    # recorded times, not wall time (the first is also the sender's presence)
    assert [e.ts for e in fast] == pytest.approx([1000.0, 1000.0, 1000.4, 1000.8])


def test_replay_reports_each_sender_present_from_its_first_frame_as_identify_counts_it(tmp_path):
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.dns import DNSRR

    from gateway.capture.windows import capture_windows

    client, resolver, router, broken = (f"02:00:00:00:00:{n}" for n in ("01", "53", "67", "77"))
    reply = (Ether(src=router, dst=client) / IP(src="10.0.0.254", dst="10.0.0.7") / UDP(sport=67, dport=68)
             / BOOTP(op=2, chaddr=bytes.fromhex(client.replace(":", "")), yiaddr="10.0.0.7")
             / DHCP(options=[("message-type", "ack"), "end"]))
    frames = [
        reply,  # the router says nothing the parser reports, ever
        Ether(src=client) / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)
        / BOOTP(chaddr=bytes.fromhex(client.replace(":", ""))) / DHCP(options=[("message-type", "discover"), "end"]),
        Ether(src=resolver) / IP(src="10.0.0.1", dst="10.0.0.7") / UDP(sport=53, dport=40000)
        / DNS(qr=1, qd=DNSQR(qname="a.example.com"), an=DNSRR(rrname="a.example.com", rdata="10.9.9.9")),
        Ether(src=broken) / IP(src="10.0.0.8", dst="10.0.0.1") / UDP(sport=1000, dport=53) / (b"\xff" * 11),
        Ether(src="01:00:5e:00:00:fb") / IP(src="10.0.0.9", dst="224.0.0.251") / UDP(sport=5353, dport=5353)
        / DNS(qd=DNSQR(qname="x.local")),  # a multicast source is no device
        reply.copy(), reply.copy(),
    ]
    for i, frame in enumerate(frames):
        frame.time = 1000.0 + i
    pcap = tmp_path / "silent.pcap"
    wrpcap(str(pcap), frames)
    got: list[Event] = []
    result = replay([pcap], got.extend)
    presence = [(e.mac, e.ip, e.ts) for e in got if isinstance(e, DeviceSeen)]
    assert presence == [(router, "10.0.0.254", 1000.0), (client, None, 1001.0), (resolver, "10.0.0.1", 1002.0),
                        (broken, "10.0.0.8", 1003.0)]
    assert result.malformed == 1
    windows = capture_windows(pcap).devices  # what `iotgw identify` counts each device's window from
    assert {mac: ts for mac, _, ts in presence} == {mac: dev.first_ts for mac, dev in windows.items()}


@needs_data
def test_iotgw_replay_stores_the_devices_and_names_a_bad_file(tmp_path):
    import subprocess
    import sys

    from gateway.devices.service import get_device
    from gateway.store.db import Store

    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"not a capture")
    pcap = sorted((CAPTURES / "HueBridge").glob("*.pcap"))[0]
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "replay", "--db", db, str(bad), str(pcap)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "bad.pcap" in proc.stderr and "replayed 1 of 2 files" in proc.stdout
    mac = (CAPTURES / "HueBridge" / "_iotdevice-mac.txt").read_text().strip().lower()
    device = get_device(Store(db, migrate=False), mac).device
    assert device.name == "Philips-hue" and device.manufacturer == "Philips"


def test_a_device_replayed_from_a_capture_out_of_time_order_is_first_seen_at_its_earliest_frame(tmp_path):
    """Merged captures are not always in time order: a device's first frame in the file is not its first."""
    import subprocess
    import sys

    from gateway.devices.service import get_device
    from gateway.store.db import Store

    mac = "02:00:00:00:00:42"
    frames = []
    for ts, name in ((2000.0, "late.example.com"), (1000.0, "early.example.com"), (1500.0, "middle.example.com")):
        frame = (Ether(src=mac, dst="02:00:00:00:00:01") / IP(src="10.0.0.42", dst="10.0.0.1")
                 / UDP(sport=40000, dport=53) / DNS(rd=1, qd=DNSQR(qname=name)))
        frame.time = ts
        frames.append(frame)
    pcap = tmp_path / "merged.pcap"
    wrpcap(str(pcap), frames)
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "replay", "--db", db, str(pcap)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    device = get_device(Store(db, migrate=False), mac).device
    assert (device.first_seen, device.last_seen) == (1000.0, 2000.0)


def _query(mac: str, ts: float, name: str):
    frame = (Ether(src=mac, dst="02:00:00:00:00:01") / IP(src="10.0.0.42", dst="10.0.0.1")
             / UDP(sport=40000, dport=53) / DNS(rd=1, qd=DNSQR(qname=name)))
    frame.time = ts
    return frame


def _iotgw_replay(tmp_path: Path, *pcaps: Path, realtime: bool = False):
    """Run `iotgw replay` on ``pcaps`` (``realtime``: at recorded speed); the store it wrote."""
    import subprocess
    import sys

    from gateway.store.db import Store

    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    speed = ["--realtime"] if realtime else []
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "replay", "--db", db, *speed, *map(str, pcaps)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return Store(db, migrate=False)


@needs_data
def test_a_replay_leaves_the_homes_devices_to_the_daemon_when_the_model_changed(tmp_path):
    """A replay feeds its captures, and its alerts are on their clock. Its start re-identified the devices already
    in the store when they were last identified by another model: their answers changed, and alerts stamped
    today came out of a replay of 2016 captures. That is the daemon's to do, at its next start."""
    from sqlalchemy import update

    from gateway.alerts.outbox import recent_alerts
    from gateway.daemon import IDENTIFIED_BY_SETTING
    from gateway.devices.service import get_device
    from gateway.store.schema import Device, Identification

    folder = CAPTURES / "HueBridge"
    mac = (folder / "_iotdevice-mac.txt").read_text().strip().lower()
    store = _iotgw_replay(tmp_path, sorted(folder.glob("*.pcap"))[0])
    # As if an older model had called it unknown, and the home was last identified by that model.
    with store.transaction() as s:
        s.execute(update(Device).where(Device.mac == mac).values(
            manufacturer="unknown", device_type="unknown", category="unknown", known=False))
        s.execute(update(Identification).where(Identification.mac == mac).values(model_version="fed-r0"))
    store.set_setting(IDENTIFIED_BY_SETTING, "fed-r0")
    before = len(get_device(store, mac).identifications)
    store.close()

    # at recorded speed: a few seconds, long enough for any pass over one device
    store = _iotgw_replay(tmp_path, sorted((CAPTURES / "Aria").glob("Setup-C-13-*.pcap"))[0], realtime=True)
    device = get_device(store, mac)
    assert len(device.identifications) == before and device.device.device_type == "unknown"
    assert not [a for a in recent_alerts(store) if a.mac == mac and "previous_device_type" in a.data]
    assert store.get_setting(IDENTIFIED_BY_SETTING) == "fed-r0"


def test_files_replayed_out_of_date_order_start_a_device_and_its_window_at_its_earliest_frame(tmp_path):
    """The newer capture given first: the device is new at its earliest frame (alert and window), the newer
    frames fall outside its window instead of closing it before the older ones arrive, and its window is closed
    and identified when the replay ends."""
    from gateway.alerts.outbox import recent_alerts
    from gateway.devices.service import get_device
    from gateway.store.schema import ObservationWindow

    mac = "02:00:00:00:00:42"
    newer, older = tmp_path / "newer.pcap", tmp_path / "older.pcap"
    wrpcap(str(newer), [_query(mac, 2000.0, "late.example.com")])
    wrpcap(str(older), [_query(mac, 1000.0, "early.example.com"), _query(mac, 1010.0, "second.example.com")])
    store = _iotgw_replay(tmp_path, newer, older)
    new_device = [a for a in recent_alerts(store, mac=mac) if a.kind == "new_device"]
    assert [a.ts for a in new_device] == [1000.0]
    with store.session() as s:
        window = s.get(ObservationWindow, mac)
        assert window.started_at == 1000.0
        assert [o["name"] for o in window.observations] == ["early.example.com", "second.example.com"]
    assert len(get_device(store, mac).identifications) == 1  # the window was closed, not left open
    # out of time order, a gap in what was replayed so far may yet be filled: nobody goes offline
    assert not [a for a in recent_alerts(store) if a.kind in ("device_offline", "device_online")]


def test_replay_presence_follows_the_capture_clock_not_the_wall_clock(tmp_path):
    """A device silent in the capture for longer than the idle timeout (600 s) goes offline at the capture's
    moment it became so, and online at its next frame; the end of the capture takes no one offline."""
    from gateway.alerts.outbox import recent_alerts

    quiet, chatty = "02:00:00:00:00:42", "02:00:00:00:00:43"
    frames = [_query(quiet, 1000.0, "a.example.com"), _query(quiet, 1010.0, "b.example.com"),
              _query(chatty, 1700.0, "c.example.com"), _query(quiet, 2000.0, "d.example.com"),
              _query(chatty, 2100.0, "e.example.com")]
    pcap = tmp_path / "gap.pcap"
    wrpcap(str(pcap), frames)
    store = _iotgw_replay(tmp_path, pcap)
    presence = [(a.kind, a.ts, a.mac, a.data) for a in reversed(recent_alerts(store))
                if a.kind in ("device_offline", "device_online")]
    assert presence == [
        ("device_offline", 1610.0, quiet, {"last_seen": 1010.0, "idle_timeout_s": 600.0}),
        ("device_online", 2000.0, quiet, {"offline_s": 990.0}),
    ]


@pytest.mark.parametrize("order", ["in time order", "out of time order"])
def test_every_device_replayed_is_identified_when_the_replay_ends_even_one_whose_capture_ends_in_its_window(
        tmp_path, order):
    """A device whose frames all lie within its first minute (the capture ends, or it went quiet) is answered when
    the replay ends, as `iotgw identify` answers it, not left without an identification: a fast replay ends
    long before the wall clock would have closed its window."""
    from gateway.devices.service import get_device

    brief, other = "02:00:00:00:00:44", "02:00:00:00:00:45"
    first, second = tmp_path / "first.pcap", tmp_path / "second.pcap"
    wrpcap(str(first), [_query(brief, 1000.0, "a.example.com"), _query(brief, 1005.0, "b.example.com")])
    wrpcap(str(second), [_query(other, 500.0 if order == "out of time order" else 2000.0, "c.example.com")])
    store = _iotgw_replay(tmp_path, first, second)
    assert len(get_device(store, brief).identifications) == 1
    assert len(get_device(store, other).identifications) == 1


@needs_data
def test_a_replayed_device_is_identified_on_the_captures_clock_like_its_other_alerts(tmp_path):
    """A 2016 capture's identifications (stored history and alert) are stamped at the capture's moment of the
    decision, within the device's first minute: they were stamped with today's wall clock, after alerts of the
    same capture from 2016."""
    from gateway.alerts.outbox import recent_alerts
    from gateway.devices.service import get_device

    folder = CAPTURES / "HueBridge"
    pcap = sorted(folder.glob("*.pcap"))[0]
    mac = (folder / "_iotdevice-mac.txt").read_text().strip().lower()
    store = _iotgw_replay(tmp_path, pcap)
    device = get_device(store, mac)
    first = device.device.first_seen
    assert first < time.time() - 86400 * 365  # an old capture: the wall clock is years away
    stamps = [i.ts for i in device.identifications]
    stamps += [a.ts for a in recent_alerts(store) if a.mac == mac and a.kind in ("device_identified", "unknown_device")]
    assert len(stamps) >= 2
    assert all(first <= ts <= first + 60 for ts in stamps), (first, stamps)


@needs_data
def test_a_capture_replayed_out_of_time_order_is_decided_where_and_when_identify_decides_it(tmp_path, capsys):
    """A real capture cut in two and given later half first: the device's session used to read its frames in
    that order, so its decision (and when it came) differed from `iotgw identify` on the same frames."""
    from scapy.utils import rdpcap

    from gateway import cli
    from gateway.devices.service import get_device

    folder = CAPTURES / "HueBridge"
    pcap = sorted(folder.glob("*.pcap"))[0]
    mac = (folder / "_iotdevice-mac.txt").read_text().strip().lower()
    frames = rdpcap(str(pcap))
    early, late = tmp_path / "early.pcap", tmp_path / "late.pcap"
    wrpcap(str(early), frames[: len(frames) // 2])
    wrpcap(str(late), frames[len(frames) // 2:])
    assert cli.main(["identify", "--json", "--window", "60", str(pcap)]) == 0
    want = next(r for r in map(json.loads, capsys.readouterr().out.splitlines()) if r["mac"] == mac)
    store = _iotgw_replay(tmp_path, late, early)
    got = get_device(store, mac).identifications[0]
    assert (got.device_type, round(got.confidence, 4), round(got.decided_after_s, 3)) == (
        want["device_type"], want["confidence"], want["decided_after_s"])


def test_a_window_full_out_of_time_order_keeps_the_devices_earliest_observations_as_in_order(tmp_path):
    """A device that fills its window (WINDOW_MAX_OBS) in its first minute, its later half given first: the window
    kept the first observations to arrive, the later half, and the session read those at close instead of the
    device's first ones, which the same frames in order (and `iotgw identify`) read."""
    from gateway.daemon import WINDOW_MAX_OBS
    from gateway.devices.service import get_device
    from gateway.store.schema import ObservationWindow

    mac = "02:00:00:00:00:46"
    early, late = tmp_path / "early.pcap", tmp_path / "late.pcap"
    wrpcap(str(early), [_query(mac, 1000.0 + i / 100, f"early{i}.example.com") for i in range(WINDOW_MAX_OBS)])
    wrpcap(str(late), [_query(mac, 1030.0 + i / 100, f"late{i}.example.com") for i in range(WINDOW_MAX_OBS)])
    seen = {}
    for order, files in (("in order", (early, late)), ("out of order", (late, early))):
        (tmp_path / order).mkdir()
        store = _iotgw_replay(tmp_path / order, *files)
        with store.session() as s:
            names = [o["name"] for o in s.get(ObservationWindow, mac).observations]
        got = get_device(store, mac).identifications
        seen[order] = names, [(i.ts, i.device_type, i.confidence, i.decided_after_s) for i in got]
        store.close()
    assert seen["in order"][0] == [f"early{i}.example.com" for i in range(WINDOW_MAX_OBS)]
    assert seen["out of order"] == seen["in order"]


def _relayed_request(relay: str, client: str, ts: float, hostname: str):
    from scapy.layers.dhcp import BOOTP, DHCP

    frame = (Ether(src=relay, dst="02:00:00:00:00:01") / IP(src="10.1.0.1", dst="10.0.0.1") / UDP(sport=67, dport=67)
             / BOOTP(chaddr=bytes.fromhex(client.replace(":", "")), giaddr="10.1.0.1")
             / DHCP(options=[("message-type", "request"), ("hostname", hostname.encode()), "end"]))
    frame.time = ts
    return frame


def test_a_relayed_client_replayed_out_of_time_order_has_its_window_from_its_earliest_request(tmp_path):
    """A client a relay agent speaks for sends no frame of its own, so the first pass has no earliest time for
    it: its window started at its first request to arrive, the later one, took the earlier one at a negative
    offset and the later one with it, unlike `iotgw identify` (and the same frames in order): from its earliest
    request, the later one left out."""
    from gateway.devices.service import get_device
    from gateway.store.schema import ObservationWindow

    relay, client = "02:00:00:00:00:47", "02:00:00:00:00:48"
    newer, older = tmp_path / "newer.pcap", tmp_path / "older.pcap"
    wrpcap(str(newer), [_relayed_request(relay, client, 2000.0, "late-name")])
    wrpcap(str(older), [_relayed_request(relay, client, 1000.0, "early-name")])
    store = _iotgw_replay(tmp_path, newer, older)
    with store.session() as s:
        window = s.get(ObservationWindow, client)
        assert (window.started_at, [o["hostname"] for o in window.observations]) == (1000.0, ["early-name"])
    assert get_device(store, client).device.first_seen == 1000.0
    assert all(i.ts <= 1060.0 for i in get_device(store, client).identifications)


def test_a_replay_stopped_part_way_ends_at_once_and_stores_no_guess_from_half_a_window(tmp_path):
    """Ctrl-C (or SIGTERM) during `iotgw replay --realtime` of a 40 s capture: the replay thread slept on to the
    capture's end before the program could exit, and then answered the device's half window with a guess that
    stayed stored. Now it ends at once; the device is kept, its identification left to a full replay."""
    import signal
    import subprocess
    import sys

    from gateway.devices.service import get_device
    from gateway.store.db import Store

    mac = "02:00:00:00:00:46"
    pcap = tmp_path / "slow.pcap"
    wrpcap(str(pcap), [_query(mac, 1000.0, "a.example.com"), _query(mac, 1001.0, "b.example.com"),
                       _query(mac, 1040.0, "c.example.com")])
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "replay", "--db", db, "--realtime", str(pcap)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the device is in the store: its first frames were replayed
            time.sleep(0.2)
            if (tmp_path / "iotgw.sqlite").exists():
                store = Store(db, migrate=False)
                try:
                    with contextlib.suppress(Exception):  # the replay may not have made its tables yet
                        if get_device(store, mac) is not None:
                            break
                finally:
                    store.close()
        proc.send_signal(signal.SIGINT)  # Ctrl-C; SIGTERM does the same
        proc.wait(timeout=20)  # the capture has 39 s still to go
    finally:
        proc.kill()
    assert proc.returncode == 130
    store = Store(db, migrate=False)
    assert get_device(store, mac).identifications == []


@needs_data
def test_iotgw_replay_reads_a_capture_from_a_pipe(tmp_path):
    """The first pass over the files (each sender's earliest time) must leave a pipe to the replay: read there, it
    was empty the second time and the replay said so."""
    import subprocess
    import sys

    from gateway.devices.service import get_device
    from gateway.store.db import Store

    pcap = sorted((CAPTURES / "HueBridge").glob("*.pcap"))[0]
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    proc = subprocess.run(["bash", "-c", '"$0" -m gateway.cli replay --db "$1" <(gzip -c "$2")',
                           sys.executable, db, str(pcap)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "replayed 1 of 1 files" in proc.stdout
    mac = (CAPTURES / "HueBridge" / "_iotdevice-mac.txt").read_text().strip().lower()
    device = get_device(Store(db, migrate=False), mac).device
    first = next(ts for ts, frame in read_frames(pcap) if frame[6:12] == bytes.fromhex(mac.replace(":", "")))
    assert device.name == "Philips-hue" and device.first_seen == pytest.approx(first)


def test_a_pipe_given_with_other_captures_makes_the_replay_out_of_time_order(tmp_path):
    """The first pass cannot read a pipe, so it cannot tell whether the pipe's frames come before the other files'.
    Taken as in time order, the older capture piped in after the newer file was replayed as if in order: the
    device's window started at its newer frame and took the older ones after it, out of order."""
    import subprocess
    import sys

    from gateway.store.db import Store
    from gateway.store.schema import ObservationWindow

    mac = "02:00:00:00:00:42"
    newer, older = tmp_path / "newer.pcap", tmp_path / "older.pcap"
    wrpcap(str(newer), [_query(mac, 2000.0, "late.example.com")])
    wrpcap(str(older), [_query(mac, 1000.0, "early.example.com"), _query(mac, 1010.0, "second.example.com")])
    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    proc = subprocess.run(["bash", "-c", '"$0" -m gateway.cli replay --db "$1" "$2" <(cat "$3")',
                           sys.executable, db, str(newer), str(older)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "replayed 2 of 2 files" in proc.stdout, proc.stderr
    with Store(db, migrate=False).session() as s:  # as when both are files given out of date order
        window = s.get(ObservationWindow, mac)
        assert window.started_at == 1000.0
        assert [o["name"] for o in window.observations] == ["early.example.com", "second.example.com"]
