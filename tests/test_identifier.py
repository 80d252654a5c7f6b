"""Identification on real captures: the `iotgw identify` contract, streaming, hashing, the shipped bundle."""

from __future__ import annotations

import ast
import csv
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gateway import cli
from gateway.capture.pcap import read_frames
from gateway.capture.windows import capture_windows
from gateway.demo import demo_mac
from identifier.bundle import DEFAULT_DIR, Bundle, BundleError, Thresholds
from identifier.dataset import LabelledWindow, listed_category
from identifier.domains import brand
from identifier.evaluate import (
    OPEN_SET_GRID,
    choose_values,
    grid_points,
    leave_one_type_out,
    open_set_balance,
    pick,
    shipped_values,
    sibling_type_ceiling,
    spread_in_time,
)
from identifier.features import DEFAULT_FEATURES, FeatureState
from identifier.observation import DhcpObservation, DnsObservation
from identifier.oui import blocks, vendor
from identifier.stream import NAME_VOTE_FLOOR, NAME_VOTE_NET_POWER, Identifier, Identity
from identifier.train import answers_hash, name_vendors, type_info
from tests.cooked_capture import SENTINEL_GATEWAY, as_cooked
from tests.shared_data import CAPTURES, DOMAINS, needs_data

# these train a net: the base install (no `train` extra) has no torch
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="torch not installed (pip install -e '.[train]')")

ROOT = Path(__file__).resolve().parents[1]


def first_capture(folder: str) -> tuple[Path, str]:
    pcap = sorted((CAPTURES / folder).glob("*.pcap"))[0]
    return pcap, (CAPTURES / folder / "_iotdevice-mac.txt").read_text().strip().lower()


@pytest.fixture
def iotgw(capsys):
    """Run the real `iotgw` parser in-process; returns (exit code, stdout lines, stderr)."""

    def run(*argv: str):
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, [json.loads(line) for line in out.splitlines() if line.strip()], err

    return run


@needs_data
@pytest.mark.parametrize(
    "folder,device_type,manufacturer",
    [
        ("D-LinkSiren", "D-LinkSiren", "D-Link"),
        ("HueBridge", "HueBridge", "Philips"),
        ("WeMoSwitch", "WeMoSwitch", "Belkin"),
    ],
)
def test_identify_json_names_the_device_in_a_real_capture(iotgw, folder, device_type, manufacturer):
    pcap, mac = first_capture(folder)
    code, rows, _ = iotgw("identify", "--json", str(pcap))
    assert code == 0
    assert {r["mac"] for r in rows} == set(capture_windows(pcap, 30.0).devices)
    (row,) = [r for r in rows if r["mac"] == mac]
    assert set(row) == {
        "source",
        "mac",
        "manufacturer",
        "device_type",
        "category",
        "confidence",
        "decided_after_s",
        "known",
    }
    assert row["source"] == str(pcap)
    assert (row["manufacturer"], row["device_type"], row["known"]) == (manufacturer, device_type, True)
    assert 0.0 <= row["confidence"] <= 1.0
    assert row["decided_after_s"] is None or 0.0 <= row["decided_after_s"] <= 30.0


@needs_data
def test_window_limits_what_counts(iotgw):
    pcap, mac = first_capture("D-LinkSiren")
    _, rows, _ = iotgw("identify", "--json", "--window", "0.001", str(pcap))
    (row,) = [r for r in rows if r["mac"] == mac]
    # the siren's first packets are EAPOL: a millisecond shows only its MAC prefix, never its model
    assert row["decided_after_s"] is None or row["decided_after_s"] <= 0.001


@pytest.mark.parametrize("window", ["-5", "0", "nan", "inf", "-inf", "thirty"])
def test_a_window_that_is_not_a_finite_number_of_seconds_above_0_is_a_usage_error_naming_the_flag(
    iotgw, capsys, tmp_path, window
):
    sessions = tmp_path / "s.jsonl"
    sessions.write_text(json.dumps({"id": "a", "queries": [{"t": 0, "name": "devs.tplinkcloud.com"}]}) + "\n")
    with pytest.raises(SystemExit) as usage:
        cli.main(["identify", "--json", f"--window={window}", "--sessions", str(sessions)])
    out, err = capsys.readouterr()
    assert usage.value.code == 2 and out == "" and "argument --window: " in err


@pytest.mark.parametrize("flag", ["--model", "--sessions"])
def test_an_empty_model_or_sessions_path_is_a_usage_error_not_quietly_another_input(capsys, tmp_path, flag):
    # `--model "$MODEL"` with MODEL unset answered with the shipped bundle, as if that were the model asked for;
    # `--sessions "$FILE"` beside a pcap identified the pcap alone, exit 0, as if the file had no sessions
    sessions = tmp_path / "s.jsonl"
    sessions.write_text(json.dumps({"id": "a", "queries": [{"t": 0, "name": "devs.tplinkcloud.com"}]}) + "\n")
    pcap = tmp_path / "one.pcap"
    write_one_query(pcap)
    given = {"--model": ["--sessions", str(sessions)], "--sessions": [str(pcap)]}[flag]
    with pytest.raises(SystemExit) as usage:
        cli.main(["identify", "--json", flag, "", *given])
    out, err = capsys.readouterr()
    assert usage.value.code == 2 and out == "" and f"argument {flag}: " in err


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_an_empty_out_path_is_a_usage_error_never_the_shipped_bundle_or_the_current_directory(
    capsys, tmp_path, command
):
    # `iotgw train --out "$OUT"` with OUT unset trained into identifier/bundle/, over the shipped model
    with pytest.raises(SystemExit) as usage:
        cli.main([command, "--out", "", "--data", str(tmp_path)])
    out, err = capsys.readouterr()
    assert usage.value.code == 2 and out == "" and "argument --out: " in err


def write_one_query(pcap: Path) -> None:
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    query = Ether(src="50:c7:bf:00:00:01") / IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=40000, dport=53)
    wrpcap(str(pcap), [query / DNS(rd=1, qd=DNSQR(qname="devs.tplinkcloud.com"))])


@needs_data
@pytest.mark.parametrize("folder", ["HueBridge", "WeMoSwitch", "D-LinkSiren"])
def test_a_cooked_capture_of_a_real_capture_is_answered_as_the_ethernet_one(iotgw, tmp_path, folder):
    pcap, mac = first_capture(folder)
    cooked = tmp_path / "any.pcap"
    as_cooked(pcap, cooked, 113)
    code, rows, err = iotgw("identify", "--json", str(pcap), str(cooked))
    assert code == 0 and "skipped" not in err
    ethernet, sll = ([{**r, "source": None} for r in rows if r["source"] == str(p)] for p in (pcap, cooked))
    assert sll == ethernet and mac in {r["mac"] for r in sll}


@needs_data
def test_in_a_cooked_capture_the_capturing_hosts_own_packets_are_no_device(iotgw, tmp_path):
    pcap, mac = first_capture("HueBridge")
    gateway = SENTINEL_GATEWAY
    cooked = tmp_path / "any.pcapng"
    own = as_cooked(pcap, cooked, 276, host=gateway)
    code, rows, err = iotgw("identify", "--json", str(pcap), str(cooked))
    assert code == 0 and own > 100
    assert f"{cooked}: {own} packets skipped ({own} sent by the capturing host)" in err
    ethernet, sll2 = ([{**r, "source": None} for r in rows if r["source"] == str(p)] for p in (pcap, cooked))
    assert gateway in {r["mac"] for r in ethernet}  # an Ethernet capture cannot tell the router's own frames
    assert sll2 == [r for r in ethernet if r["mac"] != gateway] and mac in {r["mac"] for r in sll2}


@needs_data
def test_a_capture_out_of_time_order_is_answered_as_the_same_capture_in_order(iotgw, tmp_path):
    from scapy.utils import rdpcap, wrpcap

    pcap, mac = first_capture("Aria")
    frames = list(rdpcap(str(pcap)))
    unsorted = tmp_path / "unsorted.pcap"
    wrpcap(str(unsorted), frames[-5:] + frames[:-5])  # as `mergecap -a` appends a capture taken a minute later
    assert capture_windows(unsorted).devices[mac].first_ts == capture_windows(pcap).devices[mac].first_ts
    code, rows, _ = iotgw("identify", "--json", str(pcap), str(unsorted))
    assert code == 0
    ordered, shuffled = ([{**r, "source": None} for r in rows if r["source"] == str(p)] for p in (pcap, unsorted))
    assert shuffled == ordered
    assert all(r["decided_after_s"] is None or r["decided_after_s"] >= 0 for r in shuffled)


@needs_data
def test_corrupt_pcap_is_named_and_the_others_still_processed(iotgw, tmp_path):
    good, mac = first_capture("HueBridge")
    bad = tmp_path / "broken.pcap"
    bad.write_bytes(b"this is not a capture at all" * 10)
    code, rows, err = iotgw("identify", "--json", str(bad), str(good))
    assert code != 0
    assert str(bad) in err
    assert any(r["mac"] == mac and r["device_type"] == "HueBridge" for r in rows)


@needs_data
def test_a_capture_corrupt_part_way_is_named_and_the_devices_before_the_damage_still_answered(iotgw, tmp_path):
    import struct

    good, mac = first_capture("HueBridge")
    data = bytearray(good.read_bytes())
    off = 24
    for _ in range(len(list(read_frames(good))) - 1):  # to the last record, long after the bridge's first packets
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
    struct.pack_into("<II", data, off + 8, 0x7FFFFFFF, 0x7FFFFFFF)  # caplen and wirelen: impossible
    damaged = tmp_path / "damaged.pcap"
    damaged.write_bytes(bytes(data))
    code, rows, err = iotgw("identify", "--json", str(damaged), str(good))
    assert code != 0 and f"{damaged}: corrupt record" in err
    assert any(r["source"] == str(damaged) and r["mac"] == mac for r in rows)
    assert any(r["source"] == str(good) and r["mac"] == mac for r in rows)


@needs_data
def test_a_capture_cut_short_is_named_with_exit_1_and_its_complete_records_still_answered(iotgw, tmp_path):
    good, mac = first_capture("HueBridge")
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(good.read_bytes()[:-5])  # a capture stopped while writing its last record
    code, rows, err = iotgw("identify", "--json", str(cut), str(good))
    assert code == 1 and f"{cut}: truncated after " in err
    assert any(r["source"] == str(cut) and r["mac"] == mac for r in rows)
    assert any(r["source"] == str(good) and r["mac"] == mac for r in rows)


@needs_data
def test_a_capture_in_which_no_device_sent_a_packet_is_said_so_not_silently_answered_with_nothing(iotgw, tmp_path):
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    good, mac = first_capture("HueBridge")
    header_only = tmp_path / "header only.pcap"
    header_only.write_bytes(good.read_bytes()[:24])  # a capture stopped before its first packet: a valid file
    no_sender = tmp_path / "multicast.pcap"
    query = Ether(src="01:00:5e:00:00:fb") / IP(src="10.0.0.9", dst="224.0.0.251") / UDP(sport=5353, dport=5353)
    wrpcap(str(no_sender), [query / DNS(qd=DNSQR(qname="x.local"))])  # a multicast source is no device
    code, rows, err = iotgw("identify", "--json", str(header_only), str(no_sender), str(good))
    assert code == 0  # an empty capture is no damage
    assert f"{header_only}: no device sent a packet in it" in err
    assert f"{no_sender}: no device sent a packet in it" in err
    assert {r["source"] for r in rows} == {str(good)} and mac in {r["mac"] for r in rows}


@needs_data
def test_malformed_frames_in_a_capture_are_counted_and_the_device_still_named(iotgw, tmp_path):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap, wrpcap

    good, mac = first_capture("HueBridge")
    frames = list(rdpcap(str(good)))
    garbage = Ether(src=mac) / IP(src="10.0.0.7") / UDP(sport=1000, dport=53) / (b"\xff" * 11)
    garbage.time = frames[0].time + 0.5
    frames[1:1] = [garbage, garbage.copy()]
    spoiled = tmp_path / "spoiled.pcap"
    wrpcap(str(spoiled), frames)
    code, rows, err = iotgw("identify", "--json", str(spoiled))
    assert code == 0 and f"{spoiled}: 2 malformed frames dropped" in err
    assert any(r["mac"] == mac and r["device_type"] == "HueBridge" for r in rows)


@needs_data
def test_a_devices_window_starts_at_its_first_frame_even_one_that_gives_no_observation(iotgw, tmp_path):
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap, wrpcap

    pcap, mac = first_capture("Aria")
    frames = list(rdpcap(str(pcap)))
    start = min(f.time for f in frames if f.src == mac)
    # the scale answers a DNS query 20 s before its own traffic: an answer is no observation, but it is a packet
    answer = Ether(src=mac, dst="00:11:22:33:44:55") / IP(src="192.168.1.5", dst="192.168.1.1") / UDP(
        sport=53, dport=40000
    ) / DNS(qr=1, qd=DNSQR(qname="a.example.com"), an=DNSRR(rrname="a.example.com", rdata="10.0.0.1"))
    answer.time = start - 20
    early = tmp_path / "early.pcap"
    wrpcap(str(early), [answer, *frames])
    dev = capture_windows(early, 5.0).devices[mac]
    assert dev.first_ts == pytest.approx(float(answer.time), abs=1e-6) and dev.observations == []
    code, rows, _ = iotgw("identify", "--json", "--window", "5", str(early))
    (row,) = [r for r in rows if r["mac"] == mac]
    assert code == 0 and row["decided_after_s"] is None  # its first 5 s said nothing: nothing to decide on


def test_every_unicast_sender_gets_a_line_even_with_only_answers_replies_or_malformed_frames(iotgw, tmp_path):
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.dns import DNS, DNSQR, DNSRR
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    client, resolver, router, broken = (f"02:00:00:00:00:{n}" for n in ("01", "53", "67", "77"))
    frames = [
        Ether(src=client) / IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=40000, dport=53)
        / DNS(rd=1, qd=DNSQR(qname="time.google.com")),
        Ether(src=resolver) / IP(src="10.0.0.1", dst="10.0.0.7") / UDP(sport=53, dport=40000)
        / DNS(qr=1, qd=DNSQR(qname="time.google.com"), an=DNSRR(rrname="time.google.com", rdata="10.9.9.9")),
        Ether(src=router, dst=client) / IP(src="10.0.0.254", dst="10.0.0.7") / UDP(sport=67, dport=68)
        / BOOTP(op=2, chaddr=bytes.fromhex(client.replace(":", "")), yiaddr="10.0.0.7")
        / DHCP(options=[("message-type", "ack"), "end"]),
        Ether(src=broken) / IP(src="10.0.0.8", dst="10.0.0.1") / UDP(sport=1000, dport=53) / (b"\xff" * 11),
        Ether(src="01:00:5e:00:00:fb") / IP(src="10.0.0.9", dst="224.0.0.251") / UDP(sport=5353, dport=5353)
        / DNS(qd=DNSQR(qname="x.local")),  # a multicast source is no device
    ]
    for i, frame in enumerate(frames):
        frame.time = 1000.0 + i
    pcap = tmp_path / "silent.pcap"
    wrpcap(str(pcap), frames)
    code, rows, err = iotgw("identify", "--json", str(pcap))
    assert code == 0 and f"{pcap}: 1 malformed frames dropped" in err
    assert [r["mac"] for r in rows] == [client, resolver, router, broken]
    assert all(r["decided_after_s"] is None for r in rows if r["mac"] != client)


def test_sessions_jsonl_gives_one_line_per_input(iotgw, tmp_path):
    sessions = tmp_path / "s.jsonl"
    lines = [
        {
            "id": "plug",
            "queries": [{"t": 0.0, "name": "devs.tplinkcloud.com"}, {"t": 1.0, "name": "uk.pool.ntp.org"}],
        },
        {"id": "kettle", "queries": [{"t": 0.5, "name": "a.b.example.invalid"}], "mac": "00:11:22:33:44:55"},
    ]
    sessions.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, rows, _ = iotgw("identify", "--json", "--signals", "dns", "--sessions", str(sessions))
    assert code == 0
    assert [r["id"] for r in rows] == ["plug", "kettle"]
    assert "source" not in rows[0] and "mac" not in rows[0]
    assert rows[0]["manufacturer"] == "TP-Link" and rows[0]["known"] is True
    assert rows[1]["known"] is False  # a name no vendor in training ever used


def test_mostly_new_names_make_a_device_unknown_and_its_closest_match_is_kept(iotgw, tmp_path):
    # TP-Link's cloud names beside names no device in training ever queried: a vendor the model never saw (one
    # building on TP-Link's cloud, say). More than a fifth of its names new: unknown, though the heads are sure.
    plug = [
        {"t": 0.0, "name": "devs.tplinkcloud.com"},
        {"t": 0.5, "name": "uk.pool.ntp.org"},
        {"t": 0.6, "name": "time.nist.gov"},
        {"t": 0.7, "name": "use1-api.tplinkra.com"},
    ]
    new = [{"t": 1.0, "name": "api.cloud-never-seen.example"}, {"t": 1.5, "name": "t.other-never-seen.example"}]
    sessions = tmp_path / "s.jsonl"
    cases = {"plug": plug, "one-new": plug + new[:1], "two-new": plug + new}
    sessions.write_text("".join(json.dumps({"id": k, "queries": q}) + "\n" for k, q in cases.items()))
    code, rows, _ = iotgw("identify", "--json", "--signals", "dns", "--sessions", str(sessions))
    assert code == 0
    by_id = {r["id"]: r for r in rows}
    assert by_id["plug"]["known"] and by_id["one-new"]["known"]  # a fifth of its names new: still TP-Link
    assert by_id["two-new"]["known"] is False
    # the contract keeps the closest match; what the gateway acts on claims nothing
    assert by_id["two-new"]["manufacturer"] == "TP-Link"
    ident = Identifier.load(None, ("dns",))
    session = ident.session("", 0.0)
    for q in plug + new:
        session.update(DnsObservation(q["t"], q["name"], 1))
    claimed = session.current().claimed()
    assert (claimed.manufacturer, claimed.device_type, claimed.known) == ("unknown", "unknown", False)
    closest = claimed.alternatives[0][0]  # a TP-Link plug, or the generic Plug the list's TP-Link plugs are
    assert ident.bundle.type_info.get(closest, {}).get("manufacturer") in (None, "TP-Link") and "Plug" in closest


def test_a_mac_with_no_registered_vendor_is_no_evidence_of_a_new_vendor(iotgw, tmp_path):
    # a phone's private address, or the demo's generic devices: the MAC says nothing of the maker, so a TP-Link
    # plug behind one is judged as if no MAC were known, not as a vendor the model never saw
    names = [{"t": 0.0, "name": "devs.tplinkcloud.com"}, {"t": 1.0, "name": "pool.ntp.org"}]
    names.append({"t": 2.0, "name": "www.tplinkcloud.com"})
    macs = {"none": None, "private": "02:11:22:33:44:55", "demo": demo_mac(None, 7)}
    sessions = tmp_path / "s.jsonl"
    lines = [dict({"id": k, "queries": names}, **({"mac": m} if m else {})) for k, m in macs.items()]
    sessions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, rows, _ = iotgw("identify", "--json", "--sessions", str(sessions))
    assert code == 0
    by_id = {r.pop("id"): r for r in rows}
    assert by_id["none"]["known"] and by_id["none"]["manufacturer"] == "TP-Link"
    assert by_id["private"] == by_id["none"] and by_id["demo"] == by_id["none"]
    session = Identifier.load().session("02:11:22:33:44:55", 0.0)
    for q in names:
        session.update(DnsObservation(q["t"], q["name"], 1))
    assert session.words == 2 and session.new_words == 0  # the two SLDs; no token for the MAC
    assert "oui" not in session.current().signals


def test_a_session_mac_in_any_common_notation_gets_the_answer_of_its_colon_form_and_a_non_mac_is_a_bad_line(
    iotgw, tmp_path
):
    # the vendor prefix and the MAC blocks are read from the colon form: in another notation the same Aria was
    # once judged unknown, or a TP-Link speaker
    names = [{"t": 0.0, "name": "time.google.com"}, {"t": 0.5, "name": "devs.tplinkcloud.com"}]
    macs = ["20:f8:5e:ca:91:52", "20:F8:5E:CA:91:52", "20-F8-5E-CA-91-52", "20f85eca9152", "20f8.5eca.9152"]
    macs += ["zz", "a" * 1000, "20:f8:5e:ca:91:52:00", "1"]
    sessions = tmp_path / "s.jsonl"
    lines = [{"id": str(i), "mac": m, "queries": names} for i, m in enumerate(macs)]
    sessions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, rows, err = iotgw("identify", "--json", "--sessions", str(sessions))
    assert code == 1 and "Traceback" not in err
    assert [r.pop("id") for r in rows] == ["0", "1", "2", "3", "4"]
    assert all(r == rows[0] for r in rows) and rows[0]["manufacturer"] == "Fitbit"
    assert [f"{sessions}:{n}: " in err for n in range(1, len(macs) + 1)] == [False] * 5 + [True] * 4
    assert "a" * 41 not in err  # a hostile value is quoted, not echoed whole


def test_a_name_training_never_saw_moves_no_probability_and_still_counts_as_new():
    # Its tokens' hash buckets hold other, trained tokens' weights: counted, a new vendor's cloud name would add
    # some unrelated vendor's evidence. It is kept out of the vector and still weighs in the open-set verdict.
    ident = Identifier.load(None, ("dns",))
    plain, with_new = ident.session("", 0.0), ident.session("", 0.0)
    for session in (plain, with_new):
        session.update(DnsObservation(0.0, "devs.tplinkcloud.com", 1))
    with_new.update(DnsObservation(0.0, "api.cloud-never-seen.example", 1))
    assert "sld:cloud-never-seen.example" in with_new.state.tokens
    assert (with_new.words, with_new.new_words) == (2, 1)
    for p, q in zip(plain.probabilities(), with_new.probabilities(), strict=True):
        assert p.tolist() == q.tolist()
    # a trained name at the same instant does move them
    with_known = ident.session("", 0.0)
    for name in ("devs.tplinkcloud.com", "api.xbcs.net"):
        with_known.update(DnsObservation(0.0, name, 1))
    assert with_known.probabilities()[0].tolist() != plain.probabilities()[0].tolist()


def test_the_training_vendors_of_its_names_counted_by_device_weigh_the_manufacturer_head():
    # Netatmo is known from one listed device (netatmo.net), TP-Link from dozens of captured windows that query
    # NTP pools: by window the net leans to TP-Link; by device, netatmo.net is all Netatmo's.
    bundle = Bundle.load()
    assert bundle.name_vendors["netatmo.net"] == {"Netatmo": 1}
    plain = Identifier(replace(bundle, name_vendors={}), ("dns",))
    voted = Identifier(bundle, ("dns",))
    sessions = plain.session("", 0.0), voted.session("", 0.0)
    for session in sessions:
        for t, name in enumerate(("app.netatmo.net", "pool.ntp.org")):
            session.update(DnsObservation(float(t), name, 1))
    (net, *net_rest), (weighed, *weighed_rest) = (s.probabilities() for s in sessions)
    votes = voted.name_shares["sld:netatmo.net"] + voted.name_shares["sld:ntp.org"]
    expected = net**NAME_VOTE_NET_POWER * (votes + NAME_VOTE_FLOOR)
    assert weighed == pytest.approx(expected / expected.sum(), abs=1e-6)
    assert sessions[1].current().manufacturer == "Netatmo"
    assert [p.tolist() for p in net_rest] == [p.tolist() for p in weighed_rest]  # the other heads: the net's


def test_a_device_no_name_votes_for_is_judged_on_the_nets_own_head_against_its_own_bar():
    # The names' votes come with the head at its square root, which flattens it (known from 0.2). A device with no
    # name to vote (only its DHCP request so far) has the net's own head, and the bar chosen on that scale (0.4).
    shipped = Bundle.load()

    def session(known: float, known_unvoted: float, *names: str):
        bars = replace(shipped.thresholds, known=known, known_unvoted=known_unvoted)
        s = Identifier(replace(shipped, thresholds=bars)).session("90:8d:78:00:00:01", 0.0)
        s.update(DhcpObservation(0.1, "DCH-S220", (1, 3, 6, 12, 15, 28, 42), "udhcp 1.21.1--LSDK-10.2-00082-4"))
        for name in names:
            s.update(DnsObservation(0.5, name, 1))
        return s

    unvoted = session(0.2, 0.4)
    assert not unvoted.name_votes.any()
    p = float(unvoted.probabilities()[0].max())
    assert unvoted.current().known
    assert session(1.0, p - 1e-3).current().known  # ``known`` is not its bar ...
    assert not session(0.0, p + 1e-3).current().known  # ... ``known_unvoted`` is
    voted = session(1.0, 0.0, "api.dch.dlink.com")
    assert voted.name_votes.any() and not voted.current().known  # a name votes: ``known`` is the bar again


def test_a_name_training_never_saw_votes_as_the_trained_names_of_its_brand():
    # No lab listed tplinkcloud.de, but TP-Link's cloud is tplinkcloud.com (and .com.cn): a plug sold in Germany
    # should still be named by it. Short first labels are anyone's: mi.de is not Xiaomi's mi.com.
    assert (brand("tplinkcloud.com.cn"), brand("mi.com")) == ("tplinkcloud", None)
    ident = Identifier.load(None, ("dns",))
    assert "sld:tplinkcloud.de" not in ident.name_shares and "sld:mi.com" in ident.name_shares
    session = ident.session("", 0.0)
    session.update(DnsObservation(0.0, "n-devs.tplinkcloud.de", 1))
    assert session.name_votes.tolist() == ident.brand_shares["tplinkcloud"].tolist()
    assert ident.labels["manufacturer"][int(session.name_votes.argmax())] == "TP-Link"
    assert session.current().manufacturer == "TP-Link"
    assert ident.name_vote("sld:tplinkcloud.de") is ident.brand_shares["tplinkcloud"]
    assert ident.name_vote("sld:tplinkcloud.com") is ident.name_shares["sld:tplinkcloud.com"]  # its own first
    assert ident.name_vote("sld:no-vendor-ever.example") is None and ident.name_vote("dhcp12:tplink") is None
    other = ident.session("", 0.0)
    other.update(DnsObservation(0.0, "www.mi.de", 1))
    assert not other.name_votes.any()


@needs_data
def test_on_dns_alone_the_vendor_comes_from_the_manufacturer_head_and_the_type_fits_it(iotgw, tmp_path):
    # Blink's hub as one lab listed it, its names 3 s apart as a real hub sends them. The type head alone drifts to
    # the nearest captured product (a WeMo switch, so "Belkin"); the manufacturer head, taught by the name sets,
    # knows immedia-semi.com is Blink's. The answer must be Blink's, with a type Blink makes or a generic one.
    with DOMAINS.open(newline="") as f:
        names = [row["domain"] for row in csv.DictReader(f) if row["device_folder"] == "Blink Hub_Mon(us)"]
    assert len(names) == 6
    sessions = tmp_path / "s.jsonl"
    queries = [{"t": 3.0 * i, "name": name} for i, name in enumerate(names)]
    sessions.write_text(json.dumps({"id": "hub", "queries": queries}) + "\n")
    code, rows, _ = iotgw("identify", "--json", "--signals", "dns", "--sessions", str(sessions))
    assert code == 0
    assert rows[0]["manufacturer"] == "Blink"
    assert Identifier.load().bundle.type_info.get(rows[0]["device_type"], {}).get("manufacturer") in (None, "Blink")
    ident = Identifier.load(None, ("dns",))
    session = ident.session("", 0.0)
    for q in queries:
        session.update(DnsObservation(q["t"], q["name"], 1))
    named = session.current()
    assert named.alternatives[0] == (named.device_type, named.confidence)  # "closest:" shows the type named
    # the rule follows what was seen, not the flag: all signals, but a session of names alone, answers the same
    code, rows_all, _ = iotgw("identify", "--json", "--sessions", str(sessions))
    assert code == 0 and rows_all[0]["manufacturer"] == "Blink"


@needs_data
def test_a_type_of_the_domain_list_is_shown_with_its_own_category_never_another_kinds(iotgw, tmp_path):
    # The category head learned only the captures' kinds: an Amazon "Speaker" came out "camera", a TV "hub".
    groups: dict[str, list[str]] = {}
    with DOMAINS.open(newline="") as f:
        for row in csv.DictReader(f):
            groups.setdefault(row["device_folder"], []).append(row["domain"])
    sessions = tmp_path / "s.jsonl"
    sessions.write_text("".join(
        json.dumps({"id": folder, "queries": [{"t": float(i), "name": n} for i, n in enumerate(names)]}) + "\n"
        for folder, names in groups.items()
    ))
    code, rows, _ = iotgw("identify", "--json", "--signals", "dns", "--sessions", str(sessions))
    assert code == 0 and len(rows) == len(groups)
    captured = {t for t, info in Identifier.load().bundle.type_info.items() if "manufacturer" in info}
    listed = [(r["device_type"], r["category"]) for r in rows if r["device_type"] not in captured]
    assert {("Speaker", "speaker"), ("TV", "tv"), ("Camera", "camera")} <= set(listed)
    assert [(t, c) for t, c in listed if listed_category(t) and c != listed_category(t)] == []


def test_type_info_gives_a_captured_product_its_maker_and_a_listed_type_its_category_alone():
    def window(dtype: str, manufacturer: str, category: str | None, timed: bool) -> LabelledWindow:
        return LabelledWindow([], "", 0.0, manufacturer, dtype, category, dtype, "x", timed)

    info = type_info([
        window("Aria", "Fitbit", "scale", True),
        window("Speaker", "Amazon", None, False),
        window("Speaker", "Harman Kardon", None, False),
        window("Brewer", "Smarter", None, False),
        window("Huawei", "Huawei", None, False),  # the list's maker-as-type: no kind to show
    ])
    assert info == {
        "Aria": {"manufacturer": "Fitbit", "category": "scale"},
        "Speaker": {"category": "speaker"},
        "Brewer": {"category": "appliance"},
    }


def test_dns_order_and_pauses_tell_apart_siblings_that_query_the_same_names(iotgw, tmp_path):
    # D-Link's hub, switch and sensors all query wrpd.dlink.com, ntp1.dlink.com and one amazonaws.com name in
    # their first seconds. The hub asks for the time first and waits; the switch asks for it at once after
    # wrpd; the sensors (motion, siren, water: truly alike) a second later. Timings are not any capture's.
    wrpd6 = {"name": "wrpd.dlink.com", "qtype": 28}
    elb6 = {"name": "dualstack.ipv6-1927743757.us-west-2.elb.amazonaws.com", "qtype": 28}
    wrpd, ntp = {"name": "wrpd.dlink.com"}, {"name": "ntp1.dlink.com"}
    cases = {
        "hub": [(1.2, ntp), (3.8, wrpd6), (3.85, elb6), (3.9, wrpd)],
        "switch": [(6.5, wrpd6), (6.55, ntp), (6.6, elb6), (6.6, wrpd)],
        "sensor": [(6.5, wrpd6), (6.55, elb6), (6.6, wrpd), (7.6, ntp)],
    }
    sessions = tmp_path / "s.jsonl"
    sessions.write_text(
        "".join(json.dumps({"id": k, "queries": [{"t": t, **q} for t, q in v]}) + "\n" for k, v in cases.items())
    )
    code, rows, _ = iotgw("identify", "--json", "--signals", "dns", "--sessions", str(sessions))
    assert code == 0
    types = {r["id"]: r["device_type"] for r in rows}
    assert types["hub"] == "D-LinkHomeHub" and types["switch"] == "D-LinkSwitch"
    assert types["sensor"] in ("D-LinkSensor", "D-LinkSiren", "D-LinkWaterSensor")


def test_order_tokens_come_only_from_timed_names_of_one_domain():
    def tokens(queries, version=DEFAULT_FEATURES.version):
        state = FeatureState(replace(DEFAULT_FEATURES, version=version))
        for t, name in queries:
            state.add(DnsObservation(t, name, 1))
        return {t for t in state.tokens if t.startswith("next:")}

    timed = [(1.0, "ntp1.dlink.com"), (1.5, "time.google.com"), (3.6, "wrpd.dlink.com"), (3.7, "api.dlink.com")]
    assert tokens(timed) == {"next:wrpd.dlink.com>api.dlink.com:0"}  # the google name breaks ntp1 -> wrpd
    assert tokens([(0.0, n) for _, n in timed]) == set()  # a name set (a domain list) has no order
    assert tokens(timed, version=1) == set()  # a version 1 bundle is fed the features it was trained on


def test_sibling_ceiling_gives_each_group_its_commonest_product_and_counts_only_captures_with_dns():
    def capture(device_type, query_at):
        observations = [] if query_at is None else [DnsObservation(query_at, "devs.tplinkcloud.com", 1)]
        return LabelledWindow(observations, "", 0.0, "TP-Link", device_type, "plug", device_type, "test", True)

    captures = [capture("TP-LinkPlugHS100", 1.0)] * 3 + [capture("TP-LinkPlugHS110", 2.0)] * 2
    captures += [capture("Aria", 1.0), capture("Aria", None), capture("Lightify", 40.0)]
    assert sibling_type_ceiling(captures, 30.0) == round(4 / 6, 4)  # HS110 lost; no DNS by 30 s: not counted
    assert sibling_type_ceiling(captures, 60.0) == round(5 / 7, 4)
    assert sibling_type_ceiling(captures, 30.0, groups={}) == 1.0


def test_name_vendors_count_devices_not_captures_and_only_what_training_reads():
    def capture(device_type, names):
        observations = [DnsObservation(100.0 + t, n, 1) for t, n in names]
        return LabelledWindow(observations, "", 100.0, "TP-Link", device_type, "plug", device_type, "lab", True)

    def listed(maker, group, names):
        observations = [DnsObservation(0.0, n, 1) for n in names]
        return LabelledWindow(observations, "", 0.0, maker, "Camera", "camera", group, "lab", False)

    plug = [(1.0, "pool.ntp.org"), (2.0, "devs.tplinkcloud.com"), (90.0, "late.example.com")]
    windows = [capture("TP-LinkPlugHS100", plug)] * 20 + [capture("TP-LinkPlugHS110", plug)]
    windows += [listed("Blink", "Blink cam 1", ["rest.immedia-semi.com", "0.pool.ntp.org"])]
    windows += [listed("Blink", "Blink cam 2", ["rest.immedia-semi.com"]), listed(None, "unlabelled", ["x.org"])]
    assert name_vendors(windows) == {
        "immedia-semi.com": {"Blink": 2},
        "ntp.org": {"Blink": 1, "TP-Link": 2},  # twenty-one captures of two products: two devices
        "tplinkcloud.com": {"TP-Link": 2},
    }  # after CUTOFFS[-1] seconds a capture is not read; a window without a manufacturer votes for none


def test_a_bundle_version_names_what_decides_its_answers():
    shipped = Bundle.load()
    assert shipped.version.endswith("-" + answers_hash(shipped)[:6])  # as trained, as loaded
    assert answers_hash(replace(shipped, metrics={}, prototypes={})) == answers_hash(shipped)  # no answer moves
    votes = dict(shipped.name_vendors, **{"netatmo.net": {"Netatmo": 2}})
    others = [replace(shipped, name_vendors=votes), replace(shipped, thresholds=Thresholds(max_new_words=0.3))]
    others.append(replace(shipped, weights={**shipped.weights, "b1": shipped.weights["b1"] + 0.01}))
    assert len({answers_hash(b) for b in [shipped, *others]}) == 4


def test_a_bundle_reads_a_threshold_stored_under_its_earlier_name_and_refuses_one_it_does_not_know(tmp_path):
    shipped = Bundle.load()
    old = replace(shipped, thresholds=Thresholds(max_new_words=0.35)).save(tmp_path / "old")
    meta = json.loads((old / "bundle.json").read_text())
    meta["thresholds"]["max_new_names"] = meta["thresholds"].pop("max_new_words")  # its name until 2026-11
    (old / "bundle.json").write_text(json.dumps(meta))
    assert Bundle.load(old).thresholds.max_new_words == 0.35
    meta["thresholds"]["known_for_new_things"] = 0.5  # a newer iotgw's rule this one would silently skip
    (old / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=rf"{old}: .*known_for_new_things"):
        Bundle.load(old)


@pytest.mark.parametrize(
    "break_it,says",
    [
        (lambda meta, _: meta.pop("version"), "KeyError: 'version'"),
        (lambda meta, _: meta["labels"]["device_type"].pop(), "device_type head has 51 outputs for 50 labels"),
        (lambda meta, _: meta["features"].update(dim=1024), "w1 has 2048 rows for 1024 feature buckets"),
        (lambda meta, _: meta["thresholds"].update(commit="high"), "threshold commit is 'high', not a number"),
        # each of these loaded, then crashed at a device's first packet or silently changed the answers
        (lambda meta, _: meta["thresholds"].update(commit=float("nan")), "threshold commit is nan, not a number"),
        (lambda meta, _: meta["features"].update(signals=["bogus"]), "features.signals ['bogus'] are not among"),
        (lambda meta, _: meta["labels"].update(device_type="x" * 51), "labels.device_type is not a list of names"),
        (lambda meta, _: meta.update(type_info=[]), "type_info is a list, not an object"),
        (lambda meta, _: meta.update(mac_blocks=[]), "mac_blocks is a list, not an object"),
        (lambda meta, _: meta.update(mac_blocks={"20f85eca9": "Aria"}), "mac_blocks['20f85eca9'] is 'Aria'"),
        (lambda meta, _: meta.update(name_vendors=[]), "name_vendors is a list, not an object"),
        (lambda meta, _: meta.update(name_vendors={"x.com": {"Acme": "many"}}), "name_vendors['x.com'] is"),
        (lambda _, arrays: arrays.update(seen=arrays["seen"][:80]), "the seen bitmap is uint8 of shape (80,)"),
        (lambda _, arrays: arrays.update(vocabulary=arrays["vocabulary"][:80]), "the vocabulary bitmap is uint8"),
        # each of these loaded, then answered NaN (not JSON), the least likely label, or crashed at a first packet
        (lambda _, arrays: arrays["w2"].__setitem__((0, 0), np.nan), "w2 holds a value that is not a finite number"),
        (lambda _, arrays: arrays.update(temps=arrays["temps"] * 0), "temps is [0.0, 0.0, 0.0], not 3 numbers above 0"),
        (lambda _, arrays: arrays.update(temps=-arrays["temps"]), "not 3 numbers above 0"),
        (lambda _, arrays: arrays.update(w1=arrays["w1"][:, 0]), "w1 has shape (2048,), not (feature buckets"),
        (lambda meta, _: meta["labels"]["device_type"].__setitem__(1, "Aria"), "labels.device_type names 'Aria' more"),
        (lambda meta, _: meta["features"].update(version=3), "features.version 3 is not one this iotgw computes"),
        (lambda meta, _: meta["thresholds"].update(commit=-5), "threshold commit is -5, not from 0 to 1"),
        (lambda meta, _: meta["thresholds"].update(min_specific=1.5), "threshold min_specific is 1.5, not a whole"),
        (lambda meta, _: meta.update(format=True), "bundle format True is not 1"),
        (lambda meta, _: meta["prototypes"].update(Aria=[{"kind": "dns"}]), "prototypes['Aria'] is [{'kind'"),
        (
            lambda meta, _: meta["type_info"]["Aria"].update(manufacturer="Acme"),
            "type_info['Aria'] is {'category': 'scale', 'manufacturer': 'Acme'}",
        ),
        (
            lambda meta, _: meta["type_info"]["Aria"].update(category="toaster"),
            "type_info['Aria'] is {'category': 'toaster', 'manufacturer': 'Fitbit'}",
        ),
    ],
)
def test_a_bundle_that_does_not_fit_together_is_refused_when_loaded_naming_it(tmp_path, break_it, says):
    broken = Bundle.load().save(tmp_path / "broken")
    meta = json.loads((broken / "bundle.json").read_text())
    with np.load(broken / "weights.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    break_it(meta, arrays)
    meta.pop("weights_sha256")  # edited by hand as if consistent: the check below is each part's own
    (broken / "bundle.json").write_text(json.dumps(meta))
    np.savez_compressed(broken / "weights.npz", **arrays)
    with pytest.raises(BundleError) as refused:
        Bundle.load(broken)
    assert str(refused.value).startswith(f"{broken}: ") and says in str(refused.value)


@needs_data
@pytest.mark.parametrize("damage", ["cut short", "bytes overwritten"])
def test_a_damaged_weights_file_is_refused_naming_the_bundle_not_a_zip_traceback(iotgw, tmp_path, damage):
    broken = Bundle.load().save(tmp_path / "broken")
    meta = json.loads((broken / "bundle.json").read_text())
    del meta["weights_sha256"]  # as the shipped bundle, saved before it was recorded: the zip itself is read
    (broken / "bundle.json").write_text(json.dumps(meta))
    data = bytearray((broken / "weights.npz").read_bytes())
    if damage == "cut short":  # a copy that stopped part-way
        del data[len(data) // 2 :]
    else:  # a worn SD card: the zip directory intact, a member's bytes not
        data[20_000:20_100] = bytes(100)
    (broken / "weights.npz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"^{broken}: not a model bundle \(BadZipFile"):
        Bundle.load(broken)
    pcap, _ = first_capture("HueBridge")
    code, lines, err = iotgw("identify", "--json", "--model", str(broken), str(pcap))
    assert code == 2 and not lines and err.startswith(f"iotgw identify: {broken}: not a model bundle")


def test_a_save_that_fails_part_way_leaves_the_bundle_that_was_there(tmp_path):
    target = Bundle.load().save(tmp_path / "bundle")
    before = Bundle.load(target).version
    # a disk that fills part-way through weights.npz, for real: the child may write no file above 200 kB
    script = f"""
import resource, signal
from identifier.bundle import Bundle
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not the signal's kill
bundle = Bundle.load()
bundle.version = "retrained"
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
try:
    bundle.save({str(target)!r})
except OSError as exc:
    print(exc.errno)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "27", done.stderr  # EFBIG: the save did fail part-way
    assert Bundle.load(target).version == before  # it was a truncated weights.npz beside the old bundle.json
    assert sorted(p.name for p in target.iterdir()) == ["bundle.json", "weights.npz"]


def test_a_saved_bundle_is_on_disk_before_its_names_are(tmp_path, monkeypatch):
    # A power cut cannot be caused here: record what is fsynced, and when, instead.
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(src, dst) -> None:
        real_replace(src, dst)
        synced.append(f"renamed {Path(dst).name}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", rename)
    target = Bundle.load().save(tmp_path / "bundle")
    # each file's bytes before its rename, the directory (the new name) after it
    assert [Path(p).name.split("-")[0] if not p.startswith("renamed") else p for p in synced] == [
        ".weights.npz", "renamed weights.npz", "bundle",
        ".bundle.json", "renamed bundle.json", "bundle",
    ]
    assert Bundle.load(target).version == Bundle.load().version


def test_weights_of_another_save_beside_a_bundle_json_are_refused(tmp_path):
    shipped = Bundle.load()
    first = shipped.save(tmp_path / "first")
    second = replace(shipped, weights={**shipped.weights, "b1": shipped.weights["b1"] + 0.5}).save(tmp_path / "b")
    (first / "weights.npz").write_bytes((second / "weights.npz").read_bytes())  # a stop between the two renames
    with pytest.raises(BundleError, match=rf"^{first}: weights.npz is not the one bundle.json was saved with"):
        Bundle.load(first)


def test_a_name_set_spread_in_time_keeps_its_names_in_order_gap_seconds_apart():
    names = [DnsObservation(5.0, n, 1) for n in ("a.example.com", "b.example.com", "a.example.com")]
    name_set = LabelledWindow(names, "", 5.0, "Blink", "Hub", "hub", "Blink Hub", "lab", False)
    spread = spread_in_time(name_set, 1.5)
    assert [(o.ts, o.name) for o in spread.observations] == [
        (5.0, "a.example.com"),
        (6.5, "b.example.com"),
        (8.0, "a.example.com"),
    ]
    assert spread.timed and (spread.manufacturer, spread.group) == ("Blink", "Blink Hub")
    assert [o.ts for o in name_set.observations] == [5.0] * 3  # the name set itself is left as it was


def lab_name_sets(source: str, devices: list[tuple[str, list[str]]]) -> list[LabelledWindow]:
    """One untimed name set per (vendor, names) of a made-up lab, as ``domain_windows`` gives the list's rows."""
    return [
        LabelledWindow([DnsObservation(0.0, n) for n in names], "", 0.0, vendor, "plug", "plug", f"{source}-{i}",
                       source, False)
        for i, (vendor, names) in enumerate(devices)
    ]


@needs_torch
def test_the_nested_lab_search_chooses_values_on_the_other_labs_never_on_the_held_out_ones_windows():
    # Lab A is held out: its devices may say anything, the choice stays; lab B's devices of known vendors that
    # each query one name training never saw make a laxer new-names bar the better one, and it is chosen.
    def own(vendor: str) -> tuple[str, list[str]]:
        return vendor, [f"api.{vendor.lower()}cloud.com", f"x.{vendor.lower()}box.net", "pool.ntp.org"]

    def roaming(vendor: str) -> tuple[str, list[str]]:  # one name of three that no other lab lists, first
        return vendor, [f"{vendor.lower()}-b-extra.net", f"api.{vendor.lower()}cloud.com", "pool.ntp.org"]

    lab_a = lab_name_sets("A", [own("Acme"), own("Bolt"), own("Cora"), own("Dyna")])
    lab_b = lab_name_sets("B", [own("Acme"), own("Bolt"), own("Cora"), own("Echo")])
    lab_c = lab_name_sets("C", [own("Cora"), own("Bolt"), own("Acme"), own("Fizz")])
    grid = {"known": (0.2,), "max_new_words": (0.2, 0.5)}
    chosen = choose_values([], lab_a + lab_b + lab_c, "A", 0, grid)
    assert chosen["inner_folds"] == [["B"], ["C"]]
    assert chosen["chosen"] == {"known": 0.2, "max_new_words": 0.2}  # an even result keeps the shipped values

    other_a = lab_name_sets("A", [own("Zeta"), ("Yarn", ["api.acmecloud.com", "pool.ntp.org"]), roaming("Bolt")])
    assert choose_values([], other_a + lab_b + lab_c, "A", 0, grid) == chosen

    other_b = lab_name_sets("B", [roaming("Acme"), roaming("Bolt"), roaming("Cora")])
    moved = choose_values([], lab_a + other_b + lab_c, "A", 0, grid)
    assert moved["chosen"] == {"known": 0.2, "max_new_words": 0.5}
    assert moved["inner_objective"] > moved["inner_objective_shipped"]


def test_the_nested_lab_objective_is_the_open_set_balance_and_picks_the_better_point():
    # 9 of 10 known-vendor devices named and known but half the new vendors unknown (0.7) loses to 7 of 10 and
    # 9 of 10 (0.8), though it gets more devices right
    lax = [(True, True)] * 9 + [(True, False)], [True] * 5 + [False] * 5
    strict = [(True, True)] * 7 + [(True, False)] * 3, [True] * 9 + [False]
    assert (open_set_balance(*lax), open_set_balance(*strict)) == pytest.approx((0.7, 0.8))
    assert open_set_balance([], [True, False]) == 0.5  # a side with no device is left out
    points = [{"known": 0.2}, {"known": 0.3}]
    assert pick(points, [open_set_balance(*lax), open_set_balance(*strict)]) == 1  # over the shipped 0.2
    assert pick(points, [open_set_balance(*strict), open_set_balance(*lax)]) == 0
    assert pick(points[::-1], [0.8, 0.8]) == 1  # a tie goes to the shipped value
    # the shipped values are one of the grid's points, so the search can always keep them
    shipped = shipped_values()
    assert {k: shipped[k] for k in OPEN_SET_GRID} in grid_points(OPEN_SET_GRID)


@needs_torch
def test_leaving_types_out_trains_once_per_type_when_there_are_fewer_types_than_rounds():
    # 3 types and the default 9 rounds: rounds 4 to 9 left nothing out and trained for nothing
    def capture(vendor: str, device_type: str, i: int) -> LabelledWindow:
        names = [f"api.{vendor.lower()}cloud.com", f"fw.{device_type.lower()}.{vendor.lower()}.net", "pool.ntp.org"]
        obs = [DnsObservation(float(t), name) for t, name in enumerate(names)]
        return LabelledWindow(obs, "", 0.0, vendor, device_type, "plug", f"{device_type}-{i}", "test", True)

    captures = [capture(v, t, i) for v, t in (("Acme", "Plug"), ("Bolt", "Cam"), ("Cora", "Hub")) for i in range(5)]

    class Rounds:
        done = 0

        def update(self, n: int) -> None:
            self.done += n

    rounds = Rounds()
    result = leave_one_type_out(captures, [], seed=0, rounds=9, progress=rounds)
    assert rounds.done == 3
    assert sorted(result["auroc_per_type"]) == ["Cam", "Hub", "Plug"]


def test_a_bad_session_line_is_named_by_file_and_line_and_loses_none_of_the_others(iotgw, tmp_path, capsys):
    plug = '"queries": [{"t": 0.0, "name": "devs.tplinkcloud.com"}]'
    bad = [
        b'{"id": "b", "queries": [{"t": 0}]}',  # no name
        b"[1, 2]",
        b'{"id": "c", "queries": [{"t": NaN, "name": "x.example.com"}]}',
        b'{"id": "d", "queries": [{"t": 1e400, "name": "x.example.com"}]}',
        b'{"id": null, "queries": []}',
        b'{"id": "e", "queries": [{"t": 0, "name": null}]}',
        b'{"id": "f", "dhcp": {"hostname": 5}}',
        b'{"id": "g", "queries": [{"t": 0, "name": "caf\xe9.example.com"}]}',  # not UTF-8
        # numbers too big for a float: OverflowError, not ValueError
        b'{"id": "i", "queries": [{"t": 1' + b"0" * 400 + b', "name": "x.example.com"}]}',
        b'{"id": "j", "queries": [{"t": 0, "name": "x.example.com", "qtype": Infinity}]}',
        b'{"id": "k", "dhcp": {"param_list": [Infinity]}, "queries": []}',
        b'{"id": "l", "dhcp": {"message_type": 1e999}, "queries": []}',
        b'{"id": "m", "queries": [{"t": 0, "name": "x.example.com", "qtype": 1e300}]}',  # no 16-bit qtype
        b'{"id": "n", "dhcp": {"param_list": [1, 3, 256]}, "queries": []}',  # DHCP options are 0..255
        b'{"id": "o", "queries": [{"t": "1.5", "name": "x.example.com"}]}',  # a time is a number, not text
        b'{"id": "p", "qeuries": [{"t": 0, "name": "x.example.com"}]}',  # misspelt: judged on nothing before
        b'{"id": "q", "queries": [], "dhcp": "HS110"}',
    ]
    good = [f'{{"id": "{i}", {plug}}}'.encode() for i in ("a", "", "h", "y", "z")]
    lines = [good[0], bad[0], bad[1], good[1], *bad[2:5], good[2], *bad[5:8], good[3], *bad[8:], good[4]]
    sessions = tmp_path / "s.jsonl"
    sessions.write_bytes(b"\n".join(lines) + b"\n")
    code, rows, err = iotgw("identify", "--json", "--sessions", str(sessions))
    assert code == 1 and "Traceback" not in err
    assert [r["id"] for r in rows] == ["a", "", "h", "y", "z"] and all(r["manufacturer"] == "TP-Link" for r in rows)
    assert [f"{sessions}:{n}: " in err for n in range(1, len(lines) + 1)] == [line in bad for line in lines]
    assert cli.main(["identify", "--sessions", str(sessions)]) == 1  # the same as text: one line per session
    assert len(capsys.readouterr().out.splitlines()) == 5


def test_a_session_line_that_is_no_object_or_a_query_without_a_name_is_said_in_the_files_words(iotgw, tmp_path):
    # these were "AttributeError: 'list' object has no attribute 'get'" and "KeyError: 'name'": Python's words
    lines = ["[1, 2]", '"plug"', "null", '{"id": "b", "queries": [{"t": 0}]}']
    sessions = tmp_path / "s.jsonl"
    sessions.write_text("\n".join(lines) + "\n")
    code, rows, err = iotgw("identify", "--json", "--sessions", str(sessions))
    assert code == 1 and rows == []
    for n, kind in enumerate(("a list", "a string", "null"), 1):
        assert f'{sessions}:{n}: not a session (a session is a JSON object {{"id", "queries", ...}}, not {kind})' in err
    assert f'{sessions}:4: not a session (a query without a "name")' in err
    assert "Error" not in err


@needs_data
def test_a_session_dhcp_request_is_read_under_other_tools_names_and_an_unread_key_is_said(iotgw, tmp_path):
    # A Withings scale's real DHCP request and DNS, without its MAC: the request is what names it. Fingerbank
    # writes a fingerprint as "1,3,28,6" and the vendor as dhcp_vendor; read as ours, the answer is the same.
    pcap, mac = first_capture("Withings")
    dev = capture_windows(pcap, 30.0).devices[mac]
    request = next(o for o in dev.observations if isinstance(o, DhcpObservation))
    queries = [{"t": o.ts - dev.first_ts, "name": o.name} for o in dev.observations if isinstance(o, DnsObservation)]
    t = request.ts - dev.first_ts
    dhcp = {
        "ours": {"t": t, "param_list": list(request.param_list), "vendor_class": request.vendor_class,
                 "message_type": request.message_type},
        "fingerbank": {"t": t, "dhcp_fingerprint": ",".join(map(str, request.param_list)),
                       "dhcp_vendor": request.vendor_class, "option53": "DHCPDISCOVER", "lease_s": 3600},
        "unread": {"t": t, "opt55": list(request.param_list), "class_id": request.vendor_class},
    }
    sessions = tmp_path / "s.jsonl"
    sessions.write_text("".join(json.dumps({"id": k, "queries": queries, "dhcp": d}) + "\n" for k, d in dhcp.items()))
    code, rows, err = iotgw("identify", "--json", "--sessions", str(sessions))
    assert code == 0  # keys it could not read are a warning: every session was identified
    answers = {r.pop("id"): r for r in rows}
    assert answers["ours"]["manufacturer"] == "Withings"
    assert answers["fingerbank"] == answers["ours"]
    assert answers["unread"] != answers["ours"]  # judged without the request: the test shows the request counts
    assert "dhcp keys not read: 'class_id' (first in session unread), 'lease_s'" in err
    assert "'opt55'" in err


def test_a_null_dhcp_field_is_absent_and_a_dhcp_or_query_that_is_no_object_is_a_clear_bad_line(iotgw, tmp_path):
    # Tools that write a record per request give null for an option the device did not send (Fingerbank's
    # dhcp_vendor or dhcp_fingerprint): that is the option absent, as a null hostname always was, not a bad line
    plug = [{"t": 0.0, "name": "devs.tplinkcloud.com"}]
    lines = [
        {"id": "absent", "queries": plug, "dhcp": {"dhcp_vendor": "udhcp 1.15.2"}},
        {"id": "nulls", "queries": plug, "dhcp": {"dhcp_vendor": "udhcp 1.15.2", "dhcp_fingerprint": None,
                                                  "hostname": None, "option53": None}},
        {"id": "text", "queries": plug, "dhcp": ["t"]},
        {"id": "lists", "queries": plug, "dhcp": [["t", 0]]},
        {"id": "query", "queries": ["t"]},
    ]
    sessions = tmp_path / "s.jsonl"
    sessions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, rows, err = iotgw("identify", "--json", "--sessions", str(sessions))
    assert code == 1 and "Traceback" not in err and "TypeError" not in err
    answers = {r.pop("id"): r for r in rows}
    assert list(answers) == ["absent", "nulls"] and answers["nulls"] == answers["absent"]
    assert f'{sessions}:3: not a session ("dhcp" must be an object or a list of them)' in err
    assert f'{sessions}:4: not a session ("dhcp" must be an object or a list of them)' in err
    assert f'{sessions}:5: not a session ("queries" must be a list of objects' in err


def test_a_session_id_with_control_characters_is_printed_escaped_never_as_another_line(tmp_path, capsys):
    forged = "a\nforged 00:11:22:33:44:55  D-Link / D-LinkCam / camera  conf 1.00  decided 0.1s"
    sessions = tmp_path / "s.jsonl"
    lines = [{"id": forged, "queries": [{"t": 0, "name": "www.meethue.com"}]}, {"id": "\x1b[2Jb", "queries": []}]
    sessions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["identify", "--sessions", str(sessions)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "\x1b" not in "".join(out)
    assert out[0].startswith(repr(forged) + "  ") and out[1].startswith(repr("\x1b[2Jb") + "  ")


def test_a_byte_order_mark_before_the_first_session_is_no_bad_line(iotgw, tmp_path):
    # what Windows editors and PowerShell's Out-File write at the start of a UTF-8 file
    line = b'{"id": "a", "queries": [{"t": 0.0, "name": "devs.tplinkcloud.com"}]}\n'
    sessions = tmp_path / "s.jsonl"
    sessions.write_bytes(b"\xef\xbb\xbf" + line + line.replace(b'"a"', b'"b"'))
    code, rows, err = iotgw("identify", "--json", "--sessions", str(sessions))
    assert (code, err) == (0, "")
    assert [(r["id"], r["manufacturer"]) for r in rows] == [("a", "TP-Link"), ("b", "TP-Link")]


def test_a_session_observation_without_a_time_is_at_the_sessions_first(iotgw, tmp_path):
    # a DHCP request given without "t" beside queries timed in epoch seconds: at their start, not at 0, where
    # every query would fall outside the window
    queries = [{"t": 1700000000.0, "name": "devs.tplinkcloud.com"}, {"t": 1700000001.0, "name": "pool.ntp.org"}]
    dhcp = {"hostname": "HS110", "param_list": [1, 3, 6, 12, 15, 28, 42]}
    lines = [{"id": "untimed", "queries": queries, "dhcp": dhcp}]
    lines.append({"id": "timed", "queries": queries, "dhcp": dict(dhcp, t=1700000000.0)})
    sessions = tmp_path / "s.jsonl"
    sessions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, rows, _ = iotgw("identify", "--json", "--sessions", str(sessions))
    assert code == 0 and rows[0]["manufacturer"] == "TP-Link" and rows[0]["known"]
    assert {k: v for k, v in rows[0].items() if k != "id"} == {k: v for k, v in rows[1].items() if k != "id"}


def test_feature_hashing_is_stable_across_processes():
    code = (
        "import hashlib\n"
        "from identifier.features import FeatureConfig, window_vector\n"
        "from identifier.observation import DnsObservation, DhcpObservation, MdnsObservation\n"
        "obs = [DhcpObservation(0.1, 'DCH-S220', (1, 3, 6), 'udhcp 1.21.1'),\n"
        "       MdnsObservation(2.0, ('dch0D60.local',), ('_dhnap._tcp.local',)),\n"
        "       DnsObservation(3.0, 'wrpd.dlink.com'), DnsObservation(3.5, 'wrpd.dlink.com')]\n"
        "v = window_vector(obs, '90:8d:78:dd:0d:60', 0.0, FeatureConfig())\n"
        "print(hashlib.sha256(v.tobytes()).hexdigest(), int((v > 0).sum()))\n"
    )
    outputs = set()
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        outputs.add(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT
            ).stdout
        )
    assert len(outputs) == 1
    assert int(outputs.pop().split()[1]) >= 10  # the tokens really landed in buckets


def test_the_daemon_path_never_imports_torch():
    code = (
        "import sys\n"
        "from identifier.stream import Identifier\n"
        "from identifier.observation import DnsObservation\n"
        "s = Identifier.load().session('50:c7:bf:00:00:01', 0.0)\n"
        "s.update(DnsObservation(0.2, 'devs.tplinkcloud.com'))\n"
        "print(s.current().manufacturer, 'torch' in sys.modules, 'sklearn' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout.split()
    assert out == ["TP-Link", "False", "False"]


@needs_data
def test_streaming_commits_early_and_only_once_confident():
    ident = Identifier.load()
    pcap, mac = first_capture("HueBridge")
    dev = capture_windows(pcap, 60.0).devices[mac]
    session = ident.session(mac, dev.first_ts)
    assert session.current().decided_after_s is None
    decisions = [d for d in (session.update(o) for o in dev.observations) if d is not None]
    assert decisions, "never committed"
    first = decisions[0]
    assert first.device_type == "HueBridge" and first.manufacturer == "Philips" and first.known
    assert first.decided_after_s is not None and first.decided_after_s <= 5.0
    assert first.confidence >= ident.bundle.thresholds.commit
    assert len(first.alternatives) == 3 and first.alternatives[0][0] == "HueBridge"
    assert first.model_version == ident.version and first.signals
    assert session.current() == decisions[-1]


@needs_data
def test_the_mac_production_block_tells_apart_siblings_whose_traffic_is_the_same():
    """iKettle2 and SmarterCoffee send the same first minute; the block their unit's MAC was made in differs."""
    ident = Identifier.load()
    pcap, kettle = first_capture("iKettle2")
    _, coffee = first_capture("SmarterCoffee")
    observations = capture_windows(pcap, 30.0).devices[kettle].observations

    def identity(identifier: Identifier, mac: str) -> Identity:
        session = identifier.session(mac, observations[0].ts)
        for obs in observations:
            session.update(obs)
        return session.current()

    def answer(identifier: Identifier, mac: str) -> str:
        return identity(identifier, mac).device_type

    assert answer(ident, kettle) == "iKettle2"
    assert "macblock" in identity(ident, kettle).signals
    assert "macblock" not in identity(ident, kettle[:9] + "ff:ff:ff").signals
    assert answer(ident, coffee) == "SmarterCoffee"  # the kettle's own packets, from a coffee machine's MAC
    assert blocks(kettle) == [kettle.replace(":", "")[:9], kettle.replace(":", "")[:8]]
    assert ident.block_prior(kettle[:9] + "ff:ff:ff") is None  # another run: the net alone decides
    assert blocks("02:11:22:33:44:55") == []  # a randomised MAC names no production run
    assert Identifier.load(signals=("dns",)).block_prior(kettle) is None  # DNS only sees no MAC

    # A home's confirmed device names its block for that home: a second unit from the same run follows it.
    bought_together = ("5c:cf:7f:99:90:01", "5c:cf:7f:99:90:02")  # a run the bundle has never seen
    assert ident.block_prior(bought_together[1]) is None
    for confirmed in ("SmarterCoffee", "iKettle2"):
        ident.set_confirmed([(bought_together[0], confirmed), ("02:11:22:33:44:55", "iKettle2")])
        assert answer(ident, bought_together[1]) == confirmed
    ident.set_confirmed([])  # the confirmation withdrawn (or the device deleted)
    assert ident.block_prior(bought_together[1]) is None
    assert answer(ident, coffee) == "SmarterCoffee"  # the shipped blocks stay


@needs_data
def test_without_a_vendor_specific_name_only_a_nearly_certain_combination_is_known(iotgw, tmp_path):
    # An Edimax plug's first 20 s of DNS: www.google.com at once, then nothing; no name only Edimax uses, but
    # no other vendor in training opens like that, and the model is nearly certain.
    pcap = CAPTURES / "EdimaxPlug1101W" / "Setup-A-1-STA.pcap"
    code, rows, _ = iotgw("identify", "--json", "--signals", "dns", "--window", "20", str(pcap))
    assert code == 0
    row = next(r for r in rows if r["mac"] == "74:da:38:4a:76:49")
    assert row["known"] and row["manufacturer"] == "Edimax"
    # Names many vendors use, without that opening: no vendor is nearly certain, so unknown.
    sessions = tmp_path / "generic.jsonl"
    queries = [{"t": 0.0, "name": "www.google.com"}, {"t": 0.0, "name": "pool.ntp.org"}]
    sessions.write_text(json.dumps({"id": "generic", "queries": queries}) + "\n")
    code, rows, _ = iotgw("identify", "--json", "--sessions", str(sessions))
    assert code == 0 and rows[0]["known"] is False


def test_shipped_bundle_is_small_and_serves_demo_prototypes_and_profiles():
    size = sum(f.stat().st_size for f in DEFAULT_DIR.iterdir())
    assert size < 1_000_000
    ident = Identifier.load()
    protos = ident.prototypes()
    assert "HueBridge" in protos and "WeMoSwitch" in protos
    hits = 0
    sentinel_types = [t for t in protos if "manufacturer" in ident.bundle.type_info.get(t, {})]
    ouis = ident.oui_prefixes()
    assert set(ouis) == set(sentinel_types)
    for dtype in sentinel_types:
        seq = protos[dtype]
        assert seq[0].ts >= 0.0 and all(a.ts <= b.ts for a, b in zip(seq, seq[1:], strict=False))
        # the demo's virtual device: its prototype's registered vendor prefix, a recognisable demo device part
        mac = demo_mac(ouis[dtype], 10)
        assert mac.endswith(":de:40:0a") and vendor(mac) is not None
        assert vendor(mac) == vendor(ouis[dtype] + ":00:00:00")
        s = ident.session(mac, 0.0)
        for obs in seq:
            s.update(obs)
        hits += s.current().device_type == dtype
    assert hits >= 0.8 * len(sentinel_types)
    profiles = ident.profiles()
    assert "dlink.com" in profiles["D-LinkSiren"]
    assert all(isinstance(s, str) for slds in profiles.values() for s in slds)


def test_identifier_imports_nothing_from_the_layers_above():
    for path in (ROOT / "identifier").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            for name in names:
                assert name.split(".")[0] not in ("gateway", "policy", "webui"), f"{path.name} imports {name}"
