"""The dashboard's queries-over-time chart as numbers for an inline SVG: rendered on the server, so the page
needs no chart library and no script."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gateway.overview import Bucket

WIDTH, HEIGHT = 720, 160


@dataclass
class Bar:
    x: float
    width: float
    y: float
    height: float
    blocked_y: float
    blocked_height: float
    title: str


@dataclass
class Chart:
    width: int
    height: int
    bars: list[Bar]
    peak: int
    first_label: str
    last_label: str


def bars(buckets: list[Bucket]) -> Chart:
    peak = max((b.total for b in buckets), default=0)
    scale = (HEIGHT - 4) / peak if peak else 0.0
    step = WIDTH / max(1, len(buckets))
    out = []
    for i, b in enumerate(buckets):
        h, bh = b.total * scale, b.blocked * scale
        label = time.strftime("%H:%M", time.localtime(b.start))
        out.append(
            Bar(
                x=i * step + 1,
                width=max(1.0, step - 2),
                y=HEIGHT - h,
                height=h,
                blocked_y=HEIGHT - bh,
                blocked_height=bh,
                title=f"{label}: {b.total} queries, {b.blocked} blocked",
            )
        )
    first = time.strftime("%H:%M", time.localtime(buckets[0].start)) if buckets else ""
    return Chart(WIDTH, HEIGHT, out, peak, first, "now")
