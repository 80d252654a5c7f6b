"""Weekly schedules in a time zone, in AdGuard Home's per-client schedule format.

A schedule has a time zone and, per weekday (``sun``..``sat``), at most one range ``{"start": ms, "end": ms}``
measured from local midnight; a day without a range adds nothing. ``start < end`` is a range within the day:
active when ``start <= time of day < end``, and ``end`` may be 24 h. ``end < start`` runs past midnight into the
next day: mon ``22:00-07:00`` is active from Monday 22:00 to Tuesday 07:00 (and sun's runs into Monday), so a
bedtime every night is one range a night. AdGuard Home refuses ``start > end``; this is ours, in its JSON shape.
``22:00-00:00`` ends at midnight, as ``22:00-24:00`` does. ``start == end`` is refused as empty, not read as 24
hours, which a slip of the finger would also give (a whole day is ``00:00-24:00``); ``start`` is before 24:00. A
day's range may overlap the previous night's: the schedule is active while either is. Times are wall-clock, so "22:00"
means 22:00 on DST days too, and a night across a DST change is an hour shorter or longer.
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


def format_range(start: int, end: int) -> str:
    """A day's range as the owner reads it: ``"22:00-07:00 (next day)"`` for one that runs past midnight."""
    span = f"{format_clock(start)}-{format_clock(end)}"
    return f"{span} (next day)" if 0 < end < start else span


def _range_error(day: str, start: int, end: int) -> str | None:
    """Why a day's range is refused, in the times the owner typed where they are times of day, or None."""
    if not (0 <= start <= DAY_MS and 0 <= end <= DAY_MS):
        return f"{day}: a range's start and end are 0 to 24h (86400000 ms), got {start}-{end} ms"
    span = f"{format_clock(start)}-{format_clock(end)}"
    if start == end:
        # AdGuard Home refuses it too; read as 24 hours, a slip such as 07:00-07:00 would block a whole day.
        return f"{day}: {span} is empty: give an end other than the start (the whole day is 00:00-24:00)"
    if start == DAY_MS:
        return f"{day}: {span} starts at 24:00, which is the next day's 00:00: give it on that day"
    return None


@dataclass
class Schedule:
    """When a rule applies. ``days`` maps ``mon`` .. ``sun`` to ``(start_ms, end_ms)``; an end before the start is
    on the next day."""

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
            problem = _range_error(day, start, end)
            if problem:
                raise ValueError(problem)
        self._until = float("-inf")
        self._from = float("inf")
        self._active = False

    def active(self, now: float) -> bool:
        """Whether ``now`` (Unix seconds) falls in the schedule; cached until the next possible change."""
        if self._from <= now < self._until:
            return self._active
        local = dt.datetime.fromtimestamp(now, self._zone)
        us = ((local.hour * 60 + local.minute) * 60 + local.second) * 1_000_000 + local.microsecond
        today = local.weekday()
        # Today's own range, and the part of the previous day's range that ran past midnight: 0 to its end.
        spans: list[tuple[int, int]] = []
        start, end = self.days.get(DAYS[today], (0, 0))
        if start != end:
            spans.append((start, end if start < end else DAY_MS))
        start, end = self.days.get(DAYS[today - 1], (0, 0))  # DAYS[-1] is sun, the night before mon
        if end < start:
            spans.append((0, end))
        self._active = any(s * 1000 <= us < e * 1000 for s, e in spans)
        # The answer can change only at a span's edge; at midnight the day (and so the spans) changes.
        edge = min((ms for span in spans for ms in span if ms * 1000 > us), default=DAY_MS)
        self._from = now
        self._until = min(now + (edge * 1000 - us) / 1e6, (now // _RECHECK_S + 1) * _RECHECK_S)
        return self._active

    def describe(self) -> str:
        """``"mon 22:00-07:00 (next day), sat 09:00-12:00"``, in weekday order; ``"no times"`` without a day."""
        return ", ".join(f"{d} {format_range(*self.days[d])}" for d in DAYS if d in self.days) or "no times"

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
