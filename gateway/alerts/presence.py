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
