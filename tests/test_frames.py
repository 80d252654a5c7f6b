"""The frame parser on real captures and on frames built with scapy."""

from __future__ import annotations

import gzip
import json
import os
import random
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dns import DNS, DNSQR, DNSRR
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, PadN
from scapy.layers.l2 import LLC, STP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.packet import Padding, Raw
from scapy.utils import PcapNgWriter, PcapWriter, wrpcap

from gateway.capture.frames import MalformedPacket, SplitDnsMessage, parse_frame
from gateway.capture.pcap import PcapError, Skipped, read_frames
from gateway.capture.replay import replay
from gateway.capture.windows import capture_windows
from gateway.events import AddressSeen, DeviceSeen, DhcpSeen, DnsQuery, MdnsSeen, PacketSeen
from identifier.observation import DnsObservation
from tests.shared_data import CAPTURES, needs_data

MAC = "02:11:22:33:44:55"


def test_dns_query_frame_gives_query_with_sld():
    frame = bytes(Ether(src=MAC) / IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=40000, dport=53)
                  / DNS(rd=1, qd=DNSQR(qname="Time.Example.CO.UK.", qtype="AAAA")))
    (event,) = parse_frame(frame, 5.0)
    assert isinstance(event, DnsQuery)
    assert (event.mac, event.client, event.qname, event.sld, event.qtype) == (
        MAC, "10.0.0.7", "time.example.co.uk", "example.co.uk", 28)


def test_dhcp_request_gives_fingerprint_and_address():
    opts = [("message-type", "request"), ("hostname", b"cam-1"), ("param_req_list", [1, 3, 6, 15, 119]),
            ("vendor_class_id", b"udhcp 1.2"), ("requested_addr", "10.0.0.9"), "end"]
    frame = bytes(Ether(src=MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                  / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex(MAC.replace(":", ""))) / DHCP(options=opts))
    events = parse_frame(frame, 1.0)
    dhcp = next(e for e in events if isinstance(e, DhcpSeen))
    assert dhcp.hostname == "cam-1" and dhcp.param_list == (1, 3, 6, 15, 119)
    assert dhcp.vendor_class == "udhcp 1.2" and dhcp.message_type == 3 and dhcp.ip == "10.0.0.9"
    assert AddressSeen(1.0, MAC, "10.0.0.9", "dhcp") in events


@pytest.mark.parametrize("message_type", ["decline", "release"])
def test_a_dhcp_decline_or_release_maps_no_address_to_the_client(message_type):
    # a DECLINE's option 50 is an address the client found in use by another host; a RELEASE gives one up
    opts = [("message-type", message_type), ("requested_addr", "10.0.0.9"), ("server_id", "10.0.0.1"), "end"]
    frame = bytes(Ether(src=MAC, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                  / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex(MAC.replace(":", ""))) / DHCP(options=opts))
    events = parse_frame(frame, 1.0)
    assert [type(e) for e in events] == [DhcpSeen]
    assert events[0].message_type == {"decline": 4, "release": 7}[message_type]


def _dhcp_request(src: str, chaddr: str, giaddr: str = "0.0.0.0") -> bytes:
    opts = [("message-type", "request"), ("hostname", b"cam-1"), ("requested_addr", "10.0.0.9"), "end"]
    return bytes(Ether(src=src, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
                 / UDP(sport=68, dport=67) / BOOTP(chaddr=bytes.fromhex(chaddr.replace(":", "")), giaddr=giaddr)
                 / DHCP(options=opts))


@pytest.mark.parametrize("chaddr", ["ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "02:99:99:99:99:99"])
def test_a_dhcp_request_is_credited_to_its_sender_not_to_the_chaddr_it_claims(chaddr):
    events = parse_frame(_dhcp_request(MAC, chaddr), 1.0)
    assert [type(e) for e in events] == [DhcpSeen, AddressSeen]
    assert {e.mac for e in events} == {MAC}


def test_a_relayed_dhcp_request_is_credited_to_the_client_its_chaddr_names():
    client = "02:99:99:99:99:99"
    events = parse_frame(_dhcp_request(MAC, client, giaddr="10.1.0.1"), 1.0)  # MAC is the relay agent here
    assert events[0].hostname == "cam-1" and {e.mac for e in events} == {client}
    assert AddressSeen(1.0, client, "10.0.0.9", "dhcp") in events


@pytest.mark.parametrize("chaddr", ["ff:ff:ff:ff:ff:ff", "01:00:5e:00:00:01", "00:00:00:00:00:00"])
def test_a_relayed_dhcp_request_naming_no_client_is_malformed(chaddr):
    with pytest.raises(MalformedPacket, match="relayed"):
        parse_frame(_dhcp_request(MAC, chaddr, giaddr="10.1.0.1"), 1.0)


@pytest.mark.parametrize("payload", [b"\x00", b"\xff" * 11, b"\x12\x34\x01\x00\x00\x05" + b"\x00" * 4])
def test_garbage_dns_payload_is_malformed(payload):
    frame = bytes(Ether(src=MAC) / IP(src="10.0.0.7") / UDP(sport=1000, dport=53) / payload)
    with pytest.raises(MalformedPacket):
        parse_frame(frame, 0.0)


def test_vlan_tags_in_a_pcap_are_skipped(tmp_path):
    dns = IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=40000, dport=53) / DNS(rd=1, qd=DNSQR(qname="a.example.org"))
    frames = [Ether(src=MAC) / Dot1Q(vlan=10) / dns,
              Ether(src=MAC) / Dot1AD(vlan=100) / Dot1Q(vlan=10) / dns,
              Ether(src=MAC, type=0x9100) / Dot1Q(vlan=100) / Dot1Q(vlan=10) / dns]
    pcap = tmp_path / "tagged.pcap"
    wrpcap(str(pcap), frames)
    events = [e for ts, frame in read_frames(pcap) for e in parse_frame(frame, ts)]
    assert [(e.mac, e.client, e.qname) for e in events] == [(MAC, "10.0.0.7", "a.example.org")] * 3


@pytest.mark.parametrize("ihl", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("others", [False, True])
def test_an_ipv4_header_length_below_20_bytes_is_malformed(ihl, others):
    """Read as given, the ports would come from inside the IP header."""
    frame = bytes(Ether(src=MAC) / IP(src="10.0.0.7", ihl=ihl) / UDP(sport=40000, dport=53)
                  / DNS(rd=1, qd=DNSQR(qname="a.example.org")))
    with pytest.raises(MalformedPacket, match="IPv4 header length"):
        parse_frame(frame, 0.0, others=others)


@pytest.mark.parametrize("l4", [UDP(sport=40000, dport=53) / DNS(rd=1, qd=DNSQR(qname="a.example.org")),
                                TCP(sport=40000, dport=443)], ids=["udp", "tcp"])
def test_an_ipv4_header_length_past_the_frame_is_malformed(l4):
    frame = bytes(Ether(src=MAC) / IP(src="10.0.0.7", ihl=15) / l4)  # says 60 bytes of header, holds 20
    assert len(frame) < 14 + 60
    with pytest.raises(MalformedPacket, match="runs past the frame"):
        parse_frame(frame, 0.0, others=True)


def test_a_fragmented_mdns_announcement_is_a_fragment_not_malformed_live_in_replay_and_in_windows(tmp_path):
    """The first fragment holds the UDP header and part of the payload: incomplete, not malformed. It is a
    "fragment" packet like the later ones, and replay and the identification windows count no malformed frame."""
    records = [DNSRR(rrname=f"_svc{i}._tcp.local", type="PTR", rdata=f"lamp {i}._svc{i}._tcp.local")
               for i in range(60)]
    announcement = (Ether(src=MAC, dst="01:00:5e:00:00:fb") / IP(src="10.0.0.20", dst="224.0.0.251")
                    / UDP(sport=5353, dport=5353) / DNS(qr=1, aa=1, an=records))
    frames = [Ether(src=MAC, dst="01:00:5e:00:00:fb") / ip for ip in fragment(announcement[IP], fragsize=1400)]
    assert len(frames) > 1 and frames[0][IP].flags.MF and frames[0][IP].frag == 0
    for frame in frames:
        assert parse_frame(bytes(frame), 1.0) == []
        assert parse_frame(bytes(frame), 1.0, others=True) == [PacketSeen(1.0, MAC, "10.0.0.20", "fragment")]
    pcap = tmp_path / "fragmented.pcap"
    wrpcap(str(pcap), frames)
    replayed: list = []
    result = replay([pcap], replayed.extend)
    assert (result.frames, result.malformed) == (len(frames), 0)
    stamps = [ts for ts, _ in read_frames(pcap)]
    assert replayed == [DeviceSeen(stamps[0], MAC, "10.0.0.20"),  # present from its first frame, as ever
                        *(PacketSeen(ts, MAC, "10.0.0.20", "fragment") for ts in stamps)]
    windows = capture_windows(pcap)
    assert windows.malformed == 0
    assert [obs.proto for obs in windows.devices[MAC].observations] == ["fragment"] * len(frames)


def test_short_frame_is_malformed():
    with pytest.raises(MalformedPacket):
        parse_frame(b"\x00" * 10, 0.0)


@needs_data
def test_real_capture_hue_bridge_dhcp_dns_and_mdns():
    pcap = sorted((CAPTURES / "HueBridge").glob("*.pcap"))[0]
    events = [e for ts, frame in read_frames(pcap) for e in parse_frame(frame, ts)]
    mac = (CAPTURES / "HueBridge" / "_iotdevice-mac.txt").read_text().strip().lower()
    assert any(isinstance(e, DhcpSeen) and e.mac == mac and e.hostname == "Philips-hue" for e in events)
    assert any(isinstance(e, DnsQuery) and e.sld == "meethue.com" for e in events)
    assert any(isinstance(e, MdnsSeen) and "_hap._tcp.local" in e.services for e in events)


def test_an_mdns_querys_known_answers_are_not_credited_to_the_asker():
    # RFC 6762 7.1: a query's answer section lists records the asker cached from other hosts
    query = (Ether(src=MAC, dst="01:00:5e:00:00:fb") / IP(src="10.0.0.20", dst="224.0.0.251")
             / UDP(sport=5353, dport=5353)
             / DNS(qr=0, qd=[DNSQR(qname="_hap._tcp.local", qtype="PTR"), DNSQR(qname="lamp.local", qtype="A")],
                   an=[DNSRR(rrname="_hap._tcp.local", type="PTR", ttl=4500, rdata="Lamp._hap._tcp.local"),
                       DNSRR(rrname="lamp.local", type="A", ttl=120, rdata="10.0.0.60"),
                       DNSRR(rrname="_airplay._tcp.local", type="PTR", ttl=4500, rdata="TV._airplay._tcp.local")]))
    events = parse_frame(bytes(query), 1.0)
    assert events == [MdnsSeen(1.0, MAC, "10.0.0.20", (), ("_hap._tcp.local",)),
                      AddressSeen(1.0, MAC, "10.0.0.20", "packet")]


def test_an_mdns_probe_credits_its_authority_records_and_a_response_its_answers():
    probe = (Ether(src=MAC) / IP(src="10.0.0.20", dst="224.0.0.251") / UDP(sport=5353, dport=5353)
             / DNS(qr=0, qd=[DNSQR(qname="plug-1.local", qtype=255)],
                   ns=[DNSRR(rrname="plug-1.local", type="A", ttl=120, rdata="10.0.0.20")]))
    response = (Ether(src=MAC) / IP(src="10.0.0.20", dst="224.0.0.251") / UDP(sport=5353, dport=5353)
                / DNS(qr=1, aa=1, an=[DNSRR(rrname="plug-1.local", type="A", ttl=120, rdata="10.0.0.20")]))
    for frame in (probe, response):
        (seen, _) = parse_frame(bytes(frame), 1.0)
        assert seen.names == ("plug-1.local",)


def test_not_a_pcap_names_the_file(tmp_path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture at all")
    with pytest.raises(PcapError, match="bad.pcap"):
        list(read_frames(bad))


def _section(path: Path, packets, linktype: int) -> bytes:  # noqa: ANN001 - scapy packets
    """The bytes of a one-section pcapng of ``packets`` on one interface of ``linktype``."""
    _write(path, packets, linktype, ng=True)
    return path.read_bytes()


def test_pcapng_sections_joined_by_cat_each_read_with_their_own_interfaces(tmp_path):
    """Each section of a pcapng counts its interfaces from 0: scapy kept the first section's, so the second's
    cooked packets were read with the first's Ethernet link type, as frames from a MAC made of their header."""
    query = IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=4000, dport=53) / DNS(rd=1, qd=DNSQR(qname="a.org"))
    ethernet = _section(tmp_path / "eth.pcapng", [Ether(src=MAC, dst="02:00:00:00:00:01") / query], 1)
    cooked = _section(tmp_path / "any.pcapng", [_cooked(True, 0, query)], 276)
    joined = tmp_path / "joined.pcapng"
    joined.write_bytes(ethernet + cooked)
    got = [frame for _, frame in read_frames(joined)]
    assert [frame[6:12].hex(":") for frame in got] == [MAC, "50:c7:bf:00:00:01"]
    assert [frame[14:] for frame in got] == [bytes(query)] * 2

    # the second section's packet names its interface 1, which only the first section's list would have held
    two_sections, at = bytearray(cooked + ethernet), len(cooked)
    while struct.unpack_from("<I", two_sections, at)[0] != 6:  # block by block to its Enhanced Packet Block
        at += struct.unpack_from("<I", two_sections, at + 4)[0]
    struct.pack_into("<I", two_sections, at + 8, 1)
    joined.write_bytes(bytes(two_sections))
    with pytest.raises(PcapError, match="joined.pcapng: corrupt after 1 records: .*interface 1"):
        list(read_frames(joined))


def _dns_frames(n: int) -> list[Ether]:
    frames = [Ether(src=MAC) / IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=40000 + i, dport=53)
              / DNS(rd=1, qd=DNSQR(qname=f"q{i}.example.org")) for i in range(n)]
    for i, frame in enumerate(frames):
        frame.time = 1700000000.25 + 0.5 * i
    return frames


def test_a_nanosecond_pcap_gives_the_recorded_times(tmp_path):
    pcap = tmp_path / "nano.pcap"
    writer = PcapWriter(str(pcap), nano=True, linktype=1)
    for frame in _dns_frames(3):
        writer.write(frame)
    writer.close()
    times = [ts for ts, _ in read_frames(pcap)]
    assert times == pytest.approx([1700000000.25, 1700000000.75, 1700000001.25], rel=0, abs=1e-6)


def test_a_link_type_not_read_is_refused_naming_the_file_and_the_types_read(tmp_path):
    pcapng = tmp_path / "raw.pcapng"  # raw IP (LINKTYPE_RAW 101): no link-layer address, so no device MAC
    writer = PcapNgWriter(str(pcapng))
    writer.linktype = 101
    writer.write(IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=4000, dport=53) / DNS(rd=1, qd=DNSQR(qname="a.org")))
    writer.close()
    with pytest.raises(PcapError, match=r"raw.pcapng: link type 101 is not one read here: Ethernet \(1\), "
                                        r"Linux cooked SLL \(113\) and SLL2 \(276\)"):
        list(read_frames(pcapng))


def _cooked(v2: bool, pkttype: int, payload, src: bytes = bytes.fromhex("50c7bf000001"), hatype: int = 1,
            halen: int = 6, proto: int = 0x0800):
    """A packet as `tcpdump -i any` writes it: SLL (113) or SLL2 (276), with its 8-byte address field."""
    cls = CookedLinuxV2 if v2 else CookedLinux
    return cls(pkttype=pkttype, lladdrtype=hatype, lladdrlen=halen, src=src.ljust(8, b"\0"), proto=proto) / payload


def _write(path, packets, linktype: int, ng: bool) -> None:
    if ng:
        writer = PcapNgWriter(str(path))
        writer.linktype = linktype  # the interface description block's link type
    else:
        writer = PcapWriter(str(path), linktype=linktype)
    for i, pkt in enumerate(packets):
        pkt.time = 1700000000 + i
        writer.write(pkt)
    writer.close()


@pytest.mark.parametrize("v2,linktype", [(False, 113), (True, 276)])
@pytest.mark.parametrize("ng", [False, True], ids=["pcap", "pcapng"])
def test_a_linux_cooked_capture_is_read_as_the_ethernet_frames_its_packets_stand_for(tmp_path, v2, linktype, ng):
    dev = bytes.fromhex("50c7bf000001")
    query = IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=4000, dport=53) / DNS(rd=1, qd=DNSQR(qname="a.example.org"))
    dhcp = (IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) / BOOTP(chaddr=dev)
            / DHCP(options=[("message-type", "discover"), ("hostname", b"plug-1"), "end"]))
    mdns = IP(src="10.0.0.7", dst="224.0.0.251") / UDP(sport=5353, dport=5353) / DNS(qd=DNSQR(qname="_hap._tcp.local"))
    mld = IPv6(src="fe80::1", dst="ff02::1:ff00:7") / UDP(sport=1, dport=2)
    stp = LLC(dsap=0x42, ssap=0x42, ctrl=3) / STP()
    answer = IP(src="10.0.0.1", dst="10.0.0.7") / UDP(sport=53, dport=4000) / DNS(qr=1, qd=DNSQR(qname="a.example.org"))
    packets = [
        _cooked(v2, 0, query),  # to us
        _cooked(v2, 1, dhcp),  # broadcast
        _cooked(v2, 2, mdns),  # multicast
        _cooked(v2, 2, mld, proto=0x86DD),
        _cooked(v2, 2, stp, src=bytes.fromhex("0a0000000002"), proto=0x0004),  # 802.2 LLC: a length in Ethernet
        _cooked(v2, 3, query, src=bytes.fromhex("50c7bf000003")),  # to another host (a bridge port)
        _cooked(v2, 4, answer, src=bytes.fromhex("0a00000000fe")),  # outgoing: the capturing host's own
        _cooked(v2, 0, query, src=b"\0" * 6, hatype=772),  # loopback: a 6-byte address of zeros
        _cooked(v2, 0, query, src=b"", hatype=65534, halen=0),  # WireGuard, a tun device: no address
    ]
    path = tmp_path / ("cooked.pcapng" if ng else "cooked.pcap")
    _write(path, packets, linktype, ng)
    skipped = Skipped()
    got = list(read_frames(path, skipped))
    assert [ts for ts, _ in got] == pytest.approx([1700000000 + i for i in range(6)])
    assert [frame[12:14] for _, frame in got] == [b"\x08\x00", b"\x08\x00", b"\x08\x00", b"\x86\xdd",
                                                  len(stp).to_bytes(2, "big"), b"\x08\x00"]  # 802.3: a length
    frames = [Ether(frame) for _, frame in got]
    assert [(f.dst, f.src) for f in frames] == [
        ("00:00:00:00:00:00", "50:c7:bf:00:00:01"),
        ("ff:ff:ff:ff:ff:ff", "50:c7:bf:00:00:01"),
        ("01:00:5e:00:00:fb", "50:c7:bf:00:00:01"),  # the group the IP destination maps to
        ("33:33:ff:00:00:07", "50:c7:bf:00:00:01"),
        ("01:00:00:00:00:00", "0a:00:00:00:00:02"),  # no IP header to tell the group: still a group address
        ("00:00:00:00:00:00", "50:c7:bf:00:00:03"),
    ]
    assert [bytes(f.payload) for f in frames] == [bytes(p) for p in (query, dhcp, mdns, mld, stp, query)]
    assert (skipped.outgoing, skipped.not_ethernet, skipped.short) == (1, 2, 0)
    assert str(skipped) == "3 packets skipped (1 sent by the capturing host, 2 not from an Ethernet interface)"
    events = [e for _, frame in got for e in parse_frame(frame, 0.0)]
    assert {(type(e).__name__, e.mac) for e in events} >= {
        ("DnsQuery", "50:c7:bf:00:00:01"), ("DhcpSeen", "50:c7:bf:00:00:01"), ("MdnsSeen", "50:c7:bf:00:00:01"),
        ("DnsQuery", "50:c7:bf:00:00:03")}


@pytest.mark.parametrize("linktype,header", [(113, 16), (276, 20)])
def test_a_cooked_packet_shorter_than_its_header_is_counted_and_the_rest_read(tmp_path, linktype, header):
    path = tmp_path / "short.pcap"
    query = _cooked(linktype == 276, 0, IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=4000, dport=53)
                    / DNS(rd=1, qd=DNSQR(qname="a.example.org")))
    _write(path, [Raw(bytes(query)[: header - 1]), query], linktype, ng=False)
    skipped = Skipped()
    got = list(read_frames(path, skipped))
    assert [Ether(frame).src for _, frame in got] == ["50:c7:bf:00:00:01"]
    assert (skipped.short, skipped.total) == (1, 1)


def test_a_pcap_record_longer_than_the_snaplen_is_corrupt_after_the_frames_before_it(tmp_path):
    pcap = tmp_path / "huge.pcap"
    wrpcap(str(pcap), _dns_frames(3))
    data = bytearray(pcap.read_bytes())
    third = 24 + 2 * (16 + len(bytes(_dns_frames(3)[0])))  # every frame here has the same length
    data[third + 8 : third + 16] = (0x7FFFFFFF).to_bytes(4, "little") * 2  # caplen and wirelen
    pcap.write_bytes(bytes(data))
    got = []
    with pytest.raises(PcapError, match=r"huge.pcap: corrupt record 3: 2147483647 bytes"):
        for ts, _ in read_frames(pcap):
            got.append(ts)
    assert got == pytest.approx([1700000000.25, 1700000000.75], rel=0, abs=1e-6)


def test_a_pcapng_cut_inside_a_block_is_corrupt_after_the_frames_before_it(tmp_path):
    pcapng = tmp_path / "cut.pcapng"
    writer = PcapNgWriter(str(pcapng))
    for frame in _dns_frames(3):
        writer.write(frame)
    writer.close()
    whole = pcapng.read_bytes()
    pcapng.write_bytes(whole[:-10])
    got = []
    with pytest.raises(PcapError, match="cut.pcapng: truncated after 2 records"):
        for ts, _ in read_frames(pcapng):
            got.append(ts)
    assert got == pytest.approx([1700000000.25, 1700000000.75], rel=0, abs=1e-6)


@pytest.mark.parametrize("cut,inside", [(10, "after 64 of its 74 bytes"), (80, "inside its header")])
def test_a_pcap_whose_last_record_is_cut_short_keeps_the_frames_before_it_and_names_the_file(
    tmp_path, caplog, capfd, cut, inside
):
    # a capture stopped while writing: its records are kept, and it is not taken for a whole file
    pcap = tmp_path / "cut.pcap"
    wrpcap(str(pcap), _dns_frames(3))
    pcap.write_bytes(pcap.read_bytes()[:-cut])
    got = []
    with pytest.raises(PcapError, match=f"cut.pcap: truncated after 2 records: the record at byte 204 ends {inside}"):
        for ts, _ in read_frames(pcap):
            got.append(ts)
    assert got == pytest.approx([1700000000.25, 1700000000.75], rel=0, abs=1e-6)
    assert "truncated" not in caplog.text + capfd.readouterr().err  # no scapy warning that names no file


def _edit_pcapng(path: Path, frames: int, edit) -> None:  # noqa: ANN001 - edit(data, packet block offsets)
    """A pcapng of ``frames`` DNS frames, its bytes then changed in place by ``edit``, given each Enhanced Packet
    Block's offset (its type field) in file order."""
    writer = PcapNgWriter(str(path))
    for frame in _dns_frames(frames):
        writer.write(frame)
    writer.close()
    data = bytearray(path.read_bytes())
    blocks, at = [], 0
    while at < len(data):  # block by block: type, total length, ..., so a 6 inside a packet is never taken
        kind, length = struct.unpack_from("<II", data, at)
        if kind == 6:
            blocks.append(at)
        at += length
    edit(data, blocks)
    path.write_bytes(bytes(data))


def test_a_pcapng_packet_naming_an_interface_never_described_is_corrupt_naming_the_file(tmp_path):
    pcapng = tmp_path / "iface.pcapng"
    # the second packet's interface id: the file describes only interface 0
    _edit_pcapng(pcapng, 2, lambda data, blocks: struct.pack_into("<I", data, blocks[1] + 8, 5))
    got = []
    with pytest.raises(PcapError, match="iface.pcapng: corrupt after 1 records: .*interface 5"):
        for ts, _ in read_frames(pcapng):
            got.append(ts)
    assert got == pytest.approx([1700000000.25], rel=0, abs=1e-6)


def test_a_pcapng_record_stamped_past_the_year_9999_is_skipped_and_counted_not_a_device_no_page_can_date(tmp_path):
    """A pcapng time is 64 bits of tsresol units: its second packet here is at about 1.8e13 s (year 572,000).
    Replayed, it made a device first seen then, and every page that dated it could fail."""
    pcapng = tmp_path / "far.pcapng"
    # the second packet's timestamp, its high 32 bits
    _edit_pcapng(pcapng, 3, lambda data, blocks: struct.pack_into("<I", data, blocks[1] + 12, 0xFFFFFFFF))
    skipped = Skipped()
    times = [ts for ts, _ in read_frames(pcapng, skipped)]
    assert len(times) == 2 and all(ts < 2e9 for ts in times)
    assert skipped.bad_time == 1 and "1 stamped past the year 9999" in str(skipped)


def _capture(path: Path, ng: bool, frames: int) -> bytes:
    """The bytes of a pcap or pcapng of ``frames`` DNS frames, written at ``path``."""
    if ng:
        writer = PcapNgWriter(str(path))
        for frame in _dns_frames(frames):
            writer.write(frame)
        writer.close()
    else:
        wrpcap(str(path), _dns_frames(frames))
    return path.read_bytes()


def _through_a_pipe(data: bytes, read):  # noqa: ANN001, ANN202 - read(path) -> what it gives
    """``read`` of a pipe's /dev/fd path (as bash's ``<(...)`` gives), a thread writing ``data`` into it."""
    r, w = os.pipe()

    def write() -> None:
        with open(w, "wb") as pipe:
            pipe.write(data)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        return read(f"/dev/fd/{r}")
    finally:
        writer.join()
        os.close(r)


@pytest.mark.parametrize(("via", "ng", "gz"), [("pipe", False, False), ("pipe", True, False), ("pipe", False, True),
                                               ("pipe", True, True), ("file", True, True)],
                         ids=["pcap-pipe", "pcapng-pipe", "pcap.gz-pipe", "pcapng.gz-pipe", "pcapng.gz-file"])
def test_a_capture_through_a_pipe_or_gzipd_gives_the_frames_of_the_plain_file(tmp_path, via, ng, gz):
    """``identify <(zcat x.pcap.gz)`` said "not a pcap": the magic was read, then scapy reopened the pipe, whose
    first bytes were gone. A gzip'd pcapng was not read even as a file."""
    plain = tmp_path / ("plain.pcapng" if ng else "plain.pcap")
    data = _capture(plain, ng, 5)
    expected = list(read_frames(plain))
    assert len(expected) == 5
    if gz:
        data = gzip.compress(data)
    if via == "pipe":
        got = _through_a_pipe(data, lambda path: list(read_frames(path)))
    else:
        packed = tmp_path / "packed.pcapng.gz"
        packed.write_bytes(data)
        got = list(read_frames(packed))
    assert got == expected


@pytest.mark.parametrize("ng", [False, True], ids=["pcap", "pcapng"])
def test_a_gzipd_capture_cut_short_is_truncated_after_every_frame_before_the_cut(tmp_path, ng):
    """gzip's EOFError for a stream without its end marker was taken for a clean end: exit 0, no word of it."""
    plain = tmp_path / "plain"
    packed = gzip.compress(_capture(plain, ng, 200))
    expected = list(read_frames(plain))
    cut, unpacked = tmp_path / "cut.gz", tmp_path / "unpacked"
    for at in (len(packed) // 3, len(packed) - 9):  # inside the deflate data; inside the CRC and length trailer
        cut.write_bytes(packed[:at])
        # what the cut stream decompresses to, whose complete records are the frames to keep, as for a plain cut
        unpacked.write_bytes(zlib.decompressobj(31).decompress(packed[:at]))
        kept = len(_until_damage(unpacked))
        with pytest.raises(PcapError, match=f"cut.gz: truncated after {kept} records: the gzip stream ends before"):
            list(read_frames(cut))
        assert _until_damage(cut) == expected[:kept] and kept > 0



@pytest.mark.parametrize("ng", [False, True], ids=["pcap", "pcapng"])
def test_a_gzipd_capture_padded_with_zeros_gives_the_frames_of_the_plain_file(tmp_path, ng):
    """gzip and zcat take zeros after the last member (padding to a block, as tape and some copies leave) as the
    end; they were read as the header of another member, 'damaged gzip stream', and the capture as unreadable."""
    plain, padded = tmp_path / "plain", tmp_path / "padded.gz"
    padded.write_bytes(gzip.compress(_capture(plain, ng, 5)) + b"\0" * 10000)
    assert subprocess.run(["gzip", "-t", str(padded)], capture_output=True).returncode == 0
    assert list(read_frames(padded)) == list(read_frames(plain))
    padded.write_bytes(padded.read_bytes() + b"garbage")  # not padding: still named
    with pytest.raises(PcapError, match="padded.gz: unreadable after 5 records: damaged gzip stream"):
        list(read_frames(padded))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_a_pcapng_block_claiming_gigabytes_is_corrupt_before_anything_is_read_into_memory(tmp_path, gz):
    """A block's 32-bit length was read whole: from a gzip'd file, a 300 kB one claiming 300 MiB of zeros took
    950 MB of memory before it was called cut short, and a 4 GB claim ends a Pi; a plain file's read asked for
    the claimed size up front."""
    shb = struct.pack("<II", 0x0A0D0D0A, 28) + struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + struct.pack("<I", 28)
    claimed = 0xFFFFFFF0
    data = shb + struct.pack("<II", 0x80000064, claimed) + b"\0" * (1 << 20)  # a local block type, 1 MiB of it
    path = tmp_path / "huge.pcapng"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(PcapError, match=f"huge.pcapng: corrupt after 0 records: a block of {claimed - 12} bytes"):
        list(read_frames(path))

def _until_damage(path: Path) -> list[tuple[float, bytes]]:
    got = []
    try:
        for item in read_frames(path):
            got.append(item)
    except PcapError:
        pass
    return got


def _simple_packet(data: bytearray, at: int) -> None:
    """The Enhanced Packet Block at ``at`` made a Simple Packet Block of the same frame: no interface, no time."""
    length, caplen, wirelen = (*struct.unpack_from("<I", data, at + 4), *struct.unpack_from("<II", data, at + 20))
    frame = bytes(data[at + 28:at + 28 + caplen]) + b"\0" * (-caplen % 4)
    block = struct.pack("<III", 3, 16 + len(frame), wirelen) + frame + struct.pack("<I", 16 + len(frame))
    data[at:at + length] = block


def test_a_pcapng_simple_packet_takes_the_time_of_the_frame_before_it_and_the_rest_of_the_file_is_read(tmp_path):
    """A Simple Packet Block (no time) was 'corrupt record (unsupported operand type(s) for <<: ...)', and the
    frames after it were lost."""
    plain, spb = tmp_path / "plain.pcapng", tmp_path / "spb.pcapng"
    _capture(plain, True, 4)
    _edit_pcapng(spb, 4, lambda data, blocks: _simple_packet(data, blocks[1]))
    expected = list(read_frames(plain))
    got = list(read_frames(spb))
    assert [frame for _, frame in got] == [frame for _, frame in expected]
    assert [ts for ts, _ in got] == [expected[0][0], expected[0][0], expected[2][0], expected[3][0]]


def test_a_pcapng_simple_packet_before_any_timed_frame_is_skipped_and_counted(tmp_path):
    spb = tmp_path / "spb.pcapng"
    _edit_pcapng(spb, 3, lambda data, blocks: _simple_packet(data, blocks[0]))
    skipped = Skipped()
    times = [ts for ts, _ in read_frames(spb, skipped)]
    assert times == pytest.approx([1700000000.75, 1700000001.25], rel=0, abs=1e-6)
    assert skipped.untimed == 1 and "1 untimed" in str(skipped)


@pytest.mark.parametrize(("ng", "keep"), [(False, 2), (False, 10), (False, 23), (True, 10), (True, 27)],
                         ids=["pcap-magic", "pcap-10", "pcap-23", "pcapng-10", "pcapng-27"])
def test_a_capture_cut_inside_its_file_header_is_truncated_and_scapy_says_nothing(tmp_path, ng, keep, caplog, capfd):
    """Cut in its header, a pcap was 'not a pcap or pcapng file', and a pcapng also let scapy's 'WARNING: PcapNg:
    ...' lines, naming no file, through to stderr."""
    cut = tmp_path / "cut"
    cut.write_bytes(_capture(tmp_path / "whole", ng, 1)[:keep])
    with pytest.raises(PcapError, match="cut: truncated inside its file header"):
        list(read_frames(cut))
    assert "PcapNg" not in caplog.text + capfd.readouterr().err


def test_an_empty_file_is_said_in_our_words(tmp_path):
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    with pytest.raises(PcapError, match=r"^\S*empty.pcap: empty file$"):
        list(read_frames(empty))


@needs_data
def test_identify_reads_a_gzipd_capture_through_a_pipe_and_says_when_one_on_stdin_is_cut(tmp_path):
    pcap = sorted((CAPTURES / "HueBridge").glob("*.pcap"))[0]

    def run(*args: str, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
        return subprocess.run([*args], capture_output=True, text=True, timeout=120, check=False, **kwargs)

    def devices(stdout: str) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "source"} for line in stdout.splitlines()]

    whole = run(sys.executable, "-m", "gateway.cli", "identify", "--json", str(pcap))
    piped = run("bash", "-c", f'"{sys.executable}" -m gateway.cli identify --json <(gzip -c "$1")', "_", str(pcap))
    assert whole.returncode == piped.returncode == 0 and piped.stderr == ""
    assert devices(piped.stdout) == devices(whole.stdout) != []

    cut = tmp_path / "cut.pcap.gz"
    cut.write_bytes(gzip.compress(pcap.read_bytes())[:-100])
    with cut.open("rb") as stdin:
        proc = run(sys.executable, "-m", "gateway.cli", "identify", "--json", "/dev/stdin", stdin=stdin)
    assert proc.returncode == 1 and "iotgw identify: /dev/stdin: truncated after " in proc.stderr


def _udp_frame(payload: bytes, port: int) -> bytes:
    return bytes(Ether(src=MAC) / IP(src="10.0.0.7", dst="224.0.0.251") / UDP(sport=port, dport=port) / payload)


def _pointer_chain_query(size: int) -> bytes:
    """A query of one question whose every answer record is named by one label and a pointer to the name before,
    names growing past 255 bytes. dnslib followed such chains recursively, copying labels at each level: 0.8 s for
    1.5 kB of them as questions, of which a query now holds one (RFC 9619); a question name with a space in it
    is no plain name, so dnslib reads the packet, answers and all."""
    body, starts = b"\x01 \x00\x00\x01\x00\x01", [12]
    while 12 + len(body) + 20 <= size:
        starts.append(12 + len(body))
        body += b"\x03aaa" + struct.pack("!H", 0xC000 | starts[-2]) + struct.pack("!HHIH", 1, 1, 0, 4) + b"\0" * 4
    return struct.pack("!6H", 1, 0x0100, 1, len(starts) - 1, 0, 0) + body


def _mdns_pointing_into(region: bytes, offsets) -> bytes:  # noqa: ANN001 - offsets: an iterable of ints
    """An mDNS response whose A records are named by pointers to ``offsets`` in ``region``, the first question's
    name."""
    offsets = list(offsets)
    rrs = b"".join(struct.pack("!H", 0xC000 | (12 + i)) + struct.pack("!HHIH", 1, 1, 120, 4) + b"\x0a\0\0\x01"
                   for i in offsets)
    return struct.pack("!6H", 0, 0x8400, 1, len(offsets), 0, 0) + region + b"\x00\x01\x00\x01" + rrs


def test_a_dns_query_whose_names_chain_pointers_past_255_bytes_is_malformed():
    with pytest.raises(MalformedPacket, match="255"):
        parse_frame(_udp_frame(_pointer_chain_query(1472), 53), 0.0)


def test_a_dns_query_with_a_plain_name_longer_than_255_bytes_is_malformed():
    name = b"\x3f" + b"a" * 63
    payload = struct.pack("!6H", 1, 0x0100, 1, 0, 0, 0) + name * 5 + b"\x00\x00\x01\x00\x01"
    with pytest.raises(MalformedPacket, match="255"):
        parse_frame(_udp_frame(payload, 53), 0.0)


def test_an_mdns_packet_whose_pointers_make_names_longer_than_255_bytes_is_malformed():
    # Before: 80 names of up to 1,199 characters (89,600 in all) from one 2.5 kB packet.
    payload = _mdns_pointing_into(b"\x01a" * 600 + b"\x00", range(0, 160, 2))
    with pytest.raises(MalformedPacket, match="255"):
        parse_frame(_udp_frame(payload, 5353), 0.0)


def test_an_mdns_name_with_a_label_longer_than_63_bytes_is_malformed():
    region = b"\x40" + b"a" * 64 + b"\x00"  # 0x40 starts an extended label type, not a 64-byte label
    with pytest.raises(MalformedPacket, match="63"):
        parse_frame(_udp_frame(_mdns_pointing_into(region, [0]), 5353), 0.0)


def _ipv6_query(*extensions) -> bytes:  # noqa: ANN002 - scapy extension header layers
    packet = Ether(src=MAC) / IPv6(src="fd00::7", dst="2001:db8::53")
    for extension in extensions:
        packet = packet / extension
    return bytes(packet / UDP(sport=40000, dport=53) / DNS(rd=1, qd=DNSQR(qname="tracker.example.com")))


@pytest.mark.parametrize("extensions", [
    (IPv6ExtHdrDestOpt(),),
    (IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(), IPv6ExtHdrDestOpt(options=[PadN(optdata=b"\0" * 12)])),
    (IPv6ExtHdrFragment(offset=0, m=0, id=7),),  # an atomic fragment (RFC 6946) holds the whole datagram
    (IPv6ExtHdrFragment(offset=0, res2=3, m=0, id=7),),  # its reserved bits are ignored on receipt (RFC 8200 4.5)
], ids=["destination-options", "three-headers", "atomic-fragment", "atomic-fragment-reserved-bits"])
def test_a_dns_query_behind_ipv6_extension_headers_is_seen(extensions):
    (event,) = parse_frame(_ipv6_query(*extensions), 1.0)
    assert isinstance(event, DnsQuery) and (event.client, event.qname) == ("fd00::7", "tracker.example.com")


def test_an_ipv6_fragment_is_a_fragment_not_decoded():
    frame = _ipv6_query(IPv6ExtHdrFragment(offset=0, m=1, id=7))
    assert parse_frame(frame, 1.0) == []
    assert parse_frame(frame, 1.0, others=True) == [PacketSeen(1.0, MAC, "fd00::7", "fragment")]


def test_an_mdns_packet_larger_than_rfc_6762_allows_is_malformed():
    """A pcap's frame can be 256 KiB; before, this 65 kB one gave 3,262 names in one event."""
    records = b"".join(bytes([len(b"%x" % i)]) + b"%x" % i + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 120, 4)
                       + b"\x0a\0\0\x01" for i in range(3262))
    payload = struct.pack("!6H", 0, 0x8400, 1, 3262, 0, 0) + b"\x05local\x00\x00\x01\x00\x01" + records
    with pytest.raises(MalformedPacket, match="9000"):
        parse_frame(_udp_frame(payload, 5353), 0.0)


def _tcp_dns(data: bytes, v6: bool = False, flags: str = "PA", seq: int = 1, sport: int = 40000) -> Ether:
    """A device's TCP segment to port 53 carrying ``data``: what its resolver writes, each message after its
    2-byte length (RFC 1035 4.2.2)."""
    ip = IPv6(src="fd00::7", dst="fd00::53") if v6 else IP(src="10.0.0.7", dst="192.0.2.53")
    return Ether(src=MAC, dst="02:00:00:00:00:01") / ip / TCP(sport=sport, dport=53, flags=flags, seq=seq) / data


def _tcp_message(name: str) -> bytes:
    query = bytes(DNS(id=7, rd=1, qd=DNSQR(qname=name)))
    return len(query).to_bytes(2, "big") + query


def test_a_dns_query_over_tcp_gives_the_query_a_udp_one_does():
    for v6, client in ((False, "10.0.0.7"), (True, "fd00::7")):
        (event,) = parse_frame(bytes(_tcp_dns(_tcp_message("Cam.Example.com"), v6)), 3.0)
        assert isinstance(event, DnsQuery)
        assert (event.mac, event.client, event.qname, event.sld, event.ts) == (
            MAC, client, "cam.example.com", "example.com", 3.0)
    # pipelined (RFC 7766 6.2.1.1), or segments the kernel's GRO merged: every whole message in the segment
    both = parse_frame(bytes(_tcp_dns(_tcp_message("a.example.com") + _tcp_message("b.example.org"))), 3.0)
    assert [e.qname for e in both] == ["a.example.com", "b.example.org"]
    assert parse_frame(bytes(_tcp_dns(_tcp_message("self.example.com"))), 3.0, skip_dns_to=frozenset(
        {"192.0.2.53"})) == []  # sent to the gateway's own DNS server, which reports it itself


def test_a_dns_message_split_across_tcp_segments_is_counted_split_not_read_nor_malformed():
    message = _tcp_message("split.example.com")
    for part in (message[:2], message[2:], message[:9], message[9:], message + message[:5]):
        with pytest.raises(SplitDnsMessage, match="runs past its segment"):
            parse_frame(bytes(_tcp_dns(part)), 1.0)
    cut = bytes(_tcp_dns(message))[:-4]  # a capture's snapshot length cut it
    with pytest.raises(SplitDnsMessage, match="last 4 bytes were not captured"):
        parse_frame(cut, 1.0)
    with pytest.raises(MalformedPacket) as garbage:  # whole, and no DNS message
        parse_frame(bytes(_tcp_dns(b"\x00\x03abc")), 1.0)
    assert not isinstance(garbage.value, SplitDnsMessage)

    # A bare ACK is 54 bytes and Ethernet pads it to 60: the padding is no part of a message (the IP length says so)
    ack = _tcp_dns(b"", flags="A") / Padding(load=b"\0" * 6)
    syn = _tcp_dns(b"", v6=True, flags="S")
    for frame, ip in ((ack, "10.0.0.7"), (syn, "fd00::7")):
        assert parse_frame(bytes(frame), 1.0) == []
        assert parse_frame(bytes(frame), 1.0, others=True) == [PacketSeen(1.0, MAC, ip, "tcp", 53)]  # as before
    assert len(bytes(ack)) == 60


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_dns_query_of_several_questions_is_malformed_not_one_query_each(transport):
    """RFC 9619: a query holds one question. One packet of 40 made 40 queries of any names a host chose."""
    many = bytes(DNS(id=1, rd=1, qd=[DNSQR(qname=f"q{i}.example.com") for i in range(40)]))
    cookie_only = bytes(DNS(id=2, rd=1, qd=[]))  # no question at all: a DNS cookie's refresh (RFC 7873 5.4)
    frame = (lambda m: bytes(_tcp_dns(len(m).to_bytes(2, "big") + m))) if transport == "tcp" else (
        lambda m: bytes(Ether(src=MAC) / IP(src="10.0.0.7", dst="10.0.0.1") / UDP(sport=4000, dport=53) / m))
    with pytest.raises(MalformedPacket, match=r"a query of 40 questions, not one \(RFC 9619\)"):
        parse_frame(frame(many), 1.0)
    assert parse_frame(frame(cookie_only), 1.0) == []
    answer = bytes(DNS(id=1, qr=1, qd=[DNSQR(qname="a.example.com"), DNSQR(qname="b.example.com")]))
    assert parse_frame(bytes(Ether(src=MAC) / IP(src="10.0.0.1", dst="10.0.0.7") / UDP(sport=53, dport=4000)
                             / answer), 1.0) == []  # answers are not read


def test_dns_over_tcp_in_a_capture_is_read_by_identify_replay_and_windows_and_split_messages_are_counted(tmp_path):
    """Before, a device whose resolver used TCP (after a truncated answer, or always) showed no DNS at all."""
    message = _tcp_message("tcp-only.example.com")
    frames = [_tcp_dns(b"", flags="S"), _tcp_dns(b"", flags="A", seq=2) / Padding(load=b"\0" * 6),
              _tcp_dns(message, seq=2),
              _tcp_dns(_tcp_message("v6.example.org"), v6=True),
              # a resolver writing in two calls on a connection whose SYN came before the capture began: where its
              # messages start is not known
              _tcp_dns(message[:2], seq=30, sport=40001), _tcp_dns(message[2:], seq=32, sport=40001)]
    for i, frame in enumerate(frames):
        frame.time = 1700000000 + i
    pcap = tmp_path / "tcp.pcap"
    wrpcap(str(pcap), frames)

    windows = capture_windows(pcap)
    (device,) = windows.devices.values()
    assert device.mac == MAC and device.first_ts == 1700000000
    assert [getattr(obs, "name", None) for obs in device.observations] == [
        None, None, "tcp-only.example.com", "v6.example.org"]  # the SYN and ACK: other packets, as before
    assert (windows.malformed, windows.skipped.split_dns, windows.skipped.total) == (0, 2, 2)

    got = []
    result = replay([pcap], got.extend)
    assert [(e.qname, e.client, e.source) for e in got if isinstance(e, DnsQuery)] == [
        ("tcp-only.example.com", "10.0.0.7", "replay"), ("v6.example.org", "fd00::7", "replay")]
    assert (result.malformed, result.skipped.split_dns) == (0, 2)

    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "identify", "--json", str(pcap)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"iotgw identify: {pcap}: 2 packets skipped (2 DNS over TCP segments holding part of a message, " \
           "not reassembled)" in proc.stderr


def _dns_names(pcap: Path) -> tuple[list[str], list[str], int, int]:
    """The DNS names a capture gives ``iotgw identify`` (its windows) and a replay, in that order, and the split
    DNS over TCP segments each counted."""
    windows = capture_windows(pcap)
    identified = [obs.name for dev in windows.devices.values() for obs in dev.observations
                  if isinstance(obs, DnsObservation)]
    got: list = []
    result = replay([pcap], got.extend)
    assert windows.malformed == result.malformed == 0
    return (identified, [e.qname for e in got if isinstance(e, DnsQuery)], windows.skipped.split_dns,
            result.skipped.split_dns)


def test_a_retransmitted_dns_over_tcp_segment_is_one_query_to_identify_and_replay(tmp_path):
    """A segment the device sent again (its ACK lost, or late) was a second query: the device seemed to have
    queried the name twice, in the query log and in the identification features' query counts."""
    first, second, mid = (_tcp_message(n) for n in ("cam.example.com", "ntp.example.com", "mid.example.org"))
    frames = [_tcp_dns(b"", flags="S", seq=1000), _tcp_dns(first, seq=1001), _tcp_dns(first, seq=1001),
              _tcp_dns(first + second, seq=1001),  # sent again with the next query behind it: only that one is new
              _tcp_dns(second, seq=1001 + len(first)),
              # a connection whose SYN came before the capture began: its retransmission too
              _tcp_dns(mid, seq=77, sport=40001), _tcp_dns(mid, seq=77, sport=40001),
              # a SYN sent again: the connection goes on where it was
              _tcp_dns(b"", flags="S", seq=1000), _tcp_dns(second, seq=1001 + len(first))]
    for i, frame in enumerate(frames):
        frame.time = 1700000000 + i
    pcap = tmp_path / "retransmitted.pcap"
    wrpcap(str(pcap), frames)
    names = ["cam.example.com", "ntp.example.com", "mid.example.org"]
    assert _dns_names(pcap) == (names, names, 0, 0)


def test_a_dns_message_split_across_segments_is_reassembled_in_any_order_once(tmp_path):
    """Before, a query written as its length and then the message (two segments) was counted and never read."""
    two, three, v6, gap = (_tcp_message(n) for n in ("two.example.com", "three-parts.example.com", "six.example.org",
                                                      "gap.example.net"))
    wrap = 0xFFFFFFF8  # the ISN of a connection whose sequence numbers wrap inside its message
    at = (wrap + 1) & 0xFFFFFFFF
    frames = [
        _tcp_dns(b"", flags="S", seq=5000), _tcp_dns(two[:2], seq=5001), _tcp_dns(two[2:], seq=5003),
        _tcp_dns(b"", flags="S", seq=wrap, sport=40001),
        _tcp_dns(three[20:], seq=(at + 20) & 0xFFFFFFFF, sport=40001),  # the last part first
        _tcp_dns(three[:6], seq=at, sport=40001),
        # overlapping what came already, with other bytes there: each byte is the first segment's that held it
        _tcp_dns(b"XXXX" + three[6:10], seq=(at + 2) & 0xFFFFFFFF, sport=40001),
        _tcp_dns(three[6:24], seq=(at + 6) & 0xFFFFFFFF, sport=40001),  # fills the gap, overlapping both sides
        _tcp_dns(three, seq=at, sport=40001),  # all of it again: a retransmission
        _tcp_dns(b"", v6=True, flags="S", seq=9), _tcp_dns(v6[:2], v6=True, seq=10),
        _tcp_dns(v6[2:] + two, v6=True, seq=12),  # the rest and a whole query behind it
        # no SYN: where the messages start is not known, so each segment is read alone, and counted
        _tcp_dns(two[:2], seq=30, sport=40002), _tcp_dns(two[2:], seq=32, sport=40002),
        # the capture ends before the rest of this one: counted too
        _tcp_dns(b"", flags="S", seq=70, sport=40003), _tcp_dns(three[:9], seq=71, sport=40003),
        # the capture lost a segment: the queries after it wait for it until 16 do, then each is read alone
        _tcp_dns(b"", flags="S", seq=200, sport=40004),
        *(_tcp_dns(gap, seq=201 + len(two) + i * len(gap), sport=40004) for i in range(17)),
    ]
    for i, frame in enumerate(frames):
        frame.time = 1700000000 + i
    pcap = tmp_path / "split.pcap"
    wrpcap(str(pcap), frames)
    names = ["two.example.com", "three-parts.example.com", "six.example.org", "two.example.com",
             *["gap.example.net"] * 17]
    assert _dns_names(pcap) == (names, names, 3, 3)

    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "identify", "--json", str(pcap)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"iotgw identify: {pcap}: 3 packets skipped (3 DNS over TCP segments holding part of a message, " \
           "not reassembled)" in proc.stderr
    assert [json.loads(line)["mac"] for line in proc.stdout.splitlines()] == [MAC]


def test_connections_cut_shuffled_overlapped_and_sent_again_give_each_query_once_in_its_order(tmp_path):
    """200 connections, each of 1 to 4 queries cut at random places, its segments shuffled, some bytes sent
    again in segments of their own, interleaved: each query is read once, each connection's in its order. Before,
    a segment waiting for a gap was passed over when an overlapping one filled the gap past its start."""
    rng = random.Random(21)
    want, connections = [], []
    for conn in range(200):
        names = [f"q{conn}-{k}.example.com" for k in range(rng.randrange(1, 5))]
        want += names
        stream = b"".join(_tcp_message(name) for name in names)
        isn = rng.choice([rng.randrange(1 << 32), (1 << 32) - rng.randrange(1, 200)])  # some wrap
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randrange(0, 8)))
        spans = list(zip([0, *cuts], [*cuts, len(stream)]))
        for _ in range(rng.randrange(0, 4)):
            start = rng.randrange(len(stream))
            spans.append((start, rng.randrange(start + 1, len(stream) + 1)))
        rng.shuffle(spans)
        connections.append([_tcp_dns(b"", flags="S", seq=isn, sport=20000 + conn)] + [
            _tcp_dns(stream[a:b], seq=(isn + 1 + a) & 0xFFFFFFFF, sport=20000 + conn) for a, b in spans])
    frames = []
    while connections:
        conn = rng.choice(connections)
        frames.append(conn.pop(0))
        if not conn:
            connections.remove(conn)
    pcap = tmp_path / "shuffled.pcap"
    wrpcap(str(pcap), frames)
    identified, replayed, *split = _dns_names(pcap)
    assert sorted(identified) == sorted(replayed) == sorted(want) and split == [0, 0]
    for got in (identified, replayed):
        for conn in range(200):
            assert [name for name in got if name.startswith(f"q{conn}-")] == [
                name for name in want if name.startswith(f"q{conn}-")]


def test_a_flood_of_dns_over_tcp_connections_keeps_the_flow_state_bounded_and_later_queries_read(tmp_path):
    """Any LAN host can open connections without end, each holding part of a 60,000-byte message: the state kept
    for them stays within its bounds, in flows and in bytes, and a device's query after the flood is reassembled."""
    from gateway.capture.frames import FLOW_MAX_BYTES, DnsStreams

    attacker = "02:66:66:66:66:66"
    before, after = _tcp_message("before.example.com"), _tcp_message("after.example.com")
    piece = (60000).to_bytes(2, "big") + b"\0" * 1398
    flood = Ether(src=attacker, dst="02:00:00:00:00:01") / IP(src="10.0.0.66", dst="192.0.2.53")
    syn, data = bytes(flood / TCP(sport=0, dport=53, flags="S", seq=7)), bytes(
        flood / TCP(sport=0, dport=53, flags="PA", seq=8) / piece)
    pcap = tmp_path / "flood.pcap"
    with PcapWriter(str(pcap), linktype=1, sync=False) as out:
        out.write(_tcp_dns(b"", flags="S", seq=100, sport=50000))
        out.write(_tcp_dns(before[:2], seq=101, sport=50000))
        for i in range(9000):  # 4,000 bare SYNs, then 5,000 connections with a partial message each
            out.write(_from_port(syn, 1024 + i))
            if i >= 4000:
                out.write(_from_port(data, 1024 + i))
        out.write(_tcp_dns(before[2:], seq=103, sport=50000))  # its start was pushed out: read alone, counted
        out.write(_tcp_dns(b"", flags="S", seq=500, sport=50001))
        out.write(_tcp_dns(after[:2], seq=501, sport=50001))
        out.write(_tcp_dns(after[2:], seq=503, sport=50001))

    tracemalloc.start()
    try:
        streams = DnsStreams()
        for ts, frame in read_frames(pcap):
            try:
                parse_frame(frame, ts, streams=streams)
            except SplitDnsMessage:
                pass
            assert len(streams.flows) <= streams.max_flows == 4096
            assert streams.bytes <= streams.max_bytes == 4 << 20
        kept, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the bytes held and ~300 bytes a flow (5.1 MiB here); kept whole, the flood held 7 MB of messages and 9,000 flows
    assert kept < 7 << 20
    held = sum(len(flow.buf) + sum(len(seg) for _seq, seg in flow.held) for flow in streams.flows.values())
    assert held == streams.bytes and streams.bytes > (4 << 20) - FLOW_MAX_BYTES  # the bytes counted are the held ones

    names = ["after.example.com"]
    # 5,000 partial messages and the device's first, given up; the rest of it, read alone
    assert _dns_names(pcap) == (names, names, 5002, 5002)


def _from_port(frame: bytes, sport: int) -> bytes:
    """An IPv4 TCP frame from port 0 (built once by scapy: 14,000 builds took 18 s) sent from ``sport`` instead,
    its checksum updated for it (RFC 1624: the sum of the 16-bit words gains ``sport``)."""
    total = ((frame[50] << 8) | frame[51]) ^ 0xFFFF
    total += sport
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return frame[:34] + sport.to_bytes(2, "big") + frame[36:50] + (total ^ 0xFFFF).to_bytes(2, "big") + frame[52:]
