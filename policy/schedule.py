"""Weekly schedules in a time zone, in AdGuard Home's per-client schedule format and semantics.

A schedule has a time zone and, per weekday (``sun``..``sat``), at most one range ``{"start": ms, "end": ms}``
measured from local midnight: active when ``start <= time of day < end``; ``end`` may be 24 h; a day without a
range is inactive all day. A range cannot cross midnight: "21:00-07:00" is ``21h-24h`` on one day and ``0-7h``
on the next, as in AdGuard Home. Time of day is wall-clock time, so "21:00" means 21:00 on DST days too.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
DAY_MS = 24 * 3600 * 1000
# Every time zone changes its offset on a quarter hour (UTC): a cached answer never outlives one.
_RECHECK_S = 900


def parse_clock(text: str) -> int:
    """``"21:30"`` or ``"24:00"`` -> milliseconds from midnight."""
    try:
        hours, minutes = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"{text!r} is not HH:MM") from None
    if not (0 <= hours <= 24 and 0 <= minutes < 60) or (hours == 24 and minutes):
        raise ValueError(f"{text!r} is not a time of day")
    return (hours * 60 + minutes) * 60_000


def format_clock(ms: int) -> str:
    """Milliseconds from midnight -> ``"HH:MM"``, the inverse of ``parse_clock``."""
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}"


def _range_error(day: str, start: int, end: int) -> str:
    """Why a day's range is refused, in the times the owner typed: "mon: a range needs 0 <= start < end <= 24h,
    got 79200000-25200000 ms" was all the web form said to a bedtime of 22:00-07:00."""
    if 0 <= end < start <= DAY_MS:
        span = f"{format_clock(start)}-{format_clock(end)}"
        return (f"{day}: {span} crosses midnight, and a day's range ends by 24:00: split it into "
                f"{format_clock(start)}-24:00 and 00:00-{format_clock(end)} of the next day (a schedule holds one "
                "range a day, so a bedtime every night takes two schedules)")
    if 0 <= start == end <= DAY_MS:
        return f"{day}: {format_clock(start)}-{format_clock(end)} is empty: the end comes after the start"
    return f"{day}: a range needs 0 <= start < end <= 24h, got {start}-{end} ms"


@dataclass
class Schedule:
    """When a rule applies. ``days`` maps ``mon`` .. ``sun`` to ``(start_ms, end_ms)``."""

    time_zone: str = "UTC"
    days: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self._zone = ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {self.time_zone!r}") from exc
        for day, (start, end) in self.days.items():
            if day not in DAYS:
                raise ValueError(f"unknown weekday {day!r} (use {', '.join(DAYS)})")
            if not 0 <= start < end <= DAY_MS:
                raise ValueError(_range_error(day, start, end))
        self._until = float("-inf")
        self._from = float("inf")
        self._active = False

    def active(self, now: float) -> bool:
        """Whether ``now`` (Unix seconds) falls in the schedule; cached until the next possible change."""
        if self._from <= now < self._until:
            return self._active
        local = dt.datetime.fromtimestamp(now, self._zone)
        us = ((local.hour * 60 + local.minute) * 60 + local.second) * 1_000_000 + local.microsecond
        start, end = self.days.get(DAYS[local.weekday()], (0, 0))
        self._active = start * 1000 <= us < end * 1000
        if self._active:
            edge = end
        elif us < start * 1000:
            edge = start
        else:
            edge = DAY_MS
        self._from = now
        self._until = min(now + (edge * 1000 - us) / 1e6, (now // _RECHECK_S + 1) * _RECHECK_S)
        return self._active

    def to_dict(self) -> dict:
        """AdGuard Home's JSON form: ``{"time_zone": ..., "mon": {"start": ms, "end": ms}, ...}``."""
        out: dict = {"time_zone": self.time_zone}
        for day in DAYS:
            if day in self.days:
                out[day] = {"start": self.days[day][0], "end": self.days[day][1]}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Schedule:
        unknown = set(data) - {"time_zone", *DAYS}
        if unknown:
            raise ValueError(f"unknown schedule keys: {', '.join(sorted(unknown))}")
        days = {day: (int(data[day]["start"]), int(data[day]["end"])) for day in DAYS if day in data}
        return cls(data.get("time_zone", "UTC"), days)
