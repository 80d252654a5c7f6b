"""Ethernet frames to gateway events: DNS queries, DHCP client messages, mDNS, optionally any other packet.

One parser for live capture, pcap replay and the demo's virtual devices, so all three take the same path.
``Senders`` adds, for capture and replay, each sender's presence from its first frame, whatever that says.
Headers are unpacked with ``struct`` (cheap); DNS payloads with dnslib (REFERENCE.md: 9 us a query against
dnspython's 13 us).
"""

from __future__ import annotations

import ipaddress
import struct

import dnslib

from gateway.dns.wire import dnslib_record
from gateway.events import AddressSeen, DeviceSeen, DhcpSeen, DnsQuery, Event, MdnsSeen, PacketSeen
from identifier.domains import sld

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_ARP = 0x0806
ETH_VLAN = (0x8100, 0x88A8, 0x9100)  # 802.1Q, 802.1ad, and the older QinQ type the BPF filter accepts too
ETH_EAPOL = 0x888E
DNS_PORT = 53
MDNS_PORT = 5353
# RFC 6762 17: an mDNS packet, IP and UDP headers included, must not exceed 9000 bytes. A frame in a pcap can
# be 256 KiB: one such packet of 13,000 records took seconds (names are kept in order, checked for repeats).
MDNS_MAX_BYTES = 9000
DHCP_PORTS = (67, 68)
_IPV6_EXTENSIONS = (0, 43, 44, 51, 60)  # hop-by-hop, routing, fragment, authentication, destination options
_MAGIC = b"\x63\x82\x53\x63"
# DHCP message types whose address (ciaddr or option 50) is the client's own: DISCOVER, REQUEST, INFORM.
# A DECLINE names an address another host was found using, and a RELEASE gives one up: neither maps it.
_CLAIMS_ADDRESS = (1, 3, 8)


class MalformedPacket(ValueError):
    """A frame that claims to be DNS, DHCP or mDNS but cannot be decoded; counted and dropped by callers."""


class SplitDnsMessage(MalformedPacket):
    """A TCP segment to port 53 that does not hold whole DNS messages: one split across segments (or cut by a
    capture's snapshot length). Not reassembled, and counted apart from malformed frames by the callers that
    tell them apart (a ``MalformedPacket`` to those that do not): the device did nothing wrong.

    Why not reassembled: a stub resolver writes its length and query in one call (glibc's and bionic's writev,
    musl's sendmsg, Go, dnspython, systemd-resolved), so a query is one segment; only one longer than a segment
    (over ~1,400 bytes) or written in two calls is split. Joining them would take per-flow state, sequence
    numbers and retransmissions to track, which any LAN host could flood, for queries no device we know sends.
    And without that state the segment cannot be read in part: a continuation starts inside a message, so its
    first two bytes are no length, and only messages that fill the segment exactly show it starts on one.
    """


def mac_str(raw: bytes) -> str:
    return raw.hex(":")


def sender(frame: bytes) -> str | None:
    """The frame's Ethernet source when it can be a device: unicast (a multicast source is none), else None."""
    if len(frame) < 14 or frame[6] & 0x01:
        return None
    return frame[6:12].hex(":")


class Senders:
    """Each unicast Ethernet source's first frame as one ``DeviceSeen``, so a device is present from the first
    frame it sends even when that frame gives no event (a DNS answer, a DHCP reply, a nameless mDNS packet, a
    query the DNS server reports itself) or does not decode.

    The per-frame cost is one set lookup, done by the caller where it loops over frames::

        if frame[6:12] not in senders.known:
            events += senders.first(frame, ts)

    ``known`` is bounded: past ``limit`` sources it starts over, and a source reported again only touches its
    device. ``forget`` lets a device deleted by the owner be new again at its next frame of any kind.
    """

    def __init__(self, limit: int = 4096) -> None:
        self.known: set[bytes] = set()  # raw source MACs: no formatting on the hot path
        self.limit = limit

    def first(self, frame: bytes, ts: float) -> list[Event]:
        """``[DeviceSeen]`` for the first frame of a unicast source not in ``known`` (and now in it), else []."""
        if len(self.known) >= self.limit:
            self.known.clear()  # in place: callers hold a reference to the set
        self.known.add(frame[6:12])
        mac = sender(frame)
        if mac is None:
            return []
        return [DeviceSeen(ts, mac, _source_ip(frame))]

    def forget(self, mac: str) -> None:
        """Report ``mac`` again at its next frame (its device was deleted); an ``ip:`` key is no MAC: ignored."""
        if not mac.startswith("ip:"):
            self.known.discard(bytes.fromhex(mac.replace(":", "")))


def _source_ip(frame: bytes) -> str | None:
    """The IPv4 or IPv6 source address of a frame, past its VLAN tags; None when it has none (ARP, a
    truncated header) or it is the unspecified address (a DHCP client before its lease)."""
    ethertype, off = (frame[12] << 8) | frame[13], 14
    while ethertype in ETH_VLAN and len(frame) >= off + 4:
        ethertype, off = (frame[off + 2] << 8) | frame[off + 3], off + 4
    if ethertype == ETH_IPV4 and len(frame) >= off + 20:
        ip = _ip4(frame[off + 12 : off + 16])
        return None if ip == "0.0.0.0" else ip
    if ethertype == ETH_IPV6 and len(frame) >= off + 40:
        ip6 = ipaddress.IPv6Address(frame[off + 8 : off + 24])
        return None if ip6.is_unspecified else str(ip6)
    return None


def parse_frame(frame: bytes, ts: float, *, others: bool = False, source: str = "capture",
                skip_dns_to: frozenset[str] = frozenset()) -> list[Event]:
    """Decode one Ethernet frame into events.

    ``others`` also reports packets that are not DNS, DHCP or mDNS (as ``PacketSeen``): replay wants them for
    identification of devices that send no DNS; live capture filters them out in the kernel.
    ``skip_dns_to``: DNS queries to these addresses are left out (the gateway's own DNS server reports them).
    DNS queries are read over UDP and TCP (a TCP segment to port 53 holding whole length-prefixed messages).
    Raises ``MalformedPacket`` for a frame whose DNS, DHCP or mDNS payload does not decode, or whose IPv4 header
    length is impossible (whatever it carries: its ports and payload cannot be located), and its subclass
    ``SplitDnsMessage`` for a TCP segment to port 53 holding part of a message.
    """
    if len(frame) < 14:
        raise MalformedPacket("frame shorter than an Ethernet header")
    # Byte arithmetic rather than struct calls: this runs for every captured packet.
    ethertype = (frame[12] << 8) | frame[13]
    off = 14
    while ethertype in ETH_VLAN:
        if len(frame) < off + 4:
            raise MalformedPacket("truncated VLAN tag")
        ethertype = (frame[off + 2] << 8) | frame[off + 3]
        off += 4
    if frame[6] & 0x01:  # a multicast source MAC is not a device
        return []
    mac = frame[6:12].hex(":")

    if ethertype == ETH_IPV4:
        if len(frame) < off + 20:
            raise MalformedPacket("truncated IPv4 header")
        ihl = (frame[off] & 0x0F) * 4
        # Else the "UDP header" would be read from inside the IP header, or from past the frame.
        if ihl < 20:
            raise MalformedPacket(f"IPv4 header length {ihl} bytes, less than 20")
        if len(frame) < off + ihl:
            raise MalformedPacket(f"IPv4 header length {ihl} bytes runs past the frame")
        proto = frame[off + 9]
        src_ip = f"{frame[off + 12]}.{frame[off + 13]}.{frame[off + 14]}.{frame[off + 15]}"
        l4 = off + ihl
        # MF set or an offset: a later fragment carries no UDP header, and the first only part of the payload (a
        # large mDNS announcement): incomplete rather than malformed, and not decodable until reassembled.
        if (frame[off + 6] & 0x3F) | frame[off + 7]:
            return [PacketSeen(ts, mac, src_ip, "fragment")] if others else []
    elif ethertype == ETH_IPV6:
        if len(frame) < off + 40:
            raise MalformedPacket("truncated IPv6 header")
        proto = frame[off + 6]
        src_ip = str(ipaddress.IPv6Address(frame[off + 8 : off + 24]))
        l4 = off + 40
        # Extension headers: hop-by-hop (MLD reports carry one), routing, destination options, fragment, AH.
        # Skipped, or a device's DNS behind a destination options header went unseen. Bounded by the frame.
        while proto in _IPV6_EXTENSIONS and len(frame) >= l4 + 8:
            if proto == 44:
                # offset or more fragments: as for IPv4; the 2 reserved bits between them are ignored (RFC 8200)
                if (frame[l4 + 2] << 8 | frame[l4 + 3]) & 0xFFF9:
                    return [PacketSeen(ts, mac, src_ip, "fragment")] if others else []
                proto, l4 = frame[l4], l4 + 8  # an atomic fragment (RFC 6946): the whole packet
            elif proto == 51:
                proto, l4 = frame[l4], l4 + (frame[l4 + 1] + 2) * 4
            else:
                proto, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
    elif others:
        kind = {ETH_ARP: "arp", ETH_EAPOL: "eapol"}.get(ethertype, "other")
        return [PacketSeen(ts, mac, None, kind)]
    else:
        return []

    if proto == 6:
        port = (frame[l4 + 2] << 8) | frame[l4 + 3] if len(frame) >= l4 + 4 else None
        if port == DNS_PORT:  # the one test other TCP pays
            return _dns_over_tcp(frame, off, ethertype, l4, ts, src_ip, mac, others, source, skip_dns_to)
        return [PacketSeen(ts, mac, src_ip, "tcp", port)] if others else []
    if proto != 17:
        if not others:
            return []
        return [PacketSeen(ts, mac, src_ip, {1: "icmp", 58: "icmpv6", 2: "igmp"}.get(proto, "other"))]

    if len(frame) < l4 + 8:
        raise MalformedPacket("truncated UDP header")
    sport, dport = struct.unpack_from("!HH", frame, l4)
    payload = frame[l4 + 8 :]
    ip = None if src_ip in ("0.0.0.0", "::") else src_ip

    if dport == DNS_PORT:
        if skip_dns_to and _dst_ip(frame, off, ethertype) in skip_dns_to:
            return []
        return _dns_query(payload, ts, src_ip, mac, source)
    if sport == DNS_PORT:
        return []  # answers: the query was already reported
    if dport == MDNS_PORT or sport == MDNS_PORT:
        return _mdns(payload, ts, mac, ip)
    if dport in DHCP_PORTS and sport in DHCP_PORTS:
        return _dhcp(payload, ts, mac)
    if others:
        return [PacketSeen(ts, mac, ip, "udp", dport)]
    return []


def _dns_over_tcp(frame: bytes, off: int, ethertype: int, l4: int, ts: float, src_ip: str, mac: str, others: bool,
                  source: str, skip_dns_to: frozenset[str]) -> list[Event]:
    """The queries of a TCP segment to port 53: DNS over TCP (RFC 1035 4.2.2, RFC 7766) is each message after
    its 2-byte length, and one segment may hold several (pipelined queries; segments the kernel's GRO merged).
    A segment with no data (handshake, ACK, FIN) is the other TCP packet it was before DNS over TCP was read;
    one whose messages do not fill it exactly is ``SplitDnsMessage``."""
    if len(frame) < l4 + 20:
        raise MalformedPacket("truncated TCP header")
    data = l4 + (frame[l4 + 12] >> 4) * 4
    if data < l4 + 20:
        raise MalformedPacket(f"TCP header length {data - l4} bytes, less than 20")
    # The IP length, not the frame's: Ethernet pads a bare ACK to 60 bytes, and the padding is no DNS data.
    if ethertype == ETH_IPV4:
        end = off + ((frame[off + 2] << 8) | frame[off + 3])
    else:  # 0 is a jumbogram's, whose length is in an option: the frame's
        end = off + 40 + ((frame[off + 4] << 8) | frame[off + 5]) if frame[off + 4] | frame[off + 5] else len(frame)
    if data > end:
        raise MalformedPacket("TCP header runs past the IP packet")
    if data == end:
        return [PacketSeen(ts, mac, src_ip, "tcp", DNS_PORT)] if others else []
    if skip_dns_to and _dst_ip(frame, off, ethertype) in skip_dns_to:
        return []
    if end > len(frame):
        raise SplitDnsMessage(f"DNS over TCP: the segment's last {end - len(frame)} bytes were not captured")
    # The lengths first, the messages only if they fill the segment: a continuation would otherwise have its first
    # two bytes taken for a length and a slice of a message decoded, counted malformed
    messages = []
    at = data
    while at < end:
        size = (frame[at] << 8) | frame[at + 1] if at + 2 <= end else None
        if size is None or at + 2 + size > end:
            raise SplitDnsMessage(f"DNS over TCP: a message runs past its segment ({end - at} bytes of it here)")
        messages.append(frame[at + 2 : at + 2 + size])
        at += 2 + size
    return [event for message in messages for event in _dns_query(message, ts, src_ip, mac, source)]


def _dst_ip(frame: bytes, off: int, ethertype: int) -> str:
    if ethertype == ETH_IPV4:
        return _ip4(frame[off + 16 : off + 20])
    return str(ipaddress.IPv6Address(frame[off + 24 : off + 40]))


def _ip4(raw: bytes) -> str:
    return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"


def _dns_query(payload: bytes, ts: float, client: str, mac: str, source: str) -> list[Event]:
    # RFC 9619: a query holds one question (or none: a DNS cookie alone). Each question was an event, so one packet
    # made as many "queries" as it listed; BIND and Unbound answer such a packet FORMERR, resolving none of them.
    if len(payload) >= 12 and not payload[2] & 0x80 and (payload[4] or payload[5] > 1):
        raise MalformedPacket(f"DNS: a query of {(payload[4] << 8) | payload[5]} questions, not one (RFC 9619)")
    questions = _plain_questions(payload)
    if questions is None:  # anything unusual: let dnslib decide
        try:
            msg = dnslib_record(payload)
        except Exception as exc:  # dnslib raises several types for bad input; all mean the same here
            raise MalformedPacket(f"DNS: {exc}") from exc
        if msg.header.qr:
            return []
        questions = [(str(q.qname).rstrip(".").lower(), q.qtype) for q in msg.questions]
    return [DnsQuery(ts, client, mac, qname, qtype, sld(qname), source=source) for qname, qtype in questions]


_PRINTABLE = bytes(range(33, 127))


def _plain_questions(payload: bytes) -> list[tuple[str, int]] | None:
    """The questions of a query whose names are plain printable labels, decoded without dnslib (4x faster).

    The passive sniffer's budget is a few microseconds a packet. Gives what dnslib would give for the
    question section, and None (decode with dnslib) for a response, a compressed or non-printable name, or
    anything truncated, so odd input is judged by one decoder only.
    """
    if len(payload) < 12 or payload[2] & 0x80:
        return None
    count = (payload[4] << 8) | payload[5]
    end = len(payload)
    off = 12
    out = []
    for _ in range(count):
        labels = []
        start = off
        while True:
            if off >= end:
                return None
            n = payload[off]
            if n == 0:
                off += 1
                break
            label = payload[off + 1 : off + 1 + n]
            if n > 63 or len(label) != n or label.translate(None, _PRINTABLE):
                return None
            labels.append(label)
            off += 1 + n
        if off + 4 > end or off - start > 255:
            return None
        qname = b".".join(labels).decode("ascii").rstrip(".").lower()
        out.append((qname, (payload[off] << 8) | payload[off + 1]))
        off += 4
    return out


def _mdns(payload: bytes, ts: float, mac: str, ip: str | None) -> list[Event]:
    if len(payload) > MDNS_MAX_BYTES:
        raise MalformedPacket(f"mDNS: {len(payload)} bytes, more than {MDNS_MAX_BYTES}")
    try:
        msg = dnslib_record(payload)
    except Exception as exc:
        raise MalformedPacket(f"mDNS: {exc}") from exc
    names: list[str] = []
    services: list[str] = []
    # A query's answer section holds known answers, records the asker cached from other hosts (RFC 6762 7.1);
    # its questions and a probe's authority records are its own.
    answers = msg.rr if msg.header.qr else []
    for rr in [*answers, *msg.ar, *msg.auth]:
        rname = _name(rr.rname)
        if rr.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA) and rname not in names:
            names.append(rname)
        elif rr.rtype == dnslib.QTYPE.PTR and rname.startswith("_") and rname not in services:
            services.append(rname)
            instance = _name(rr.rdata.label)
            if instance not in names and not instance.startswith("_"):
                names.append(instance)
        elif rr.rtype == dnslib.QTYPE.SRV:
            target = _name(rr.rdata.target)
            if target and target not in names:
                names.append(target)
    for q in msg.questions:
        qname = _name(q.qname)
        if qname.startswith("_") and qname not in services:
            services.append(qname)
    if not names and not services:
        return []
    events: list[Event] = [MdnsSeen(ts, mac, ip, tuple(names), tuple(services))]
    if ip:
        events.append(AddressSeen(ts, mac, ip, "packet"))
    return events


def _name(label: dnslib.DNSLabel) -> str:
    """A DNS name as text; mDNS instance names carry spaces and UTF-8 that dnslib's str() escapes."""
    return ".".join(part.decode("utf-8", errors="replace") for part in label.label)


def _dhcp(payload: bytes, ts: float, mac: str) -> list[Event]:
    """A DHCP client message credited to ``mac``, the frame's sender, or to its chaddr when relayed: a forged
    chaddr (broadcast, another device's) must not make a line, a name or an address for a MAC that sent nothing."""
    if len(payload) < 240 or payload[236:240] != _MAGIC:
        raise MalformedPacket("DHCP: no BOOTP header or magic cookie")
    if payload[0] != 1:  # BOOTREPLY: the server's answer, not the device's fingerprint
        return []
    if payload[24:28] != b"\0\0\0\0":
        # giaddr set: a relay agent forwarding another segment's client, which chaddr names. On the segment we
        # sniff a client sends its own requests, and a chaddr that differs from the sender's is not believed.
        if payload[28] & 0x01 or payload[28:34] == b"\0" * 6:
            raise MalformedPacket("DHCP: relayed message without a client's hardware address")
        mac = mac_str(payload[28:34])
    ciaddr = _ip4(payload[12:16])
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(payload):
        code = payload[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(payload):
            raise MalformedPacket("DHCP: option without length")
        length = payload[i + 1]
        value = payload[i + 2 : i + 2 + length]
        if len(value) != length:
            raise MalformedPacket(f"DHCP: option {code} truncated")
        opts[code] = opts.get(code, b"") + value  # RFC 3396: a long option may be split
        i += 2 + length
    requested = _ip4(opts[50]) if len(opts.get(50, b"")) == 4 else None
    ip = ciaddr if ciaddr != "0.0.0.0" else requested
    seen = DhcpSeen(
        ts,
        mac,
        ip,
        hostname=_text(opts.get(12)),
        param_list=tuple(opts.get(55, b"")),
        vendor_class=_text(opts.get(60)),
        client_id=opts[61].hex() if 61 in opts else None,
        message_type=opts[53][0] if opts.get(53) else None,
    )
    events: list[Event] = [seen]
    if ip and seen.message_type in _CLAIMS_ADDRESS:
        events.append(AddressSeen(ts, mac, ip, "dhcp"))
    return events


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    text = raw.rstrip(b"\x00").decode("utf-8", errors="replace")
    return text or None
