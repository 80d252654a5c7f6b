"""The live passive sniffer: DNS queries, DHCP and mDNS seen on an interface (a mirror port or a bridge).

An AF_PACKET socket with a classic BPF program attached in the kernel, so only the few packets we decode ever
reach Python (scapy's AsyncSniffer loses packets above ~5k/s here; this keeps up far higher, see
benchmarks/capture_rate.py). Frames go through the same ``parse_frame`` as pcap replay and the demo.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from gateway.capture.frames import MalformedPacket, parse_frame
from gateway.events import Counters, Event

log = logging.getLogger(__name__)

Sink = Callable[[list[Event]], None]

# Regenerate with:
#   tcpdump -ddd -y EN10MB 'inbound and udp and (dst port 53 or port 67 or port 68 or port 5353)'
# (the first line of the output is the instruction count; each further line is "code jt jf k").
# "inbound" compiles to a test of the kernel's packet type (SKF_AD_PKTTYPE), so frames the host sends itself
# (PACKET_OUTGOING) never reach us: on lo and veth every packet would otherwise be seen twice. DNS answers
# (source port 53) are left out because the parser reports queries only. IPv4 later fragments are rejected.
BPF_FILTER: tuple[tuple[int, int, int, int], ...] = (
    (40, 0, 0, 4294963204), (21, 27, 0, 4), (40, 0, 0, 12), (21, 0, 12, 2048), (48, 0, 0, 23),
    (21, 0, 23, 17), (40, 0, 0, 20), (69, 21, 0, 8191), (177, 0, 0, 14), (72, 0, 0, 16), (21, 17, 0, 53),
    (21, 16, 0, 67), (21, 15, 0, 68), (21, 14, 0, 5353), (72, 0, 0, 14), (21, 12, 10, 67), (21, 0, 12, 34525),
    (48, 0, 0, 20), (21, 0, 10, 17), (40, 0, 0, 56), (21, 7, 0, 53), (21, 6, 0, 67), (21, 5, 0, 68),
    (21, 4, 0, 5353), (40, 0, 0, 54), (21, 2, 0, 67), (21, 1, 0, 68), (21, 0, 1, 5353), (6, 0, 0, 262144),
    (6, 0, 0, 0),
)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33  # root (CAP_NET_ADMIN) may exceed net.core.rmem_max
SO_TIMESTAMP = 29  # also the SCM_TIMESTAMP control message type
_TIMEVAL = struct.Struct("@ll")  # struct timeval in the host's native layout
_ANC_SPACE = socket.CMSG_SPACE(_TIMEVAL.size)
_STATS = struct.Struct("@II")  # struct tpacket_stats: packets, drops (reading resets both)
_WAKE_S = 0.2  # how often a blocked receive wakes to notice stop(); also bounds stop()'s latency
_STATS_EVERY_S = 1.0


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _filter_program() -> tuple[bytes, ctypes.Array]:
    """The ``struct sock_fprog`` for SO_ATTACH_FILTER, and the instruction array it points into."""
    code = b"".join(struct.pack("@HBBI", *insn) for insn in BPF_FILTER)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(BPF_FILTER), ctypes.addressof(buf))
    return bytes(prog), buf


def open_socket(interface: str, rcvbuf: int) -> socket.socket:
    """An AF_PACKET socket on ``interface`` that only ever receives frames accepted by ``BPF_FILTER``.

    The filter is attached before the socket is bound to a protocol, so no unfiltered frame is ever queued.
    """
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        prog, _keep = _filter_program()  # the kernel copies the program during setsockopt
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:  # CAP_NET_RAW without CAP_NET_ADMIN: the sysctl's rmem_max caps it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        # A blocking receive that gives up after _WAKE_S, so the thread can notice stop() without a
        # poll() before every packet.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", 0, int(_WAKE_S * 1e6)))
        sock.bind((interface, ETH_P_ALL))
    except BaseException:
        sock.close()
        raise
    return sock


class Sniffer:
    """Captures DNS queries, DHCP and mDNS on ``interface`` in its own thread and hands events to ``sink``.

    ``sink`` gets one list of events per batch of frames (up to ``batch``); it runs on the sniffer's thread,
    so it should queue rather than block. Counters: ``capture_frames``, ``capture_malformed``,
    ``capture_dropped`` (the kernel's count of frames lost because we fell behind), ``capture_sink_errors``.
    """

    def __init__(
        self,
        interface: str,
        sink: Sink,
        counters: Counters | None = None,
        *,
        rcvbuf: int = 8 << 20,
        batch: int = 256,
    ) -> None:
        self.interface = interface
        self.sink = sink
        self.counters = counters if counters is not None else Counters()
        self.rcvbuf = rcvbuf
        self.batch = batch
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sink_failed = False
        self._parser_failed = False

    def start(self) -> None:
        """Open the socket (a missing interface or capability raises here) and start the thread."""
        if self._thread is not None:
            raise RuntimeError("sniffer already started")
        self._sock = open_socket(self.interface, self.rcvbuf)
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
        if self._sock is not None:
            self._read_stats()
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Sniffer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        recvmsg = sock.recvmsg
        handle = self._handle
        next_stats = time.monotonic() + _STATS_EVERY_S
        while not self._stopping.is_set():
            try:
                frame, anc, _flags, _addr = recvmsg(65536, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                frame = None
            except OSError as exc:
                log.error("sniffer on %s stopped: %s", self.interface, exc)
                return
            if frame is not None:
                events: list[Event] = []
                handle(frame, anc, events)
                # Drain what is already queued without blocking: one sink call per batch, not per frame.
                for _ in range(self.batch - 1):
                    try:
                        frame, anc, _flags, _addr = recvmsg(65536, _ANC_SPACE, socket.MSG_DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        break
                    handle(frame, anc, events)
                if events:
                    self._deliver(events)
            now = time.monotonic()
            if now >= next_stats:
                self._read_stats()
                next_stats = now + _STATS_EVERY_S

    def _handle(self, frame: bytes, anc: list[tuple[int, int, bytes]], events: list[Event]) -> None:
        ts = 0.0
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP and len(data) >= _TIMEVAL.size:
                sec, usec = _TIMEVAL.unpack_from(data)
                ts = sec + usec / 1e6
        self.counters.add("capture_frames")
        try:
            events.extend(parse_frame(frame, ts or time.time(), source="capture"))
        except MalformedPacket:
            self.counters.add("capture_malformed")
        except Exception:  # a parser bug on hostile input must not end the capture
            self.counters.add("capture_malformed")
            if not self._parser_failed:
                self._parser_failed = True
                log.exception("frame parser failed on %s (logged once; frame dropped)", frame[:128].hex())

    def _deliver(self, events: list[Event]) -> None:
        try:
            self.sink(events)
        except Exception:
            self.counters.add("capture_sink_errors")
            if not self._sink_failed:
                self._sink_failed = True
                log.exception("capture sink failed (logged once; capture goes on)")

    def _read_stats(self) -> None:
        assert self._sock is not None
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS.size)
        except OSError:
            return
        _packets, drops = _STATS.unpack(raw)
        if drops:
            self.counters.add("capture_dropped", drops)
