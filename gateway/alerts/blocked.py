"""Blocked queries summarised per device and interval: one ``blocked_summary`` alert per device per interval
(with the count and the most blocked names), never one per query. Pure: the caller feeds queries and times."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gateway.events import Alert, DnsQuery

MAX_NAMES = (
    1000  # distinct names counted per device and interval: bounds memory under a flood of random names
)


@dataclass
class _Window:
    since: float
    until: float
    count: int = 0
    names: Counter = field(default_factory=Counter)


class BlockedSummariser:
    def __init__(self, interval_s: float = 300.0, top: int = 5) -> None:
        self.interval_s = interval_s
        self.top = top
        self._windows: dict[str, _Window] = {}

    def add(self, query: DnsQuery) -> None:
        """Count ``query`` if it was blocked and its device is known; anything else is ignored."""
        if query.verdict != "blocked" or not query.mac:
            return
        w = self._windows.get(query.mac)
        if w is None:
            w = self._windows[query.mac] = _Window(since=query.ts, until=query.ts)
        w.count += 1
        w.until = max(w.until, query.ts)
        if query.qname in w.names or len(w.names) < MAX_NAMES:
            w.names[query.qname] += 1

    def shift(self, delta: float) -> None:
        """The wall clock jumped by ``delta`` seconds: windows keep their length in the new clock."""
        for w in self._windows.values():
            w.since += delta
            w.until += delta

    def flush(self, now: float, *, all_windows: bool = False) -> list[Alert]:
        """Summaries of the windows ``interval_s`` old (all of them when ``all_windows``: shutdown)."""
        due = [mac for mac, w in self._windows.items() if all_windows or now - w.since >= self.interval_s]
        alerts = []
        for mac in due:
            w = self._windows.pop(mac)
            top = [{"name": name, "count": n} for name, n in w.names.most_common(self.top)]
            alerts.append(
                Alert(
                    "blocked_summary",
                    now,
                    mac,
                    {
                        "count": w.count,
                        "since": w.since,
                        "until": w.until,
                        "interval_s": self.interval_s,
                        "top": top,
                    },
                )
            )
        return alerts
