"""Reading capture files (pcap and pcapng) as (timestamp, Ethernet frame) pairs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


class PcapError(Exception):
    """A capture file that cannot be read; the message names the file."""


def read_frames(path: str | Path) -> Iterator[tuple[float, bytes]]:
    """Yield (timestamp, frame) for every Ethernet frame in ``path``.

    A truncated last record ends the file with the frames read so far; a file that is not a capture at all, or
    whose link type is not Ethernet, raises ``PcapError`` naming it.
    """
    from scapy.utils import RawPcapReader  # scapy costs ~70 MB; only replay and training need it

    try:
        reader = RawPcapReader(str(path))
    except (OSError, ValueError) as exc:
        raise PcapError(f"{path}: not a readable pcap or pcapng file ({exc})") from exc
    except Exception as exc:  # scapy.error.Scapy_Exception for a bad magic number
        raise PcapError(f"{path}: not a pcap or pcapng file ({exc})") from exc
    with reader:
        linktype = getattr(reader, "linktype", 1)
        if linktype != 1:
            raise PcapError(f"{path}: link type {linktype} is not Ethernet")
        try:
            for data, meta in reader:
                if hasattr(meta, "sec"):
                    ts = meta.sec + meta.usec / 1e6
                else:  # pcapng: a 64-bit timestamp in units of tsresol
                    ts = ((meta.tshigh << 32) | meta.tslow) / meta.tsresol
                yield ts, data
        except EOFError:
            return
        except Exception as exc:
            raise PcapError(f"{path}: corrupt record ({exc})") from exc
