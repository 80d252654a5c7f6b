"""A capture's events grouped per device MAC into observation windows, for identification and training.

Each device's window starts at its own first packet (not the capture's): that is what the daemon sees when
a new device joins, and what ``--window`` counts from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gateway.capture.frames import MalformedPacket, parse_frame
from gateway.capture.pcap import PcapError, read_frames
from gateway.observations import to_observation
from identifier.dataset import LabelledWindow, read_labels
from identifier.observation import (
    Observation,
)


@dataclass
class DeviceWindow:
    """One device's observations in one capture, from its first packet; ``first_ts`` is that packet's time."""

    mac: str
    first_ts: float
    observations: list[Observation] = field(default_factory=list)


@dataclass
class CaptureWindows:
    devices: dict[str, DeviceWindow]
    malformed: int  # frames dropped because their DNS/DHCP/mDNS payload did not decode
    error: str | None = None  # with ``keep_partial``: why the file was not read to its end (names the file)


def capture_windows(path: str | Path, window: float | None = None, keep_partial: bool = False) -> CaptureWindows:
    """Every device MAC that sent at least one packet in ``path``, with its observations.

    Only the first ``window`` seconds after each device's first packet are kept (all when None).
    Raises ``gateway.capture.pcap.PcapError`` naming the file when it cannot be read; with ``keep_partial``, a
    file corrupt part-way instead gives what was read before the damage and the error in ``error``, as replay
    does (training leaves it off: half a capture is not a labelled window).
    """
    seen: dict[str, list[Observation]] = {}
    malformed = 0
    frames = read_frames(path)
    while True:
        try:
            ts, frame = next(frames)
        except StopIteration:
            break
        except PcapError as exc:
            if not keep_partial:
                raise
            return CaptureWindows(_windows(seen, window), malformed, str(exc))
        try:
            events = parse_frame(frame, ts, others=True, source="replay")
        except MalformedPacket:
            malformed += 1
            continue
        for event in events:
            obs = to_observation(event)
            mac = getattr(event, "mac", None)
            if obs is None or not mac:
                continue
            seen.setdefault(mac, []).append(obs)
    return CaptureWindows(_windows(seen, window), malformed)


def _windows(seen: dict[str, list[Observation]], window: float | None) -> dict[str, DeviceWindow]:
    """Each device's observations in time order from its earliest, not its first in the file: records out of
    order (``mergecap -a``, two interfaces in one pcapng) gave a window that started late and decisions made
    a negative number of seconds after the device's first packet."""
    devices: dict[str, DeviceWindow] = {}
    for mac, observations in seen.items():
        observations.sort(key=lambda obs: obs.ts)  # stable: equal times keep the file's order
        first_ts = observations[0].ts
        kept = observations if window is None else [obs for obs in observations if obs.ts - first_ts <= window]
        devices[mac] = DeviceWindow(mac, first_ts, kept)
    return devices


def labelled_captures(root: str | Path, window: float = 60.0) -> list[LabelledWindow]:
    """The iot-sentinel captures under ``root`` (``labels.csv`` + ``captures/<folder>/*.pcap``) as labelled
    windows of the device's own MAC only: the WeMo captures also carry the setup phone's traffic."""
    root = Path(root)
    labels = read_labels(root / "labels.csv")
    out: list[LabelledWindow] = []
    for folder, label in sorted(labels.items()):
        device_dir = root / "captures" / folder
        mac = (device_dir / "_iotdevice-mac.txt").read_text(encoding="utf-8").strip().lower()
        for pcap in sorted(device_dir.glob("*.pcap")):
            dev = capture_windows(pcap, window).devices.get(mac)
            if dev is None:
                continue
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
