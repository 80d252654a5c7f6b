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
    """A TCP segment to port 53 holding part of a DNS message that cannot be read: the connection's start (its
    SYN) was not seen, so where its messages begin is not known, or the segment was cut by a capture's snapshot
    length. Counted apart from malformed frames by the callers that tell them apart (a ``MalformedPacket`` to
    those that do not): the device did nothing wrong. A connection followed from its SYN by ``DnsStreams`` has
    its messages reassembled instead, whichever segments they are split across.
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
                skip_dns_to: frozenset[str] = frozenset(), streams: DnsStreams | None = None) -> list[Event]:
    """Decode one Ethernet frame into events.

    ``others`` also reports packets that are not DNS, DHCP or mDNS (as ``PacketSeen``): replay wants them for
    identification of devices that send no DNS; live capture filters them out in the kernel.
    ``skip_dns_to``: DNS queries to these addresses are left out (the gateway's own DNS server reports them).
    DNS queries are read over UDP and TCP: ``streams``, one for the frames of a capture, follows its TCP
    connections to port 53 (retransmissions read once, split messages reassembled); without it each segment to
    port 53 is read alone, for the whole length-prefixed messages it holds.
    Raises ``MalformedPacket`` for a frame whose DNS, DHCP or mDNS payload does not decode, or whose IPv4 header
    length is impossible (whatever it carries: its ports and payload cannot be located), and its subclass
    ``SplitDnsMessage`` for a TCP segment to port 53 holding part of a message that cannot be reassembled.
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
            return _dns_over_tcp(frame, off, ethertype, l4, ts, src_ip, mac, others, source, skip_dns_to, streams)
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
                  source: str, skip_dns_to: frozenset[str], streams: DnsStreams | None) -> list[Event]:
    """The queries of a TCP segment to port 53: DNS over TCP (RFC 1035 4.2.2, RFC 7766) is each message after
    its 2-byte length, and one segment may hold several (pipelined queries; segments the kernel's GRO merged).
    A segment with no data (handshake, ACK, FIN) is the other TCP packet it was before DNS over TCP was read.
    Without ``streams`` each segment is read alone, and one whose messages do not fill it exactly is
    ``SplitDnsMessage``; with it, see ``DnsStreams``."""
    if len(frame) < l4 + 20:
        raise MalformedPacket("truncated TCP header")
    data = l4 + (frame[l4 + 12] >> 4) * 4
    if data < l4 + 20:
        raise MalformedPacket(f"TCP header length {data - l4} bytes, less than 20")
    # The IP length, not the frame's: Ethernet pads a bare ACK to 60 bytes, and the padding is no DNS data.
    if ethertype == ETH_IPV4:
        end = off + ((frame[off + 2] << 8) | frame[off + 3])
        key = frame[off + 12 : off + 20] + frame[l4 : l4 + 4]
    else:  # 0 is a jumbogram's, whose length is in an option: the frame's
        end = off + 40 + ((frame[off + 4] << 8) | frame[off + 5]) if frame[off + 4] | frame[off + 5] else len(frame)
        key = frame[off + 8 : off + 40] + frame[l4 : l4 + 4]
    if data > end:
        raise MalformedPacket("TCP header runs past the IP packet")
    flags = frame[l4 + 13]
    if streams is not None and flags & (_SYN | _RST):
        if not skip_dns_to or _dst_ip(frame, off, ethertype) not in skip_dns_to:
            streams.control(key, int.from_bytes(frame[l4 + 4 : l4 + 8], "big"), flags)
    if data == end:
        return [PacketSeen(ts, mac, src_ip, "tcp", DNS_PORT)] if others else []
    if skip_dns_to and _dst_ip(frame, off, ethertype) in skip_dns_to:
        return []
    if streams is not None and flags & _RST:
        return []  # the server's TCP drops a RST's data: no query reaches it
    if streams is None:
        if end > len(frame):
            raise SplitDnsMessage(f"DNS over TCP: the segment's last {end - len(frame)} bytes were not captured")
        messages = _whole_messages(frame[data:end])
    else:
        # a SYN's data (TCP Fast Open) starts after the SYN's own sequence number
        seq = (int.from_bytes(frame[l4 + 4 : l4 + 8], "big") + (1 if flags & _SYN else 0)) & _SEQ_MASK
        messages = streams.segment(key, seq, frame[data:end], end - data)
    return [event for message in messages for event in _dns_query(message, ts, src_ip, mac, source)]


def _whole_messages(payload: bytes) -> list[bytes]:
    """The messages of a segment read alone, or ``SplitDnsMessage`` unless they fill it exactly: the lengths first,
    the messages only if they fill it, since a continuation's first two bytes would otherwise be taken for a
    length and a slice of a message decoded, counted malformed."""
    messages = []
    at, end = 0, len(payload)
    while at < end:
        size = (payload[at] << 8) | payload[at + 1] if at + 2 <= end else None
        if size is None or at + 2 + size > end:
            raise SplitDnsMessage(f"DNS over TCP: a message runs past its segment ({end - at} bytes of it here)")
        messages.append(payload[at + 2 : at + 2 + size])
        at += 2 + size
    return messages


_SYN, _RST = 0x02, 0x04
_SEQ_MASK = 0xFFFFFFFF
_HALF = 1 << 31  # sequence numbers compare modulo 2**32 (RFC 793): a distance above this is behind
# A flow's bytes held at once: the start of a message (under 65,535 bytes and its length) and as much again of
# segments ahead of a gap, so one flow can never hold more than this however it is split.
_MESSAGE_MAX = 2 + 65535
FLOW_MAX_BYTES = 2 * _MESSAGE_MAX
# Segments held ahead of a gap: a flow of 1-byte segments is no list of thousands, and queries after a segment the
# capture lost are read (alone) after a few more, not never.
_FLOW_MAX_HELD = 16


class _Flow:
    __slots__ = ("isn", "next", "aligned", "buf", "held", "size")

    def __init__(self, isn: int | None, next_seq: int, aligned: bool) -> None:
        self.isn = isn  # the SYN's sequence number: a retransmitted SYN leaves the flow as it is
        self.next = next_seq  # the sequence number of the first byte not yet seen
        self.aligned = aligned  # whether ``next`` is known to start a message (``buf`` holds from a message's start)
        self.buf = bytearray()  # the start of a message not yet whole
        self.held: list[tuple[int, bytes]] = []  # segments ahead of a gap, read once it is filled
        self.size = 0  # len(buf) + the held segments' bytes, as counted in ``DnsStreams.bytes``


class DnsStreams:
    """The DNS over TCP connections of one capture, followed so a query is read once and whole: a retransmitted
    segment (its bytes seen already) gives nothing, and a message split across segments (a resolver that writes
    the length and the message in two calls; a query over ~1,400 bytes) is read when its last byte arrives, in
    whatever order its segments come, overlapping or not, each byte taken from the first segment that held it.

    A flow (addresses and ports) is followed from its SYN, which says where its first message starts. One first
    seen later (its SYN before the capture began, or the flow forgotten) has each segment read alone, as
    ``parse_frame`` without streams does (a segment of part of a message is ``SplitDnsMessage``), but its
    retransmissions are still dropped, and after a segment of whole messages it is followed as from a SYN.

    Bounded, since any LAN host can open connections without end: at most ``max_flows`` flows and ``max_bytes``
    of partial messages and early segments in all, ``FLOW_MAX_BYTES`` in one. Past either bound the flow least
    recently sent on is forgotten, so a flood of connections pushes out its own oldest flows and any a device
    left idle; a device's flow forgotten so is then read segment by segment, as a flow without its SYN. A gap no
    segment fills (the capture lost it) gives up the message it cuts once segments past a flow's own bound wait
    behind it, which are then read each alone, as the flow's further segments are. Messages and segments so
    given up are counted in ``given_up``, which callers add to their split DNS count, as are those still waiting
    at ``close()``. A flow is forgotten at its RST; after a FIN it stays
    (its data may yet be retransmitted) until pushed out.
    """

    def __init__(self, max_flows: int = 4096, max_bytes: int = 4 << 20) -> None:
        if max_flows < 1 or max_bytes < FLOW_MAX_BYTES:
            raise ValueError(f"DnsStreams: max_flows {max_flows} under 1 or max_bytes {max_bytes} under "
                             f"{FLOW_MAX_BYTES}, one flow's bound")
        self.flows: dict[bytes, _Flow] = {}  # in order of last use: the first is the one to forget
        self.max_flows = max_flows
        self.max_bytes = max_bytes
        self.bytes = 0
        self.given_up = 0

    def control(self, key: bytes, seq: int, flags: int) -> None:
        """A SYN starts following ``key`` (one with another sequence number starts it anew); a RST forgets it."""
        flow = self.flows.pop(key, None)
        if flags & _RST:
            if flow is not None:
                self._forget(flow)
            return
        if flow is None or flow.isn != seq:
            if flow is not None:
                self._forget(flow)
            flow = _Flow(seq, (seq + 1) & _SEQ_MASK, True)
        self._keep(key, flow)

    def segment(self, key: bytes, seq: int, payload: bytes, length: int) -> list[bytes]:
        """The whole messages the ``length`` bytes at ``seq`` complete; ``payload`` is what the capture holds of
        them (less when cut by its snapshot length). Raises ``SplitDnsMessage`` for a segment read alone that
        holds part of a message."""
        flow = self.flows.pop(key, None)
        if flow is None:
            flow = _Flow(None, seq, False)
        self._keep(key, flow)  # first, so a flow pushed out below to make room is never this one
        ahead = (seq - flow.next) & _SEQ_MASK
        if ahead >= _HALF:  # starts before the first byte not yet seen: a retransmission, maybe with new bytes
            behind = _SEQ_MASK + 1 - ahead
            if behind >= length:
                return []
            payload, length, seq, ahead = payload[behind:], length - behind, flow.next, 0
        if len(payload) < length:  # the capture lost bytes: where the next message starts is no longer known
            self._unalign(flow, (seq + length) & _SEQ_MASK)
            raise SplitDnsMessage(f"DNS over TCP: the segment's last {length - len(payload)} bytes were not captured")
        if not flow.aligned:
            # past a gap too: the gap's bytes, should they come, start nowhere known and are read alone anyway
            flow.next = (seq + length) & _SEQ_MASK
            messages = _whole_messages(payload)
            flow.aligned = True  # whole messages: the next byte starts one
            return messages
        if ahead:
            if len(flow.held) >= _FLOW_MAX_HELD or flow.size - len(flow.buf) + length > _MESSAGE_MAX:
                return self._read_alone(flow, [*flow.held, (seq, payload)])
            flow.held.append((seq, payload))
            self._grow(flow, length)
            return []
        flow.buf += payload
        flow.next = (seq + length) & _SEQ_MASK
        added = length
        while flow.held:  # segments that waited for this one, in sequence order
            # the earliest: one now behind ``next`` (reached, or passed by an overlapping segment) before one ahead
            i, (held_seq, held) = min(enumerate(flow.held), key=lambda item: ((item[1][0] - flow.next + _HALF)
                                                                               & _SEQ_MASK))
            gap = (held_seq - flow.next) & _SEQ_MASK
            if 0 < gap < _HALF:
                break
            del flow.held[i]
            added -= len(held)
            behind = (flow.next - held_seq) & _SEQ_MASK
            if behind < len(held):
                flow.buf += held[behind:]
                flow.next = (held_seq + len(held)) & _SEQ_MASK
                added += len(held) - behind
        messages = []
        buf, at = flow.buf, 0
        while len(buf) - at >= 2 and len(buf) - at - 2 >= (size := (buf[at] << 8) | buf[at + 1]):
            messages.append(bytes(buf[at + 2 : at + 2 + size]))
            at += 2 + size
        del buf[:at]
        self._grow(flow, added - at)
        return messages

    def _read_alone(self, flow: _Flow, segments: list[tuple[int, bytes]]) -> list[bytes]:
        """A gap no segment fills (the capture lost it): the partial message is given up, and the segments that
        waited and this one are read each alone, in sequence order, as in a flow whose SYN was not seen."""
        segments.sort(key=lambda item: (item[0] - flow.next) & _SEQ_MASK)
        flow.held = []  # not given up: read below
        self._unalign(flow, flow.next)
        messages = []
        for seq, payload in segments:
            behind = (flow.next - seq) & _SEQ_MASK
            if behind < _HALF:  # overlapping the one before
                if behind >= len(payload):
                    continue
                seq, payload = flow.next, payload[behind:]
            flow.next = (seq + len(payload)) & _SEQ_MASK
            try:
                messages += _whole_messages(payload)
                flow.aligned = True
            except SplitDnsMessage:
                self.given_up += 1
                flow.aligned = False
        return messages

    def close(self) -> None:
        """Forget every flow, counting what they held in ``given_up``: the capture ended before it was whole."""
        for flow in self.flows.values():
            self._forget(flow)
        self.flows.clear()

    def _keep(self, key: bytes, flow: _Flow) -> None:
        self.flows[key] = flow
        while len(self.flows) > self.max_flows:
            self._forget(self.flows.pop(next(iter(self.flows))))

    def _grow(self, flow: _Flow, by: int) -> None:
        flow.size += by
        self.bytes += by
        while self.bytes > self.max_bytes:  # never the flow just grown: it is the last, and under the bound alone
            self._forget(self.flows.pop(next(iter(self.flows))))

    def _unalign(self, flow: _Flow, next_seq: int) -> None:
        self._forget(flow)
        flow.aligned, flow.next = False, next_seq

    def _forget(self, flow: _Flow) -> None:
        self.given_up += len(flow.held) + (1 if flow.buf else 0)
        self.bytes -= flow.size
        flow.buf, flow.held, flow.size = bytearray(), [], 0


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
