"""A capture's events grouped per device MAC into observation windows, for identification and training.

Each device's window starts at its own first packet (not the capture's): that is what the daemon sees when
a new device joins, and what ``--window`` counts from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from gateway.capture.frames import DnsStreams, MalformedPacket, SplitDnsMessage, parse_frame, sender
from gateway.capture.pcap import PcapError, Skipped, read_frames
from gateway.observations import to_observation
from identifier.dataset import DataError, LabelledWindow, read_labels
from identifier.observation import (
    Observation,
)


@dataclass
class DeviceWindow:
    """One device's observations in one capture, from its first packet; ``first_ts`` is that packet's time,
    whether or not that packet gave an observation (a DNS answer, a malformed frame)."""

    mac: str
    first_ts: float
    observations: list[Observation] = field(default_factory=list)


@dataclass
class CaptureWindows:
    devices: dict[str, DeviceWindow]
    malformed: int  # frames dropped because their DNS/DHCP/mDNS payload did not decode
    error: str | None = None  # with ``keep_partial``: why the file was not read to its end (names the file)
    skipped: Skipped = field(default_factory=Skipped)  # packets not read: cooked ones no device's frame, and others


def capture_windows(path: str | Path, window: float | None = None, keep_partial: bool = False) -> CaptureWindows:
    """Every device MAC that sent at least one packet in ``path``, with its observations (maybe none).

    A device is every unicast Ethernet source, and its window starts at its first frame, even one that gives
    no observation or does not decode. Only the first ``window`` seconds of each device's window are kept
    (all when None).
    Raises ``gateway.capture.pcap.PcapError`` naming the file when it cannot be read; with ``keep_partial``, a
    file corrupt part-way instead gives what was read before the damage and the error in ``error``, as replay
    does (training leaves it off: half a capture is not a labelled window).
    """
    seen: dict[str, list[Observation]] = {}
    first: dict[str, float] = {}  # each unicast source MAC's earliest frame, read before the frame is parsed
    malformed = 0
    skipped = Skipped()
    streams = DnsStreams()
    frames = read_frames(path, skipped)
    while True:
        try:
            ts, frame = next(frames)
        except StopIteration:
            break
        except PcapError as exc:
            if not keep_partial:
                raise
            streams.close()
            skipped.split_dns += streams.given_up
            return CaptureWindows(_windows(seen, first, window), malformed, str(exc), skipped)
        # the sender is present from this frame on even when it says nothing the parser reports (a DNS answer,
        # a BOOTREPLY, a nameless mDNS packet) or says it badly, as the daemon's ``Senders`` tells it; the
        # earliest frame rather than the first in the file, since a capture may be out of time order
        src = sender(frame)
        if src is not None:
            first[src] = min(first.get(src, ts), ts)
        try:
            events = parse_frame(frame, ts, others=True, source="replay", streams=streams)
        except SplitDnsMessage:
            skipped.split_dns += 1
            continue
        except MalformedPacket:
            malformed += 1
            continue
        for event in events:
            obs = to_observation(event)
            mac = getattr(event, "mac", None)
            if obs is None or not mac:
                continue
            seen.setdefault(mac, []).append(obs)
    streams.close()
    skipped.split_dns += streams.given_up
    return CaptureWindows(_windows(seen, first, window), malformed, skipped=skipped)


def _windows(
    seen: dict[str, list[Observation]], first: dict[str, float], window: float | None
) -> dict[str, DeviceWindow]:
    """Each device's observations in time order from its earliest frame, not its first in the file: records out
    of order (``mergecap -a``, two interfaces in one pcapng) gave a window that started late and decisions made
    a negative number of seconds after the device's first packet. A relayed DHCP message credits a client that
    may send no frame of its own here: its window starts at its first observation."""
    devices: list[DeviceWindow] = []
    for mac in [*first, *(mac for mac in seen if mac not in first)]:
        observations = seen.get(mac, [])
        observations.sort(key=lambda obs: obs.ts)  # stable: equal times keep the file's order
        first_ts = min(first.get(mac, math.inf), observations[0].ts if observations else math.inf)
        kept = observations if window is None else [obs for obs in observations if obs.ts - first_ts <= window]
        devices.append(DeviceWindow(mac, first_ts, kept))
    devices.sort(key=lambda dev: dev.first_ts)  # in the order they first sent, however the file is ordered
    return {dev.mac: dev for dev in devices}


def labelled_captures(root: str | Path, window: float = 60.0) -> list[LabelledWindow]:
    """The iot-sentinel captures under ``root`` (``labels.csv`` + ``captures/<folder>/*.pcap``) as labelled
    windows of the device's own MAC only: the WeMo captures also carry the setup phone's traffic.

    ``identifier.dataset.DataError`` naming the file (and ``labels.csv``'s line) for anything that would make
    training learn less than the labels say: no labelled folder, a folder without its ``_iotdevice-mac.txt`` or
    without any capture, a capture that cannot be read to its end, or one in which the device sent nothing."""
    root = Path(root)
    labels_csv = root / "labels.csv"
    labels = read_labels(labels_csv)
    if not labels:
        raise DataError(f"{labels_csv}: no labelled folder (a header and no rows)")
    out: list[LabelledWindow] = []
    for folder, label in sorted(labels.items()):
        where = f"{labels_csv}:{label.line}: folder {folder!r}"
        device_dir = root / "captures" / folder
        mac_file = device_dir / "_iotdevice-mac.txt"
        try:
            mac = mac_file.read_text(encoding="utf-8").strip().lower()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: {mac_file} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
        pcaps = sorted(device_dir.glob("*.pcap"))
        if not pcaps:
            raise DataError(f"{where}: {device_dir} holds no .pcap capture")
        for pcap in pcaps:
            try:
                dev = capture_windows(pcap, window).devices.get(mac)
            except (PcapError, OSError) as exc:  # half a capture is not a labelled window; PcapError names it
                raise DataError(f"{where}: {exc if str(pcap) in str(exc) else f'{pcap}: {exc}'}") from None
            if dev is None:
                raise DataError(f"{where}: {pcap} has no frame from the device's MAC {mac[:40]!r} ({mac_file})")
            out.append(
                LabelledWindow(
                    dev.observations,
                    mac,
                    dev.first_ts,
                    label.manufacturer,
                    label.device_type,
                    label.category,
                    f"{folder}/{pcap.name}",
                    "iot-sentinel",
                    timed=True,
                )
            )
    return out
