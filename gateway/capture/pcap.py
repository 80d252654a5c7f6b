"""Reading capture files (pcap and pcapng) as (timestamp, Ethernet frame) pairs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

ETHERNET = 1  # LINKTYPE_ETHERNET
MAX_CAPLEN = 262144  # libpcap's largest snapshot length: a record claiming more is damage, not a frame
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


class PcapError(Exception):
    """A capture file that cannot be read; the message names the file."""


class _CutShort(Exception):
    """A pcapng file ends inside a block; deliberately not an EOFError, which scapy takes for a clean end."""


def _pcapng_reader(path: str):
    """scapy's pcapng reader, except that a file ending (or a block length pointing) past the data raises
    ``_CutShort`` instead of ending quietly with a warning, as scapy's own reader does."""
    from scapy.utils import RawPcapNgReader

    class StrictPcapNgReader(RawPcapNgReader):
        def _read_block(self, size: int = 65535):  # type: ignore[override]
            start = self.f.tell()
            try:
                return super()._read_block(size)
            except EOFError as exc:
                if self.f.tell() != start:  # bytes were read: the end fell inside a block, not between two
                    raise _CutShort(f"block at byte {start} is cut short or has a bad length") from exc
                raise

    return StrictPcapNgReader(path)


def read_frames(path: str | Path) -> Iterator[tuple[float, bytes]]:
    """Yield (timestamp, frame) for every Ethernet frame in ``path``.

    A pcap whose last record is cut short (a capture stopped while writing) ends with the frames read so far
    and a warning. A file that is not a capture at all, whose link type (per packet in pcapng) is not Ethernet,
    with a pcap record longer than the snapshot length, or a pcapng that ends inside a block raises
    ``PcapError`` naming it, after yielding the frames before the damage.
    """
    from scapy.utils import RawPcapReader  # scapy costs ~70 MB; only replay and training need it

    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        reader = _pcapng_reader(str(path)) if magic == _PCAPNG_MAGIC else RawPcapReader(str(path))
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
        try:
            for n, (data, meta) in enumerate(reader, 1):
                if snaplen is not None:
                    if meta.caplen > limit:
                        raise PcapError(f"{path}: corrupt record {n}: {meta.caplen} bytes, over the limit of {limit}")
                    if len(data) < min(meta.caplen, 65535):  # scapy hands at most 65535 bytes of a record
                        log.warning("%s: last record (%d) cut short; keeping the %d frames before it", path, n, n - 1)
                        return
                    ts = meta.sec + meta.usec / scale
                else:  # pcapng: each packet names its interface's link type; a 64-bit timestamp in tsresol units
                    _check_linktype(path, meta.linktype)
                    ts = ((meta.tshigh << 32) | meta.tslow) / meta.tsresol
                yield ts, data
        except EOFError:
            return
        except PcapError:
            raise
        except Exception as exc:
            raise PcapError(f"{path}: corrupt record ({exc})") from exc


def _check_linktype(path: str | Path, linktype: int) -> None:
    if linktype != ETHERNET:
        raise PcapError(f"{path}: link type {linktype} is not Ethernet")
