"""The few pieces of the DNS wire format the forwarder needs, hand-written for the hot path.

A full parse costs 9-41 us a message (REFERENCE.md); the forwarder only needs the question, the EDNS flags
of a query and the TTL positions of an answer, so it reads those and nothing else. Anything odd goes to
dnspython on the slow path (``full_parse``), which decides whether the packet is a query at all. Whole
messages others read (the capture, the CNAME check on answers) go through ``dnslib_record``, dnslib with a name
decoder bounded as RFC 1035 says.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dnslib

from identifier.domains import sld

HEADER_LEN = 12
TYPE_OPT = 41
TYPE_SOA = 6
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
# Header counts of the two query shapes the fast path accepts: one question, and no or one (OPT) additional.
COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"
# OPT record for locally made error replies to EDNS queries: root name, type 41, 1232-byte payload (the DNS
# flag day 2020 size), no flags, no options.
_OPT_1232 = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
# Bytes that dnspython would escape in a presentation name; names with them take the slow text conversion.
_UNSAFE = re.compile(rb"[^a-z0-9_*-]")
_TTL = struct.Struct("!I")


class Malformed(ValueError):
    """Not a DNS message the forwarder can handle; counted and dropped."""


@dataclass(slots=True, frozen=True)
class Question:
    """What the hot path needs from a query's question section, computed once per distinct question."""

    qname: str  # lower case, no trailing dot, escaped as presentation text where needed
    qtype: int
    qclass: int
    sld: str
    length: int  # bytes of the question section (name + type + class)
    cache_keys: tuple[bytes, ...]  # indexed by the flag bits of ``query_flags``; case-folded question + flags


def question_end(data: bytes, start: int = HEADER_LEN) -> int:
    """Offset just past the question at ``start`` (name, type, class); raises Malformed.

    A question name in a query has no compression pointer (nothing precedes it to point at).
    """
    pos = start
    n = len(data)
    while True:
        if pos >= n:
            raise Malformed("question name runs past the end")
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:
            raise Malformed("compressed or extended label in the question")
        pos += 1 + length
    if pos - start > 255:
        raise Malformed("question name longer than 255 bytes")
    if pos + 4 > n:
        raise Malformed("question type and class missing")
    return pos + 4


def parse_question(data: bytes, start: int = HEADER_LEN) -> Question:
    """The question at ``start``; raises Malformed."""
    end = question_end(data, start)
    labels = []
    pos = start
    while data[pos]:
        labels.append(data[pos + 1 : pos + 1 + data[pos]].lower())
        pos += 1 + data[pos]
    # Searched label by label, not in the dotted text: a '.' byte inside a label must be escaped too, or
    # "www\.google.com" would be logged and judged as www.google.com.
    if _UNSAFE.search(b"".join(labels)):
        qname = dns.name.Name([*labels, b""]).to_text(omit_final_dot=True)
        registrable = _escaped_sld(labels)
    else:
        qname = b".".join(labels).decode("ascii")
        registrable = sld(qname) if qname else ""
    qtype, qclass = struct.unpack_from("!HH", data, end - 4)
    folded = data[start : end - 4].lower() + data[end - 4 : end]
    keys = tuple(folded + bytes([flags]) for flags in range(8))
    return Question(qname, qtype, qclass, registrable, end - start, keys)


def _escaped_sld(labels: list[bytes]) -> str:
    """The registrable domain of a name with escaped labels, counted in labels: ``sld`` of the text would split
    at the '.' inside "www\\.google.com" and answer google.com. A label with unsafe bytes is never a suffix rule's
    own label, so a plain stand-in ('_') gets the same label count from the suffix list."""
    probe = ".".join("_" if _UNSAFE.search(label) else label.decode("ascii") for label in labels)
    count = sld(probe).count(".") + 1
    return dns.name.Name(labels[-count:]).to_text()


# Flag bits for the cache key: answers differ with EDNS present (OPT in the answer, size), DO (DNSSEC records)
# and CD (unvalidated data).
FLAG_EDNS, FLAG_DO, FLAG_CD = 1, 2, 4


def opt_at(data: bytes, pos: int) -> tuple[int, int] | None:
    """(flags, client UDP size) of the OPT record at ``pos``, or None if there is none."""
    if len(data) < pos + 11 or data[pos] != 0 or data[pos + 1] != 0 or data[pos + 2] != TYPE_OPT:
        return None
    flags = FLAG_EDNS | (FLAG_DO if data[pos + 7] & 0x80 else 0)
    return flags, max(512, (data[pos + 3] << 8) | data[pos + 4])


# The EDNS UDP size asked of upstreams (DNS flag day 2020): a bigger answer comes truncated and is fetched over
# TCP. A client's 4096 or 65535 passed on made upstreams send fragmented answers, and a forged second fragment
# carries no ID or port to guess: the known way to poison a forwarder's cache off-path.
UPSTREAM_UDP_SIZE = 1232


def clamp_udp_size(query: bytes, opt: int) -> bytes:
    """``query`` with the UDP size of its OPT record cut to ``UPSTREAM_UDP_SIZE``. ``opt`` is just past the
    question, where the fast path's OPT sits; a query of another shape (the slow path's: the OPT beside other
    records) has its records walked for it, or any LAN host could still have upstreams fragment their answers."""
    counts = query[4:12]
    if counts == COUNTS_PLAIN:
        return query
    if counts == COUNTS_EDNS and opt_at(query, opt) is not None:
        size_at = opt + 3
    else:
        size_at = _opt_size_at(query, opt)
        if size_at is None:
            return query
    if (query[size_at] << 8) | query[size_at + 1] <= UPSTREAM_UDP_SIZE:
        return query
    return query[:size_at] + UPSTREAM_UDP_SIZE.to_bytes(2, "big") + query[size_at + 2 :]


def has_opt(query: bytes, opt: int) -> bool:
    """Whether ``query`` carries an OPT record (``opt`` as for ``clamp_udp_size``), so that a reply made for it
    must carry one too (RFC 6891 7). For the replies made from a query's bytes alone: SERVFAIL, truncated."""
    counts = query[4:12]
    if counts == COUNTS_PLAIN:
        return False
    if counts == COUNTS_EDNS and opt_at(query, opt) is not None:
        return True
    return _opt_size_at(query, opt) is not None


def _opt_size_at(message: bytes, pos: int) -> int | None:
    """Where the UDP size (the class field) of the OPT record among the records from ``pos`` sits, if any."""
    try:
        an, ns, ar = struct.unpack_from("!HHH", message, 6)
        for _ in range(an + ns + ar):
            pos = skip_name(message, pos)
            rtype, _rclass, _ttl, rdlen = struct.unpack_from("!HHIH", message, pos)
            if rtype == TYPE_OPT:
                return pos + 2
            pos += 10 + rdlen
    except (struct.error, Malformed):
        pass
    return None


def full_parse(data: bytes) -> tuple[Question, int, int]:
    """Slow path for queries the fast path does not recognise: (question, flags, client UDP size).

    dnspython validates the whole message (TSIG, several additionals, ...); raises Malformed if it is not a
    single-question query.
    """
    try:
        msg = dns.message.from_wire(data, ignore_trailing=False, keyring=False)
    except Exception as exc:  # dnspython raises a zoo of types on hostile input; all mean "malformed"
        raise Malformed(str(exc) or type(exc).__name__) from exc
    if msg.flags & dns.flags.QR or len(msg.question) != 1:
        raise Malformed("not a single-question query")
    question = parse_question(data)
    flags = FLAG_EDNS if msg.edns >= 0 else 0
    if msg.ednsflags & dns.flags.DO:
        flags |= FLAG_DO
    if data[3] & 0x10:
        flags |= FLAG_CD
    return question, flags, max(512, msg.payload) if msg.edns >= 0 else 512


def error_reply(query: bytes, question_len: int, rcode: int, edns: bool) -> bytes:
    """A reply carrying only the question and ``rcode`` (REFUSED, SERVFAIL, ...), ID, opcode and RD copied."""
    flags = bytes((0x80 | (query[2] & 0x79), 0x80 | rcode))
    counts = COUNTS_EDNS if edns else COUNTS_PLAIN
    tail = _OPT_1232 if edns else b""
    return query[:2] + flags + counts + query[HEADER_LEN : HEADER_LEN + question_len] + tail


def header_reply(query: bytes, rcode: int) -> bytes:
    """A reply of the header alone, every count 0, ID, opcode and RD copied: for a query whose question cannot be
    echoed, as FORMERR to one with a question count other than 1 (what BIND and Unbound send)."""
    return query[:2] + bytes((0x80 | (query[2] & 0x79), 0x80 | rcode)) + bytes(8)


def truncated_reply(query_id: bytes, response: bytes, question: bytes, edns: bool) -> bytes:
    """``response`` cut to its header and question with TC set: tells a UDP client to ask again over TCP. An EDNS
    query's keeps an OPT record (RFC 6891 7: without one, the client may take the server for one without EDNS)."""
    if edns:
        return query_id + bytes((response[2] | 0x02, response[3])) + COUNTS_EDNS + question + _OPT_1232
    return query_id + bytes((response[2] | 0x02, response[3])) + COUNTS_PLAIN + question


def skip_name(data: bytes, pos: int) -> int:
    """Offset past a (possibly compressed) name in a resource record; raises Malformed."""
    n = len(data)
    while pos < n:
        length = data[pos]
        if length == 0:
            return pos + 1
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length > 63:
            raise Malformed("bad label type")
        pos += 1 + length
    raise Malformed("name runs past the end")


def ttl_positions(response: bytes, question_len: int) -> tuple[tuple[int, ...], tuple[int, ...], int] | None:
    """Where the TTLs of an answer sit, their values, and how long the answer may be cached.

    Answers with records are cached for their smallest TTL; negative answers (NXDOMAIN, NODATA) for the SOA's
    TTL capped by its minimum field (RFC 2308); a negative answer without an SOA is not cached (None). The OPT
    record's "TTL" holds EDNS flags and is left alone.
    """
    try:
        an, ns, ar = struct.unpack_from("!HHH", response, 6)
        pos = HEADER_LEN + question_len
        offsets: list[int] = []
        ttls: list[int] = []
        negative_ttl = None
        for index in range(an + ns + ar):
            pos = skip_name(response, pos)
            rtype, _rclass, ttl, rdlen = struct.unpack_from("!HHIH", response, pos)
            if rtype != TYPE_OPT:
                if ttl & 0x80000000:
                    ttl = 0  # RFC 2181 8: a TTL with the top bit set is a TTL of 0, never 68 years
                offsets.append(pos + 4)
                ttls.append(ttl)
                if rtype == TYPE_SOA and an <= index < an + ns:
                    minimum = _TTL.unpack_from(response, pos + 10 + rdlen - 4)[0]
                    negative_ttl = min(ttl, minimum)
            pos += 10 + rdlen
        if pos > len(response):
            return None
    except (struct.error, Malformed):
        return None
    if an == 0:
        if negative_ttl is None:
            return None
        return tuple(offsets), tuple(ttls), min(negative_ttl, *ttls)
    return tuple(offsets), tuple(ttls), min(ttls)


# A name has at most 127 labels (255 bytes); more pointers than that only loop or chain pointer to pointer.
_MAX_POINTERS = 127


class _BoundedBuffer(dnslib.DNSBuffer):
    """dnslib's buffer with a name decoder whose work is bounded by the 255-byte name limit.

    dnslib's own decoder follows pointers recursively, copying the labels at every level, and takes no name
    limit: a packet whose names are chains of pointers, each name one label longer than the last, cost it
    0.8 s for 1.5 kB and 99 s for 9 kB. Here pointers must go back past the previous one (so they cannot
    loop), labels are at most 63 bytes and names at most 255, as RFC 1035 says; anything else is rejected.
    """

    def decode_name(self, last: int = -1) -> dnslib.DNSLabel:
        data = self.data
        labels: list[bytes] = []
        size = 1  # the root's zero byte
        pointers = 0
        resume = None
        floor = self.offset  # a pointer must go before this
        pos = self.offset
        while True:
            if pos >= len(data):
                raise dnslib.buffer.BufferError("name runs past the end")
            length = data[pos]
            if length == 0:
                pos += 1
                break
            if length >= 0xC0:
                if pos + 1 >= len(data):
                    raise dnslib.buffer.BufferError("pointer runs past the end")
                target = ((length & 0x3F) << 8) | data[pos + 1]
                pointers += 1
                if target >= floor or pointers > _MAX_POINTERS:
                    raise dnslib.buffer.BufferError("compression pointer forward or in a loop")
                if resume is None:
                    resume = pos + 2
                floor = pos = target
                continue
            if length > 63:
                raise dnslib.buffer.BufferError("label longer than 63 bytes")
            label = bytes(data[pos + 1 : pos + 1 + length])
            if len(label) != length:
                raise dnslib.buffer.BufferError("label runs past the end")
            size += 1 + length
            if size > 255:
                raise dnslib.buffer.BufferError("name longer than 255 bytes")
            label.decode()  # dnslib refuses labels that are not UTF-8; so does this (UnicodeDecodeError)
            labels.append(label)
            pos += 1 + length
        self.offset = resume if resume is not None else pos
        return dnslib.DNSLabel(labels)


def dnslib_record(data: bytes) -> dnslib.DNSRecord:
    """``dnslib.DNSRecord.parse`` with names decoded by ``_BoundedBuffer``. Raises what dnslib's parts raise
    (``DNSError``, ``BufferError``), and ``UnicodeDecodeError`` for a label that is not UTF-8, where dnslib said
    ``DNSError``: callers take any exception as a malformed message."""
    buffer = _BoundedBuffer(data)
    header = dnslib.DNSHeader.parse(buffer)
    questions = [dnslib.DNSQuestion.parse(buffer) for _ in range(header.q)]
    answers = [dnslib.RR.parse(buffer) for _ in range(header.a)]
    authority = [dnslib.RR.parse(buffer) for _ in range(header.auth)]
    additional = [dnslib.RR.parse(buffer) for _ in range(header.ar)]
    return dnslib.DNSRecord(header, questions, answers, auth=authority, ar=additional)
