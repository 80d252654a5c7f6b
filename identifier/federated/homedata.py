"""A home's training data: its confirmed devices' observation windows, one JSON object per line.

The gateway writes this file from its store (``iotgw federation join`` exports the devices the owner
confirmed or corrected); it never leaves the home. Each line is one device::

    {"mac": "aa:bb:..", "first_ts": 1700000000.0, "manufacturer": "TP-Link", "device_type": "TP-LinkPlugHS110",
     "category": "plug", "source": "owner", "observations": [{"kind": "dns", "t": 1700000000.3, ...}, ...]}

with observations in ``identifier.observation``'s JSON form (absolute times) and ``source`` ``owner`` (a
confirmation or correction) or ``pseudo`` (an unconfirmed confident identification, only when the owner
turned pseudo-labels on). For tests and the simulation, homes are cut from the shared data the way real homes
differ: a Dirichlet split of device types (or vendors) over homes, with some devices of each held out.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from identifier.atomicfile import write_whole
from identifier.dataset import LabelledWindow
from identifier.observation import from_json, to_json

SOURCES = ("owner", "pseudo")


def to_line(window: LabelledWindow, source: str = "owner") -> str:
    return json.dumps(
        {
            "mac": window.mac,
            "first_ts": window.first_ts,
            "manufacturer": window.manufacturer,
            "device_type": window.device_type,
            "category": window.category,
            "source": source,
            "observations": [to_json(o) for o in window.observations],
        },
        separators=(",", ":"),
    )


def save(windows: list[LabelledWindow], path: Path, source: str = "owner") -> None:
    write_whole(path, "".join(to_line(w, source) + "\n" for w in windows).encode("utf-8"))


def load(path: Path) -> list[LabelledWindow]:
    """A home's windows; a bad line raises ``ValueError`` naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not readable as a home's windows: {exc}") from exc
    windows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            source = row.get("source", "owner")
            if source not in SOURCES:
                raise ValueError(f"source {source!r} is not one of {SOURCES}")
            observations = sorted((from_json(o) for o in row["observations"]), key=lambda o: o.ts)
            windows.append(
                LabelledWindow(
                    observations,
                    str(row["mac"]),
                    float(row["first_ts"]),
                    row.get("manufacturer") or None,
                    row.get("device_type") or None,
                    row.get("category") or None,
                    group=f"{source}:{row['mac']}",
                    source=source,
                    timed=True,
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{line_no}: not a device window: {exc}") from exc
    return windows


def _kind(window: LabelledWindow) -> str | None:
    """What makes homes differ: the device type of a capture, the vendor of a name set."""
    return window.device_type if window.timed else window.manufacturer


def split_homes(
    windows: list[LabelledWindow],
    n_homes: int,
    *,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[list[LabelledWindow]], list[LabelledWindow]]:
    """``n_homes`` homes and one held-out test set.

    Windows are grouped by kind (device type, or vendor for name sets); of each kind with at least two
    windows, ``test_fraction`` (at least one) is held out, and every other window goes to a home drawn from
    that kind's Dirichlet(alpha) distribution over homes, so a home has a few kinds, unevenly. Every home
    gets at least one window.
    """
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[LabelledWindow]] = defaultdict(list)
    for w in windows:
        kind = _kind(w)
        if kind:
            by_kind[kind].append(w)
    homes: list[list[LabelledWindow]] = [[] for _ in range(n_homes)]
    test: list[LabelledWindow] = []
    for kind in sorted(by_kind):
        members = sorted(by_kind[kind], key=lambda w: w.group)
        if len(members) < 2:
            continue
        order = rng.permutation(len(members))
        n_test = max(1, int(round(len(members) * test_fraction)))
        test += [members[i] for i in order[:n_test]]
        share = rng.dirichlet([alpha] * n_homes)
        for i in order[n_test:]:
            homes[int(rng.choice(n_homes, p=share))].append(members[i])
    for home in homes:  # no empty homes: take a window from the fullest home
        if not home:
            fullest = max(homes, key=len)
            home.append(fullest.pop())
    return homes, test
