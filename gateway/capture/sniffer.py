"""The live passive sniffer: DNS queries (over UDP and TCP), DHCP and mDNS seen on an interface (a mirror port
or a bridge), and each sender's presence from the first of those frames it sends (``Senders``).

An AF_PACKET socket with a classic BPF program attached in the kernel, so only the few packets we decode ever
reach Python, and a TPACKET_V3 receive ring, so they arrive in blocks without a system call per packet.
scapy's AsyncSniffer loses packets above ~5k/s here; this keeps up far higher (benchmarks/capture_rate.py).
Frames go through the same ``parse_frame`` as pcap replay and the demo.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

import psutil

from gateway.capture.frames import DnsStreams, MalformedPacket, Senders, SplitDnsMessage, parse_frame
from gateway.events import Counters, Event

log = logging.getLogger(__name__)

Sink = Callable[[list[Event]], None]

# Regenerate with (F = '(udp and (dst port 53 or port 67 or port 68 or port 5353)) or (tcp and dst port 53)'):
#   tcpdump -ddd -y EN10MB "inbound and (F or (vlan and (F or (vlan and F))))"
# (the first line of the output is the instruction count; each further line is "code jt jf k").
# "inbound" compiles to a test of the kernel's packet type (SKF_AD_PKTTYPE), so frames the host sends itself
# (PACKET_OUTGOING) never reach us: on lo and veth every packet would otherwise be seen twice. DNS answers
# (source port 53) are left out because the parser reports queries only. TCP to port 53 passes whole, handshake
# and bare ACKs too (a few frames a connection, each a length check in the parser): a query sent over TCP after a
# truncated answer, or by a resolver that always uses TCP, is a query the device made. IPv4 later fragments are
# rejected; a first fragment passes (its ports are there) and the parser drops it, as it cannot be decoded alone.
# The kernel takes the outer 802.1Q/802.1ad tag off before we see a frame, but a second tag (QinQ, or a tag
# on a trunk it does not untag) stays in the frame: the "vlan" branches accept one or two tags in place.
# libpcap's "vlan" shifts the offsets of everything after it, so the second tag is nested inside the first
# branch rather than written as a separate alternative (which would test for three tags).
BPF_FILTER: tuple[tuple[int, int, int, int], ...] = (
    (40, 0, 0, 4294963204), (21, 118, 0, 4), (40, 0, 0, 12), (21, 0, 18, 2048), (48, 0, 0, 23), (21, 0, 10, 17),
    (40, 0, 0, 20), (69, 112, 0, 8191), (177, 0, 0, 14), (72, 0, 0, 16), (21, 108, 0, 53), (21, 107, 0, 67),
    (21, 106, 0, 68), (21, 105, 0, 5353), (72, 0, 0, 14), (21, 103, 86, 67), (21, 0, 103, 6), (40, 0, 0, 20),
    (69, 101, 0, 8191), (177, 0, 0, 14), (72, 0, 0, 16), (21, 97, 98, 53), (21, 0, 13, 34525), (48, 0, 0, 20),
    (21, 0, 7, 17), (40, 0, 0, 56), (21, 92, 0, 53), (21, 91, 0, 67), (21, 90, 0, 68), (21, 89, 0, 5353),
    (40, 0, 0, 54), (21, 87, 70, 67), (21, 87, 0, 44), (21, 0, 86, 6), (40, 0, 0, 56), (21, 83, 84, 53),
    (21, 2, 0, 33024), (21, 1, 0, 34984), (21, 0, 81, 37120), (40, 0, 0, 16), (21, 0, 18, 2048), (48, 0, 0, 27),
    (21, 0, 10, 17), (40, 0, 0, 24), (69, 60, 0, 8191), (177, 0, 0, 18), (72, 0, 0, 20), (21, 71, 0, 53),
    (21, 70, 0, 67), (21, 69, 0, 68), (21, 68, 0, 5353), (72, 0, 0, 18), (21, 66, 16, 67), (21, 0, 51, 6),
    (40, 0, 0, 24), (69, 49, 0, 8191), (177, 0, 0, 18), (72, 0, 0, 20), (21, 60, 46, 53), (21, 0, 15, 34525),
    (48, 0, 0, 24), (21, 0, 9, 17), (40, 0, 0, 60), (21, 55, 0, 53), (21, 54, 0, 67), (21, 53, 0, 68),
    (21, 52, 0, 5353), (40, 0, 0, 58), (21, 50, 0, 67), (21, 49, 0, 68), (21, 48, 34, 5353), (21, 33, 0, 44),
    (21, 0, 32, 6), (40, 0, 0, 60), (21, 44, 30, 53), (21, 2, 0, 33024), (21, 1, 0, 34984), (21, 0, 27, 37120),
    (40, 0, 0, 20), (21, 0, 12, 2048), (48, 0, 0, 31), (21, 0, 25, 17), (40, 0, 0, 28), (69, 36, 0, 8191),
    (177, 0, 0, 22), (72, 0, 0, 24), (21, 32, 0, 53), (21, 31, 0, 67), (21, 30, 0, 68), (21, 29, 0, 5353),
    (72, 0, 0, 22), (21, 27, 10, 67), (21, 0, 27, 34525), (48, 0, 0, 28), (21, 0, 9, 17), (40, 0, 0, 64),
    (21, 22, 0, 53), (21, 21, 0, 67), (21, 20, 0, 68), (21, 19, 0, 5353), (40, 0, 0, 62), (21, 17, 0, 67),
    (21, 16, 0, 68), (21, 15, 16, 5353), (21, 15, 10, 44), (40, 0, 0, 20), (21, 0, 7, 2048), (48, 0, 0, 31),
    (21, 0, 11, 6), (40, 0, 0, 28), (69, 9, 0, 8191), (177, 0, 0, 22), (72, 0, 0, 24), (21, 5, 6, 53),
    (21, 0, 5, 34525), (48, 0, 0, 28), (21, 0, 3, 6), (40, 0, 0, 64), (21, 0, 1, 53), (6, 0, 0, 262144), (6, 0, 0, 0),
)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
SO_ATTACH_FILTER = 26
_REQ3 = struct.Struct("@7I")  # struct tpacket_req3
# struct tpacket3_hdr up to tp_mac: next_offset, sec, nsec, snaplen, len, status, mac
_PKT_HDR = struct.Struct("@6IH")
_BLOCK_STATUS = 8  # offsets in struct tpacket_block_desc (its hdr.bh1 starts at 8)
_BLOCK_PKTS = struct.Struct("@II")  # num_pkts, offset_to_first_pkt at offset 12
_STATUS = struct.Struct("@I")
_STATS = struct.Struct("@II")  # struct tpacket_stats_v3 begins with packets, drops (reading resets them)
_STATS_V3_SIZE = 12
# Small blocks, many of them: at a low rate the kernel closes a block after _BLOCK_TIMEOUT_MS however empty it
# is, so the ring absorbs blocks * timeout of stalling (2.5 s with 8 MiB); at a high rate blocks fill up and
# it absorbs ring_bytes of frames (~45,000 DNS queries with 8 MiB).
_BLOCK_SIZE = 32 << 10
_BLOCK_TIMEOUT_MS = 10  # a partly filled block reaches us after at most this long
_FRAME_SIZE = 2048  # only checked by the kernel for TPACKET_V3; frames are packed in blocks
_WAKE_MS = 200  # how often an idle thread wakes to notice stop(); bounds stop()'s latency
_STATS_EVERY_S = 1.0


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _filter_program() -> tuple[bytes, ctypes.Array]:
    """The ``struct sock_fprog`` for SO_ATTACH_FILTER, and the instruction array it points into."""
    code = b"".join(struct.pack("@HBBI", *insn) for insn in BPF_FILTER)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(BPF_FILTER), ctypes.addressof(buf))
    return bytes(prog), buf


def open_ring(interface: str, ring_bytes: int) -> tuple[socket.socket, mmap.mmap, int]:
    """An AF_PACKET socket on ``interface`` with ``BPF_FILTER`` and a TPACKET_V3 receive ring.

    The kernel writes accepted frames into the shared ring in blocks and hands over a block at a time, so
    Python pays no system call per packet. The filter is attached before the socket is bound to a protocol,
    so no unfiltered frame is ever queued. Returns the socket, the mapped ring and its number of blocks.
    """
    blocks = max(2, ring_bytes // _BLOCK_SIZE)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        prog, _keep = _filter_program()  # the kernel copies the program during setsockopt
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        frames = _BLOCK_SIZE // _FRAME_SIZE * blocks
        req = _REQ3.pack(_BLOCK_SIZE, blocks, _FRAME_SIZE, frames, _BLOCK_TIMEOUT_MS, 0, 0)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        ring = mmap.mmap(sock.fileno(), _BLOCK_SIZE * blocks, mmap.MAP_SHARED, prot)
        sock.bind((interface, ETH_P_ALL))
    except BaseException:
        sock.close()
        raise
    return sock, ring, blocks


class Sniffer:
    """Captures DNS queries, DHCP and mDNS on ``interface`` in its own thread and hands events to ``sink``.

    ``sink`` gets one list of events per ring block (the frames of up to ~10 ms, at most 32 KiB of them);
    it runs on the sniffer's thread, so it should queue rather than block. ``ring_bytes`` is the kernel
    buffer that absorbs bursts and stalls while Python is busy. Counters: ``capture_frames``,
    ``capture_malformed``, ``capture_split_dns`` (DNS over TCP segments holding part of a message that could not
    be reassembled: ``SplitDnsMessage``, and what ``DnsStreams`` gave up), ``capture_dropped`` (frames the kernel
    lost because the ring was full), ``capture_sink_errors``, ``capture_errors`` (the interface went down).

    ``skip_dns_to_self`` leaves out DNS queries addressed to the interface's own addresses: when the gateway's
    DNS server answers there, it reports them itself, and capturing them too would count every query twice.

    Each unicast source's first captured frame also gives a ``DeviceSeen`` (before the frame's own events), even
    a frame that gives none (a DHCP reply, a query left to the DNS server) or is malformed: a device is present
    from its first frame. ``senders.forget(mac)`` makes a deleted device's next frame report it again.
    """

    def __init__(
        self,
        interface: str,
        sink: Sink,
        counters: Counters | None = None,
        *,
        ring_bytes: int = 8 << 20,
        skip_dns_to_self: bool = False,
    ) -> None:
        self.interface = interface
        self.sink = sink
        self.counters = counters if counters is not None else Counters()
        self.ring_bytes = ring_bytes
        self._sock: socket.socket | None = None
        self._ring: mmap.mmap | None = None
        self._blocks = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sink_failed = False
        self._parser_failed = False
        self.skip_dns_to_self = skip_dns_to_self
        self._own: frozenset[str] = frozenset()
        self.senders = Senders()
        self.dns_streams = DnsStreams()

    def start(self) -> None:
        """Open the socket (a missing interface or capability raises here) and start the thread."""
        if self._thread is not None:
            raise RuntimeError("sniffer already started")
        self._sock, self._ring, self._blocks = open_ring(self.interface, self.ring_bytes)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name=f"sniffer-{self.interface}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (within ~0.2 s), collect the last kernel drop count and close the socket."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout)
        if thread.is_alive():
            log.warning("sniffer on %s did not stop within %.1f s", self.interface, timeout)
            return
        self.read_stats()
        assert self._ring is not None and self._sock is not None
        self._ring.close()
        self._sock.close()
        self._ring = self._sock = None

    def __enter__(self) -> Sniffer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def read_stats(self) -> None:
        """Add the kernel's drop count since the last call to ``capture_dropped`` (done every second)."""
        if self._sock is None:
            return
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS_V3_SIZE)
        except OSError:
            return
        _packets, drops = _STATS.unpack_from(raw)
        if drops:
            self.counters.add("capture_dropped", drops)

    def _run(self) -> None:
        ring, sock = self._ring, self._sock
        assert ring is not None and sock is not None
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR)
        block = 0
        self._read_own_addresses()
        next_stats = time.monotonic() + _STATS_EVERY_S
        while not self._stopping.is_set():
            base = block * _BLOCK_SIZE
            if _STATUS.unpack_from(ring, base + _BLOCK_STATUS)[0] & TP_STATUS_USER:
                events = self._read_block(ring, base)
                _STATUS.pack_into(ring, base + _BLOCK_STATUS, TP_STATUS_KERNEL)  # hand the block back
                block = (block + 1) % self._blocks
                if events:
                    self._deliver(events)
            elif any(mask & select.POLLERR for _fd, mask in poller.poll(_WAKE_MS)):
                self._socket_error(sock)
            now = time.monotonic()
            if now >= next_stats:
                self.read_stats()
                self._read_own_addresses()  # DHCP or SLAAC may change them
                next_stats = now + _STATS_EVERY_S

    def _read_own_addresses(self) -> None:
        # On the sniffer's thread: it was started in the capture's network namespace, and psutil reads that one.
        if self.skip_dns_to_self:
            addrs = psutil.net_if_addrs().get(self.interface, ())
            self._own = frozenset(a.address.split("%")[0] for a in addrs
                                  if a.family in (socket.AF_INET, socket.AF_INET6))

    def _socket_error(self, sock: socket.socket) -> None:
        """The interface went down or away: report it, and wait (poll() keeps failing until it is up)."""
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # reading it clears it
        if err:
            self.counters.add("capture_errors")
            log.warning("capture on %s: %s", self.interface, os.strerror(err))
        self._stopping.wait(_WAKE_MS / 1000)

    def _read_block(self, ring: mmap.mmap, base: int) -> list[Event]:
        count, off = _BLOCK_PKTS.unpack_from(ring, base + 12)
        off += base
        events: list[Event] = []
        unpack = _PKT_HDR.unpack_from
        senders = self.senders
        known = senders.known
        streams = self.dns_streams
        given_up = streams.given_up
        for _ in range(count):
            next_off, sec, nsec, snaplen, _len, _status, mac = unpack(ring, off)
            frame = ring[off + mac : off + mac + snaplen]
            ts = sec + nsec / 1e9
            if frame[6:12] not in known:  # the only presence cost for a sender already reported
                events += senders.first(frame, ts)
            try:
                events.extend(parse_frame(frame, ts, source="capture", skip_dns_to=self._own, streams=streams))
            except SplitDnsMessage:
                self.counters.add("capture_split_dns")
            except MalformedPacket:
                self.counters.add("capture_malformed")
            except Exception:  # a parser bug on hostile input must not end the capture
                self.counters.add("capture_malformed")
                if not self._parser_failed:
                    self._parser_failed = True
                    log.exception("frame parser failed on %s (logged once; frame dropped)", frame[:128].hex())
            off += next_off
        self.counters.add("capture_frames", count)
        if streams.given_up > given_up:
            self.counters.add("capture_split_dns", streams.given_up - given_up)
        return events

    def _deliver(self, events: list[Event]) -> None:
        try:
            self.sink(events)
        except Exception:
            self.counters.add("capture_sink_errors")
            if not self._sink_failed:
                self._sink_failed = True
                log.exception("capture sink failed (logged once; capture goes on)")
