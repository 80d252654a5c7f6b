"""Reading capture files (pcap and pcapng) as (timestamp, Ethernet frame) pairs.

Ethernet captures are read as they are. Linux cooked captures (``tcpdump -i any``: LINUX_SLL, and LINUX_SLL2
from tcpdump 4.99 on) carry, per packet, the sender's link-layer address, the packet type and the EtherType instead
of an Ethernet header: each packet from an Ethernet interface becomes the Ethernet frame it stands for, keyed by
its sender's MAC. Packets that stand for no LAN device's frame are counted in ``Skipped``, not errors: those the
capturing host sent (its own, or a forwarded or bridged copy of a packet already captured coming in) and those
from an interface without a 6-byte Ethernet address (loopback, tunnels, PPP, WireGuard). So are records of any
link type stamped past the year 9999, which a pcapng's 64-bit time can be.

A file cut short (a capture stopped while writing, a partial copy) yields every complete record and then raises
``PcapError`` naming the file and how many records it kept: scapy's readers end such a file quietly or with an
unprefixed warning, and a caller could not tell it from a whole one.
"""

from __future__ import annotations

import logging
import struct
import threading
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


class PcapError(Exception):
    """A capture file that cannot be read; the message names the file."""


@dataclass
class Skipped:
    """Packets of a Linux cooked capture that stand for no LAN device's Ethernet frame: counted, not errors."""

    outgoing: int = 0  # sent by the capturing host: its own, or a copy of a packet it forwarded or bridged
    not_ethernet: int = 0  # from an interface whose address is not a 6-byte MAC: loopback, tunnels, PPP
    short: int = 0  # shorter than the cooked header (cut by the snapshot length)
    bad_time: int = 0  # stamped past the year 9999 (a pcapng's 64-bit time): no clock, date or page can show it

    @property
    def total(self) -> int:
        return self.outgoing + self.not_ethernet + self.short + self.bad_time

    def __str__(self) -> str:
        parts = [f"{self.outgoing} sent by the capturing host", f"{self.not_ethernet} not from an Ethernet interface",
                 f"{self.short} shorter than their cooked header", f"{self.bad_time} stamped past the year 9999"]
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
    """A file ends inside a record or block, or names what it never defined; deliberately not an EOFError, which
    scapy takes for a clean end."""


_inside = threading.local()  # set while this module's pcapng reader reads a block


class _QuietInside(logging.Filter):
    """Drops scapy's warnings from inside ``_pcapng_reader``'s blocks: they name no file, and a block cut short
    is reported as a ``PcapError`` that does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_inside, "reading", False)


_QUIET = _QuietInside()


class _Undefined(Exception):
    """A pcapng packet names an interface the file never described: scapy drops it with an unprefixed warning."""


def _pcap_reader(path: str):
    """scapy's pcap reader, except that a file ending inside a record's header or data raises ``_CutShort``
    where scapy's ends quietly (header) or warns without naming the file (data)."""
    from scapy.utils import MTU, RawPcapReader

    class StrictPcapReader(RawPcapReader):
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

    return StrictPcapReader(path)


def _pcapng_reader(path: str):
    """scapy's pcapng reader, except that a file ending (or a block length pointing) past the data raises
    ``_CutShort`` instead of ending quietly with a warning, as scapy's own reader does."""
    from scapy.utils import RawPcapNgReader

    logging.getLogger("scapy.runtime").addFilter(_QUIET)  # once: addFilter keeps one of each

    class StrictPcapNgReader(RawPcapNgReader):
        def _read_block(self, size: int = 65535):  # type: ignore[override]
            start = self.f.tell()
            _inside.reading = True
            try:
                return super()._read_block(size)
            except EOFError as exc:
                if self.f.tell() != start:  # bytes were read: the end fell inside a block, not between two
                    raise _CutShort(f"block at byte {start} is cut short or has a bad length") from exc
                raise
            finally:
                _inside.reading = False

        def _check_interface_id(self, intid: int) -> bool:  # type: ignore[override]
            if intid >= len(self.interfaces):  # scapy drops the packet with a warning naming no file
                raise _Undefined(f"a packet names interface {intid}, which the file never described")
            return True

    return StrictPcapNgReader(path)


def read_frames(path: str | Path, skipped: Skipped | None = None) -> Iterator[tuple[float, bytes]]:
    """Yield (timestamp, Ethernet frame) for every frame in ``path``; Linux cooked (SLL, SLL2) packets become
    the Ethernet frames they stand for, and those that stand for none, or are stamped past ``LAST_TIME``, are
    counted in ``skipped``.

    A file that is not a capture at all, whose link type (per interface in pcapng) is not one read here, with a
    pcap record longer than the snapshot length, that ends inside a record or block (a capture stopped while
    writing), or a pcapng packet naming an interface the file never described, raises ``PcapError`` naming it,
    after yielding the frames before the damage.
    """
    skipped = skipped if skipped is not None else Skipped()
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        reader = _pcapng_reader(str(path)) if magic == _PCAPNG_MAGIC else _pcap_reader(str(path))
    except (OSError, ValueError) as exc:
        raise PcapError(f"{path}: not a readable pcap or pcapng file ({exc})") from exc
    except Exception as exc:  # scapy.error.Scapy_Exception for a bad magic number
        raise PcapError(f"{path}: not a pcap or pcapng file ({exc})") from exc
    with reader:
        snaplen = getattr(reader, "snaplen", None)  # only pcap has one per file
        if snaplen is not None:
            convert = _converter(path, reader.linktype)
            limit = min(snaplen, MAX_CAPLEN) if snaplen else MAX_CAPLEN
            scale = 1e9 if reader.nano else 1e6
        kept = 0
        try:
            for n, (data, meta) in enumerate(reader, 1):
                if snaplen is not None:
                    if meta.caplen > limit:
                        raise PcapError(f"{path}: corrupt record {n}: {meta.caplen} bytes, over the limit of {limit}")
                    ts = meta.sec + meta.usec / scale
                else:  # pcapng: each packet names its interface's link type; a 64-bit timestamp in tsresol units
                    convert = _converter(path, meta.linktype)
                    ts = ((meta.tshigh << 32) | meta.tslow) / meta.tsresol
                kept = n
                if ts > LAST_TIME:  # damage or hostility: a device first seen then broke every date shown of it
                    skipped.bad_time += 1
                    continue
                if convert is not None:
                    data = convert(data, skipped)
                    if data is None:
                        continue
                yield ts, data
        except EOFError:
            return
        except PcapError:
            raise
        except _CutShort as exc:
            raise PcapError(f"{path}: truncated after {kept} records: {exc}") from exc
        except _Undefined as exc:
            raise PcapError(f"{path}: corrupt after {kept} records: {exc}") from exc
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
