"""Reading capture files (pcap and pcapng) as (timestamp, Ethernet frame) pairs.

Ethernet captures are read as they are. Linux cooked captures (``tcpdump -i any``: LINUX_SLL, and LINUX_SLL2
from tcpdump 4.99 on) carry, per packet, the sender's link-layer address, the packet type and the EtherType instead
of an Ethernet header: each packet from an Ethernet interface becomes the Ethernet frame it stands for, keyed by
its sender's MAC. Packets that stand for no LAN device's frame are counted in ``Skipped``, not errors: those the
capturing host sent (its own, or a forwarded or bridged copy of a packet already captured coming in) and those
from an interface without a 6-byte Ethernet address (loopback, tunnels, PPP, WireGuard). So are records of any
link type stamped past the year 9999, which a pcapng's 64-bit time can be.

A file is read once, front to back, so a pipe (``<(zcat x.pcap.gz)``, ``/dev/stdin``) reads as a regular file
does; a pcap or pcapng compressed with gzip (``.pcap.gz``, told by its content, not its name) is read as the capture
it holds. A file cut short (a capture stopped while writing, a partial copy, a gzip stream that ends before its
end marker) yields every complete record and then raises ``PcapError`` naming the file and how many records it
kept: scapy's readers end such a file quietly or with an unprefixed warning, and a caller could not tell it from a
whole one. A file cut inside its file header is "truncated" too, and an empty one says so, in our words.
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ETHERNET = 1  # LINKTYPE_ETHERNET
LINUX_SLL = 113  # LINKTYPE_LINUX_SLL: `tcpdump -i any` before 4.99, or with `-y LINUX_SLL`
LINUX_SLL2 = 276  # LINKTYPE_LINUX_SLL2: `tcpdump -i any` with tcpdump 4.99 and libpcap 1.10
READ_LINKTYPES = "Ethernet (1), Linux cooked SLL (113) and SLL2 (276)"
LAST_TIME = 253402300799.0  # 9999-12-31 23:59:59 UTC, the last second a date can show
MAX_CAPLEN = 262144  # libpcap's largest snapshot length: a record claiming more is damage, not a frame
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
# pcap's magic numbers: microsecond times big- and little-endian, then nanosecond times
_PCAP_MAGICS = (b"\xa1\xb2\xc3\xd4", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\x3c\x4d", b"\x4d\x3c\xb2\xa1")
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_OUT = 65536  # decompressed bytes at most per zlib call, beyond what a read asks: memory stays bounded
_GZIP_IN = 4096  # compressed bytes per zlib call: damage loses what that call had decompressed, so keep it small
# The most one read may ask for: a pcapng block's length is 32 bits, and scapy reads a block whole. 16 MiB was
# Wireshark's own bound for years; a frame is at most MAX_CAPLEN, and no name or secrets block comes near it.
MAX_READ = 16 << 20


class PcapError(Exception):
    """A capture file that cannot be read; the message names the file."""


@dataclass
class Skipped:
    """Packets counted, not errors, and not read: those of a Linux cooked capture that stand for no LAN device's
    Ethernet frame, those no time can be given, and DNS over TCP segments holding part of a message."""

    outgoing: int = 0  # sent by the capturing host: its own, or a copy of a packet it forwarded or bridged
    not_ethernet: int = 0  # from an interface whose address is not a 6-byte MAC: loopback, tunnels, PPP
    short: int = 0  # shorter than the cooked header (cut by the snapshot length)
    bad_time: int = 0  # stamped past the year 9999 (a pcapng's 64-bit time): no clock, date or page can show it
    untimed: int = 0  # pcapng Simple Packet Blocks (no timestamp) before any frame whose time they could take
    split_dns: int = 0  # counted by the frames' reader, not here: gateway.capture.frames SplitDnsMessage, DnsStreams

    @property
    def total(self) -> int:
        return self.outgoing + self.not_ethernet + self.short + self.bad_time + self.untimed + self.split_dns

    def __str__(self) -> str:
        parts = [f"{self.outgoing} sent by the capturing host", f"{self.not_ethernet} not from an Ethernet interface",
                 f"{self.short} shorter than their cooked header", f"{self.bad_time} stamped past the year 9999",
                 f"{self.untimed} untimed pcapng simple packets before any timed one",
                 f"{self.split_dns} DNS over TCP segments holding part of a message, not reassembled"]
        return f"{self.total} packets skipped (" + ", ".join(p for p in parts if not p.startswith("0 ")) + ")"


# libpcap's pcap/sll.h: the packet types (the kernel's PACKET_*), and the two "protocol" values that are no
# EtherType but say an 802.3 frame's payload follows (a length field in Ethernet)
_SLL_HOST, _SLL_BROADCAST, _SLL_MULTICAST, _SLL_OTHERHOST = range(4)  # from another station
_SLL_P_802_3, _SLL_P_802_2 = 0x0001, 0x0004
_ARPHRD_ETHER = 1  # loopback (772) also has a 6-byte address, all zeros: the type, not the length, says Ethernet
_BROADCAST = b"\xff" * 6
_MULTICAST = b"\x01" + b"\0" * 5  # the group bit set, for multicast whose group the IP header does not tell
# "to us" or "to another host": the destination is no device (only sources are), and the capture does not say
# which interface address it was; the all-zero address is never a real station's
_UNICAST = b"\0" * 6


def _sll(data: bytes, skipped: Skipped) -> bytes | None:
    """A LINUX_SLL packet as its Ethernet frame, or None (counted): 16 bytes of packet type, ARPHRD type,
    address length, 8 address bytes and protocol, all big-endian."""
    if len(data) < 16:
        skipped.short += 1
        return None
    pkttype, hatype, halen = struct.unpack_from("!HHH", data)
    return _ethernet(pkttype, hatype, halen, data[6:14], struct.unpack_from("!H", data, 14)[0], data[16:], skipped)


def _sll2(data: bytes, skipped: Skipped) -> bytes | None:
    """A LINUX_SLL2 packet as its Ethernet frame, or None (counted): 20 bytes of protocol, reserved, interface
    index, ARPHRD type, packet type, address length and 8 address bytes, all big-endian."""
    if len(data) < 20:
        skipped.short += 1
        return None
    protocol, hatype, pkttype, halen = struct.unpack_from("!H6xHBB", data)
    return _ethernet(pkttype, hatype, halen, data[12:20], protocol, data[20:], skipped)


def _ethernet(pkttype: int, hatype: int, halen: int, addr: bytes, protocol: int, payload: bytes,
              skipped: Skipped) -> bytes | None:
    if hatype != _ARPHRD_ETHER or halen != 6:
        skipped.not_ethernet += 1
        return None
    # the rest are the capturing host's own: sent (4, outgoing), its multicast looped back (5), or between its
    # kernel and user space (6, 7). Not a LAN device; a packet it forwards or bridges out was already captured
    # as it came in, from the device's MAC
    if pkttype not in (_SLL_HOST, _SLL_BROADCAST, _SLL_MULTICAST, _SLL_OTHERHOST):
        skipped.outgoing += 1
        return None
    if pkttype == _SLL_BROADCAST:
        dst = _BROADCAST
    elif pkttype == _SLL_MULTICAST:
        dst = _multicast_mac(protocol, payload)
    else:
        dst = _UNICAST
    if protocol in (_SLL_P_802_3, _SLL_P_802_2):  # an 802.3 frame (spanning tree, LLC): its length field
        protocol = min(len(payload), 1500)
    return dst + addr[:6] + protocol.to_bytes(2, "big") + payload


def _multicast_mac(protocol: int, payload: bytes) -> bytes:
    """The Ethernet group address an IPv4 (01:00:5e + 23 bits) or IPv6 (33:33 + 32 bits) multicast maps to."""
    if protocol == 0x0800 and len(payload) >= 20 and 224 <= payload[16] <= 239:
        return b"\x01\x00\x5e" + bytes([payload[17] & 0x7F]) + payload[18:20]
    if protocol == 0x86DD and len(payload) >= 40 and payload[24] == 0xFF:
        return b"\x33\x33" + payload[36:40]
    return _MULTICAST


class _CutShort(Exception):
    """A file ends inside a record, block or header, or a gzip stream before its end marker; deliberately not an
    EOFError, which scapy takes for a clean end."""


class _Corrupt(Exception):
    """Damage scapy would drop with a warning naming no file: a packet naming an interface the file never
    described, a bad pcapng section header."""


class _Unreadable(Exception):
    """A read that failed (a disk error) or a damaged gzip stream; deliberately not an OSError, which scapy's
    pcapng reader takes for a clean end."""


_inside = threading.local()  # set while this module's pcapng reader reads a block; holds scapy's last warning


class _QuietInside(logging.Filter):
    """Drops scapy's warnings from inside ``_pcapng_reader``'s blocks, keeping the last for our message: they
    name no file, and the damage is reported as a ``PcapError`` that does."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_inside, "reading", False):
            return True
        _inside.warning = record.getMessage().removeprefix("PcapNg: ")
        return False


_QUIET = _QuietInside()


class _Gunzip:
    """The bytes a gzip stream (one member or several, as ``cat a.gz b.gz``) decompresses to. Not
    ``gzip.GzipFile``: a cut stream must be a ``_CutShort`` (its EOFError is a clean end to scapy), and its
    buffered reads would lose, with the read that meets the cut, whole records decompressed before it."""

    def __init__(self, raw: _Stream, head: bytes) -> None:
        self._raw = raw
        self._z = zlib.decompressobj(31)  # 31: a gzip header and trailer, whose CRC and length zlib checks
        self._in = head  # compressed bytes already read to tell gzip from pcap
        self._out = bytearray()

    def read(self, size: int) -> bytes:
        while len(self._out) < size:
            if self._z.eof:  # a member ended: the file may hold another, or zeros, which gzip takes as the end
                self._in = self._z.unused_data.lstrip(b"\0")
                while not self._in:
                    more = self._raw.read(_GZIP_IN)
                    if not more:
                        break
                    self._in = more.lstrip(b"\0")
                if not self._in:
                    break
                self._z = zlib.decompressobj(31)
            if not self._in:
                self._in = self._z.unconsumed_tail or self._raw.read(_GZIP_IN)
                if not self._in:
                    raise _CutShort("the gzip stream ends before its end marker")
            try:  # bounded: a small file can decompress to gigabytes
                self._out += self._z.decompress(self._in, max(size - len(self._out), _GZIP_OUT))
            except zlib.error as exc:
                raise _Unreadable(f"damaged gzip stream: {exc}") from exc
            self._in = b""
        data = bytes(self._out[:size])
        del self._out[:size]
        return data

    def close(self) -> None:
        self._raw.close()


class _Stream:
    """A capture file's bytes, read once front to back, as scapy's readers read them: a pipe cannot be reopened
    or rewound, nor tell its offset, so this counts it. A failed read is ``_Unreadable``, not scapy's quiet end."""

    def __init__(self, source) -> None:  # noqa: ANN001 - an open binary file or a _Gunzip
        self._source = source
        self.offset = 0
        self.short = False  # a read got fewer bytes than asked: the data ended

    def read(self, size: int) -> bytes:
        if size > MAX_READ:  # before any of it is read: from a gzip stream it would be decompressed into memory
            raise _Corrupt(f"a block of {size} bytes after byte {self.offset}, more than {MAX_READ >> 20} MiB")
        try:
            data = self._source.read(size)
        except OSError as exc:
            raise _Unreadable(f"read failed: {exc}") from exc
        self.offset += len(data)
        self.short = self.short or len(data) < size
        return data

    def tell(self) -> int:
        return self.offset

    def close(self) -> None:
        self._source.close()


def _pcap_reader(path: str, stream: _Stream, magic: bytes):
    """scapy's pcap reader on ``stream`` (its magic read), except that a file ending inside its header or a
    record's raises ``_CutShort`` where scapy's refuses it as no pcap (file header), ends quietly (record header)
    or warns without naming the file (record data)."""
    from scapy.error import Scapy_Exception
    from scapy.utils import MTU, RawPcapReader

    class StrictPcapReader(RawPcapReader):
        def __init__(self, filename: str, fdesc: _Stream, magic: bytes) -> None:
            try:
                super().__init__(filename, fdesc, magic)
            except Scapy_Exception as exc:  # the magic is a pcap's: only the 20 bytes after it can be missing
                raise _CutShort(f"the file holds only {fdesc.offset} of the 24 bytes of its pcap header") from exc

        def _read_packet(self, size: int = MTU):  # type: ignore[override]
            start = self.f.tell()
            header = self.f.read(16)
            if not header:
                raise EOFError
            if len(header) < 16:
                raise _CutShort(f"the record at byte {start} ends inside its header")
            sec, usec, caplen, wirelen = struct.unpack(self.endian + "IIII", header)
            meta = RawPcapReader.PacketMetadata(sec=sec, usec=usec, wirelen=wirelen, caplen=caplen)
            if caplen > MAX_CAPLEN:  # read_frames refuses it as corrupt: no reason to read gigabytes first
                return b"", meta
            data = self.f.read(caplen)
            if len(data) < caplen:
                raise _CutShort(f"the record at byte {start} ends after {len(data)} of its {caplen} bytes")
            return data[:size], meta

    # the metaclass's call would open the file by name, a second time: a pipe has no second time
    reader = StrictPcapReader.__new__(StrictPcapReader)
    reader.__init__(path, stream, magic)
    return reader


def _pcapng_reader(path: str, stream: _Stream, magic: bytes):
    """scapy's pcapng reader on ``stream`` (its magic read), except that a file ending (or a block length
    pointing) past the data raises ``_CutShort`` instead of ending quietly with a warning, as scapy's own reader
    does, a bad section header or an undescribed interface ``_Corrupt``; and Simple Packet Blocks are read."""
    from scapy.error import Scapy_Exception
    from scapy.utils import RawPcapNgReader

    runtime = logging.getLogger("scapy.runtime")
    if _QUIET not in runtime.filters:  # first: scapy's rate filter drops or rewrites ("more ...") repeated warnings
        runtime.filters.insert(0, _QUIET)

    class StrictPcapNgReader(RawPcapNgReader):
        def _read_block(self, size: int = 65535):  # type: ignore[override]
            start = self.f.tell()
            was, _inside.reading = getattr(_inside, "reading", False), True
            try:
                return super()._read_block(size)
            except EOFError as exc:
                if self.f.tell() != start:  # bytes were read: the end fell inside a block, not between two
                    raise _CutShort(f"block at byte {start} is cut short or has a bad length") from exc
                raise
            finally:
                _inside.reading = was

        def _read_block_shb(self) -> None:  # the file's first block, read by __init__, or a later section's
            start = self.f.tell() - 4  # its type, the magic, is read
            # A section's interface ids count from 0 in its own Interface Description Blocks (and its process ids in
            # its own): scapy kept the sections before, so in two captures joined by `cat` the second's packets took
            # the first's interfaces, their link types and time resolutions (cooked packets read as Ethernet).
            self.interfaces, self.process_information = [], []
            was, _inside.reading = getattr(_inside, "reading", False), True
            _inside.warning = None
            try:
                super()._read_block_shb()
            except (EOFError, Scapy_Exception) as exc:
                if self.f.short:
                    raise _CutShort(f"the section header block at byte {start} is cut short") from exc
                raise _Corrupt(f"the section header block at byte {start} is bad: "
                               f"{_inside.warning or exc or 'its byte-order magic, version or length'}") from exc
            finally:
                _inside.reading = was

        def _check_interface_id(self, intid: int) -> bool:  # type: ignore[override]
            if intid >= len(self.interfaces):  # scapy drops the packet with a warning naming no file
                raise _Corrupt(f"a packet names interface {intid}, which the file never described")
            return True

        def _read_block_spb(self, block: bytes, size: int):  # type: ignore[override]
            # scapy's cuts the packet to the interface's snaplen even when that is 0, "no limit"; and the
            # length field is the packet's original length, of which the block holds at most what follows it
            self._check_interface_id(0)  # the spec: a simple packet is from the file's first interface
            if len(block) < 4:
                raise _Corrupt(f"a simple packet block of {len(block)} bytes, too short for its length field")
            (wirelen,) = struct.unpack_from(self.endian + "I", block)
            linktype, snaplen, options = self.interfaces[0]
            data = block[4:4 + min(wirelen, snaplen or wirelen)]
            return data[:size], RawPcapNgReader.PacketMetadata(
                linktype=linktype, tsresol=options["tsresol"], tshigh=None, tslow=None, wirelen=wirelen,
                ifname=None, direction=None, process_information={}, comments=None)

    reader = StrictPcapNgReader.__new__(StrictPcapNgReader)  # as in _pcap_reader: the file is open already
    reader.__init__(path, stream, magic)
    return reader


def _open(path: str | Path):
    """A reader for ``path``, read once from its start: plain or gzip'd, pcap or pcapng, told by content."""
    fh = open(path, "rb")  # noqa: SIM115 - the reader closes it
    try:
        stream = _Stream(fh)
        head = stream.read(2)
        gzipped = head == _GZIP_MAGIC
        if gzipped:
            stream = _Stream(_Gunzip(stream, head))
            head = b""
        magic = head + stream.read(4 - len(head))
        if not magic:
            raise PcapError(f"{path}: empty file" + (": its gzip stream holds no bytes" if gzipped else ""))
        if magic == _PCAPNG_MAGIC:
            return _pcapng_reader(str(path), stream, magic)
        if magic in _PCAP_MAGICS:
            return _pcap_reader(str(path), stream, magic)
        known = (*_PCAP_MAGICS, _PCAPNG_MAGIC) + (() if gzipped else (_GZIP_MAGIC,))
        if len(magic) < 4 and any(m.startswith(magic) for m in known):
            raise _CutShort(f"the file holds only {len(magic)} of the 4 bytes of its magic number")
        raise PcapError(f"{path}: not a pcap or pcapng file{' inside its gzip stream' if gzipped else ''} "
                        f"(it starts {magic.hex(' ')})")
    except BaseException as exc:
        fh.close()
        if isinstance(exc, _CutShort):
            raise PcapError(f"{path}: truncated inside its file header: {exc}") from exc
        if isinstance(exc, _Corrupt):
            raise PcapError(f"{path}: corrupt file header: {exc}") from exc
        if isinstance(exc, _Unreadable):
            raise PcapError(f"{path}: not a readable pcap or pcapng file ({exc})") from exc
        raise


def read_frames(path: str | Path, skipped: Skipped | None = None) -> Iterator[tuple[float, bytes]]:
    """Yield (timestamp, Ethernet frame) for every frame in ``path``; Linux cooked (SLL, SLL2) packets become
    the Ethernet frames they stand for, and those that stand for none, or are stamped past ``LAST_TIME``, are
    counted in ``skipped``.

    ``path`` is read once from its start, so it may be a pipe; pcap or pcapng, plain or gzip'd, told by content.
    A pcapng of several sections (captures joined by ``cat``) reads each section with its own interfaces.
    A pcapng Simple Packet Block carries no time: its frame takes the time of the frame before it (a capture
    tool writes in time order), and one before any timed frame is counted in ``skipped.untimed``.

    An empty file, one that is not a capture at all, whose link type (per interface in pcapng) is not one read
    here, with a pcap record longer than the snapshot length, that ends inside its file header or a record or
    block (a capture stopped while writing) or whose gzip stream ends before its end marker, a pcapng packet
    naming an interface the file never described, or a pcapng block longer than ``MAX_READ``, raises
    ``PcapError`` naming it, after yielding the frames before the damage.
    """
    skipped = skipped if skipped is not None else Skipped()
    try:
        reader = _open(path)
    except OSError as exc:
        raise PcapError(f"{path}: not a readable pcap or pcapng file ({exc})") from exc
    with reader:
        snaplen = getattr(reader, "snaplen", None)  # only pcap has one per file
        if snaplen is not None:
            convert = _converter(path, reader.linktype)
            limit = min(snaplen, MAX_CAPLEN) if snaplen else MAX_CAPLEN
            scale = 1e9 if reader.nano else 1e6
        kept = 0
        last = None  # the time of the last timed record, for a simple packet's
        try:
            for n, (data, meta) in enumerate(reader, 1):
                if snaplen is not None:
                    if meta.caplen > limit:
                        raise PcapError(f"{path}: corrupt record {n}: {meta.caplen} bytes, over the limit of {limit}")
                    ts = meta.sec + meta.usec / scale
                else:  # pcapng: each packet names its interface's link type; a 64-bit timestamp in tsresol units
                    convert = _converter(path, meta.linktype)
                    ts = last if meta.tshigh is None else ((meta.tshigh << 32) | meta.tslow) / meta.tsresol
                kept = n
                if ts is None:
                    skipped.untimed += 1
                    continue
                if ts > LAST_TIME:  # damage or hostility: a device first seen then broke every date shown of it
                    skipped.bad_time += 1
                    continue
                last = ts
                if convert is not None:
                    data = convert(data, skipped)
                    if data is None:
                        continue
                yield ts, data
        except PcapError:
            raise
        except _CutShort as exc:
            raise PcapError(f"{path}: truncated after {kept} records: {exc}") from exc
        except _Corrupt as exc:
            raise PcapError(f"{path}: corrupt after {kept} records: {exc}") from exc
        except _Unreadable as exc:
            raise PcapError(f"{path}: unreadable after {kept} records: {exc}") from exc
        except Exception as exc:
            raise PcapError(f"{path}: corrupt record ({exc})") from exc


def _converter(path: str | Path, linktype: int) -> Callable[[bytes, Skipped], bytes | None] | None:
    """None for Ethernet (read as it is), the cooked-header reader for SLL and SLL2; else ``PcapError``."""
    if linktype == ETHERNET:
        return None
    if linktype == LINUX_SLL:
        return _sll
    if linktype == LINUX_SLL2:
        return _sll2
    raise PcapError(f"{path}: link type {linktype} is not one read here: {READ_LINKTYPES}")
