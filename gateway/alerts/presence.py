"""Online/offline tracking with an idle timeout: a device is offline once nothing was seen from it for
``idle_timeout_s``, and online again with its next packet. Pure: the caller feeds times, sends alerts."""

from __future__ import annotations

from gateway.events import Alert

# Nothing seen for ten minutes is offline (the dashboard's "online" too): an idle plug queries DNS a few times an hour.
IDLE_TIMEOUT_S = 600.0


class Presence:
    def __init__(self, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._last: dict[str, float] = {}
        self._offline: dict[str, float] = {}  # mac -> when it was last seen before going offline

    def seed(self, mac: str, last_seen: float, now: float) -> None:
        """What the store remembers after a restart: no alert either way, just the starting state."""
        if now - last_seen > self.idle_timeout_s:
            self._offline[mac] = last_seen
        else:
            self._last[mac] = last_seen

    def seen(self, mac: str, ts: float) -> Alert | None:
        """A packet from ``mac``: ``device_online`` when it had gone offline, else nothing.

        A device never seen before gets no online alert: its ``new_device`` alert says more.
        """
        before = self._offline.pop(mac, None)
        if ts > self._last.get(mac, 0.0):
            self._last[mac] = ts
        if before is None:
            return None
        return Alert("device_online", ts, mac, {"offline_s": round(ts - before, 1)})

    def expire(self, now: float) -> list[Alert]:
        """``device_offline`` for every online device idle longer than the timeout."""
        gone = [mac for mac, ts in self._last.items() if now - ts > self.idle_timeout_s]
        alerts = []
        for mac in gone:
            last = self._last.pop(mac)
            self._offline[mac] = last
            alerts.append(
                Alert("device_offline", now, mac, {"last_seen": last, "idle_timeout_s": self.idle_timeout_s})
            )
        return alerts

    def shift(self, delta: float) -> None:
        """The wall clock jumped by ``delta`` seconds (NTP setting a Pi's clock after boot): move every time
        kept so that idleness is measured in the new clock, not as the size of the jump."""
        self._last = {mac: ts + delta for mac, ts in self._last.items()}
        self._offline = {mac: ts + delta for mac, ts in self._offline.items()}

    def is_online(self, mac: str) -> bool:
        return mac in self._last

    def forget(self, mac: str) -> None:
        self._last.pop(mac, None)
        self._offline.pop(mac, None)


class CapturePresence(Presence):
    """Presence on a replayed capture's clock, not the wall clock: the capture's frames are its only news of a
    device, so a device goes offline when the capture's time (its newest frame so far) passes its last frame by
    the idle timeout, stamped at that moment of the capture, and comes back with its next frame after it.
    The end of a replay is not news of any device: whoever was online stays so.

    ``expiring`` False (frames out of time order) takes no device offline at all: a gap in what was replayed
    so far may be filled by a frame still to come, and an offline alert cannot be taken back."""

    def __init__(self, idle_timeout_s: float = IDLE_TIMEOUT_S, *, expiring: bool = True) -> None:
        super().__init__(idle_timeout_s)
        self.expiring = expiring
        self._clock = float("-inf")  # the newest frame time so far

    def seen(self, mac: str, ts: float) -> Alert | None:
        """As ``Presence.seen``, except for a device offline since its frame at ``before`` (a device the store
        knew from an earlier run starts so): a frame up to ``before`` is history (the same capture replayed
        again), and one within the idle timeout after it shows the device never was offline: neither is a return.
        """
        before = self._offline.get(mac)
        if before is not None and ts <= before + self.idle_timeout_s:
            if ts > before:
                del self._offline[mac]
                self._last[mac] = ts
            return None
        return super().seen(mac, ts)

    def advance(self, ts: float) -> list[Alert]:
        """The capture's clock reached ``ts``: ``device_offline`` for every device idle past the timeout by then,
        each stamped when it became so."""
        if ts <= self._clock:
            return []
        self._clock = ts
        if not self.expiring:
            return []
        return [Alert("device_offline", alert.data["last_seen"] + self.idle_timeout_s, alert.mac, alert.data)
                for alert in self.expire(ts)]
