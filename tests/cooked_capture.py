"""Real Ethernet captures rewritten as Linux cooked captures, as `tcpdump -i any` on the capturing host writes them."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from scapy.layers.l2 import CookedLinux, CookedLinuxV2
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, PcapWriter, RawPcapReader

# the router the iot-sentinel captures were taken on: every query their devices send goes to it
SENTINEL_GATEWAY = "00:b5:6d:06:08:ba"


def as_cooked(src: Path, out: Path, linktype: int, host: str | None = None) -> int:
    """Write ``src`` (Ethernet) to ``out`` as `tcpdump -i any` on the capturing host would have: each frame's
    sender address, packet type (from its destination; ``host``'s own frames outgoing) and EtherType in a cooked
    header, SLL (113) in pcap or SLL2 (276) in pcapng. Returns how many frames ``host`` sent."""
    writer = PcapWriter(str(out), linktype=113) if linktype == 113 else PcapNgWriter(str(out))
    writer.linktype = linktype
    layer = CookedLinux if linktype == 113 else CookedLinuxV2
    own = 0
    with RawPcapReader(str(src)) as reader:
        assert reader.linktype == 1
        for frame, meta in reader:
            dst, sender, ethertype = frame[:6], frame[6:12], int.from_bytes(frame[12:14], "big")
            if sender.hex(":") == host:
                pkttype, own = 4, own + 1
            else:
                pkttype = 1 if dst == b"\xff" * 6 else 2 if dst[0] & 1 else 0
            proto, payload = (ethertype, frame[14:]) if ethertype >= 0x600 else (4, frame[14 : 14 + ethertype])
            pkt = layer(pkttype=pkttype, lladdrtype=1, lladdrlen=6, src=sender + b"\0\0", proto=proto) / Raw(payload)
            pkt.time = Decimal(meta.sec) + Decimal(meta.usec) / 1_000_000  # exact: a float could move a microsecond
            writer.write(pkt)
    writer.close()
    return own
