"""Reading capture files (pcap and pcapng) as (timestamp, Ethernet frame) pairs.

A file cut short (a capture stopped while writing, a partial copy) yields every complete record and then raises
``PcapError`` naming the file and how many records it kept: scapy's readers end such a file quietly or with an
unprefixed warning, and a caller could not tell it from a whole one.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

ETHERNET = 1  # LINKTYPE_ETHERNET
MAX_CAPLEN = 262144  # libpcap's largest snapshot length: a record claiming more is damage, not a frame
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


class PcapError(Exception):
    """A capture file that cannot be read; the message names the file."""


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


def read_frames(path: str | Path) -> Iterator[tuple[float, bytes]]:
    """Yield (timestamp, frame) for every Ethernet frame in ``path``.

    A file that is not a capture at all, whose link type (per packet in pcapng) is not Ethernet, with a pcap
    record longer than the snapshot length, that ends inside a record or block (a capture stopped while
    writing), or a pcapng packet naming an interface the file never described, raises ``PcapError`` naming it,
    after yielding the frames before the damage.
    """
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
            _check_linktype(path, reader.linktype)
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
                    _check_linktype(path, meta.linktype)
                    ts = ((meta.tshigh << 32) | meta.tslow) / meta.tsresol
                yield ts, data
                kept = n
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


def _check_linktype(path: str | Path, linktype: int) -> None:
    if linktype != ETHERNET:
        raise PcapError(f"{path}: link type {linktype} is not Ethernet")
