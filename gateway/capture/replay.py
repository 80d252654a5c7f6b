"""Replaying capture files through the live path: the same ``parse_frame`` and the same sink as the sniffer.

Used by ``iotgw replay`` (training, ``iotgw identify`` and ``iotgw evaluate`` read captures through
``gateway.capture.windows`` instead); ``realtime`` keeps the recorded gaps between frames, so streaming
identification sees a device's first seconds as they happened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.capture.frames import DnsStreams, MalformedPacket, Senders, SplitDnsMessage, parse_frame
from gateway.capture.pcap import PcapError, Skipped, read_frames
from gateway.capture.sniffer import Sink
from gateway.events import Counters, Event

log = logging.getLogger(__name__)

_BATCH = 512  # frames per sink call when not replaying in real time
# Senders whose earliest time the first pass keeps: a capture of a MAC flood must not hold a float per spoofed
# source. A sender past the bound is reported at its first frame in file order, as before the first pass.
_EARLIEST_MAX = 65536


@dataclass
class Timeline:
    """What a first pass over the files tells before anything is replayed: each sender's earliest frame time
    (raw source MAC -> seconds) and whether every frame, across the files in the order given, is in time order."""

    earliest: dict[bytes, float] = field(default_factory=dict)
    in_order: bool = True


def timeline(paths: Iterable[str | Path]) -> Timeline:
    """Read ``paths`` once for their frames' times and senders. A file that cannot be read gives what it holds
    before the damage; the replay itself reports it by name. A pipe (``<(zcat x.pcap.gz)``) is not read here:
    it gives its frames once, to the replay, which takes them to be in time order, as a capture tool writes
    them, and each sender first seen at its first frame there. Given with other captures, a pipe makes the
    frames out of time order: whether its frames come before or after theirs is not known until they are read."""
    paths = list(paths)
    out = Timeline()
    earliest = out.earliest
    latest = None
    for path in paths:
        if not Path(path).is_file():  # a pipe, or no file at all (the replay names it)
            if len(paths) > 1 and Path(path).exists() and not Path(path).is_dir():
                out.in_order = False
            continue
        try:
            for ts, frame in read_frames(path):
                src = frame[6:12]
                if src in earliest:
                    if ts < earliest[src]:
                        earliest[src] = ts
                elif len(earliest) < _EARLIEST_MAX:
                    earliest[src] = ts
                if latest is not None and ts < latest:
                    out.in_order = False
                latest = ts if latest is None else max(latest, ts)
        except PcapError:
            pass
    return out


@dataclass
class ReplayResult:
    """What a replay did; ``errors`` holds one message per file that could not be read to its end."""

    files: int = 0
    frames: int = 0
    events: int = 0
    malformed: int = 0
    skipped: Skipped = field(default_factory=Skipped)  # cooked-capture packets that are no device's frame, and others
    errors: list[str] = field(default_factory=list)


def replay(
    paths: Iterable[str | Path],
    sink: Sink,
    realtime: bool = False,
    counters: Counters | None = None,
    order: Timeline | None = None,
    stop: threading.Event | None = None,
) -> ReplayResult:
    """Feed every frame of every file in ``paths`` through ``parse_frame`` (``others=True``) into ``sink``.

    Files are replayed one after another; with ``realtime`` each file's frames are delivered at their recorded
    spacing (its first frame at once). A file that cannot be read, or is corrupt part-way, is logged and
    listed in ``errors`` naming it, the events read from it before the damage are kept, and the next file
    goes on.
    Malformed frames are counted (``replay_malformed``) and dropped; an exception in ``sink`` propagates.
    Packets of a Linux cooked capture that are no LAN device's frame (sent by the capturing host, from loopback
    or a tunnel), and DNS over TCP segments holding part of a message that could not be reassembled
    (``gateway.capture.frames.DnsStreams``, one for the whole replay), are counted in ``skipped`` and
    ``replay_skipped``.
    As in live capture, each unicast source's first frame (in the whole replay) also gives a ``DeviceSeen``
    ahead of its own events, whether that frame says anything or decodes. Frames are not sorted (merged captures,
    or files given out of date order, may be out of time order), so that ``DeviceSeen`` carries the sender's
    earliest time in ``order`` (read here with ``timeline`` when not given): the device is new, and its
    identification window starts, at its earliest frame, as ``iotgw identify`` counts it.
    ``stop`` set (Ctrl-C) ends the replay at the next frame, also in the middle of a real-time wait.
    """
    counters = counters if counters is not None else Counters()
    paths = list(paths)  # read twice (but a pipe) when ``order`` is not given
    order = order if order is not None else timeline(paths)
    result = ReplayResult()
    senders = Senders()
    streams = DnsStreams()  # for all the files: a connection may go on in the next file of a rotated capture
    stop = stop if stop is not None else threading.Event()
    for path in paths:
        if stop.is_set():
            break
        result.files += 1
        before = result.skipped.total
        try:
            _replay_file(Path(path), sink, realtime, counters, result, senders, streams, order.earliest, stop)
        except PcapError as exc:  # the message names the file
            log.error("replay: %s", exc)
            result.errors.append(str(exc))
            counters.add("replay_errors")
        finally:
            result.skipped.split_dns += streams.given_up
            streams.given_up = 0
            if result.skipped.total > before:
                counters.add("replay_skipped", result.skipped.total - before)
    streams.close()  # messages still partial when the captures end
    if streams.given_up:
        result.skipped.split_dns += streams.given_up
        counters.add("replay_skipped", streams.given_up)
    return result


def _replay_file(path: Path, sink: Sink, realtime: bool, counters: Counters, result: ReplayResult,
                 senders: Senders, streams: DnsStreams, earliest: dict[bytes, float], stop: threading.Event) -> None:
    events: list[Event] = []
    known = senders.known
    pending = 0
    start_wall = first_ts = None
    try:
        for ts, frame in read_frames(path, result.skipped):
            if stop.is_set():
                break
            result.frames += 1
            counters.add("replay_frames")
            if realtime:
                if first_ts is None:
                    first_ts, start_wall = ts, time.monotonic()
                delay = (ts - first_ts) - (time.monotonic() - start_wall)
                if delay > 0:
                    if events:  # deliver what is due before waiting for the next frame
                        _flush(events, sink, result)
                        events, pending = [], 0
                    if stop.wait(delay):
                        break
            if frame[6:12] not in known:
                events += senders.first(frame, earliest.get(frame[6:12], ts))
            try:
                events.extend(parse_frame(frame, ts, others=True, source="replay", streams=streams))
            except SplitDnsMessage:
                result.skipped.split_dns += 1
            except MalformedPacket:
                result.malformed += 1
                counters.add("replay_malformed")
            pending += 1
            if pending >= _BATCH:
                _flush(events, sink, result)
                events, pending = [], 0
    except PcapError:
        if events:  # frames read before a corrupt record still count
            _flush(events, sink, result)
        raise
    if events:
        _flush(events, sink, result)


def _flush(events: list[Event], sink: Sink, result: ReplayResult) -> None:
    result.events += len(events)
    sink(events)
