"""Labelled observation windows: what training and evaluation take.

The identifier never reads pcaps (the gateway turns captures into observations); it reads label tables and the
supplychain-domains CSV, which are plain text, and takes the capture windows it is handed.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from identifier.domains import sld
from identifier.observation import DnsObservation, Observation

UNKNOWN = (
    "Unknown"  # the domains list's placeholder for an unlabelled vendor or type: never a training target
)


@dataclass(eq=False)  # identity semantics: a window is one capture, and training caches its vectors by it
class LabelledWindow:
    """One device's observations with labels; ``group`` keeps a capture (or device) on one side of a split."""

    observations: list[Observation]
    mac: str
    first_ts: float
    manufacturer: str | None
    device_type: str | None
    category: str | None
    group: str
    source: str  # "iot-sentinel" or the domains list's source_dataset
    timed: bool  # False for whole-capture name sets, which carry no timing

    def slds(self, within: float = float("inf")) -> set[str]:
        """The registrable domains (SLDs) the device queried within ``within`` seconds of its first packet."""
        dns = (o for o in self.observations if isinstance(o, DnsObservation))
        return {sld(o.name) for o in dns if o.ts - self.first_ts <= within}


@dataclass(frozen=True)
class Label:
    device_type: str
    manufacturer: str
    category: str


def read_labels(path: str | Path) -> dict[str, Label]:
    """``labels.csv``: capture folder -> labels."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {
            r["folder"]: Label(r["device_type"], r["manufacturer"], r["category"]) for r in csv.DictReader(fh)
        }


def domain_windows(
    path: str | Path, categories: set[str], exclude_sources: tuple[str, ...] = ()
) -> list[LabelledWindow]:
    """One DNS-only window per device of ``device_domains.csv``: its names as queries at t = 0, no MAC.

    The list's ``type`` column is the device type; it also becomes the category when its lower-case form is
    one
    of ``categories`` (Camera -> camera), so both data sets teach the category head.
    """
    names: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["source_dataset"] in exclude_sources:
                continue
            key = (row["device_folder"], row["source_dataset"], row["vendor"], row["type"])
            names[key].append(row["domain"].strip().rstrip(".").lower())
    out = []
    for (folder, source, vendor, dtype), domains in sorted(names.items()):
        obs: list[Observation] = [DnsObservation(0.0, d) for d in sorted(set(domains)) if d]
        out.append(
            LabelledWindow(
                obs,
                "",
                0.0,
                None if vendor == UNKNOWN else vendor,
                None if dtype == UNKNOWN else dtype,
                dtype.lower() if dtype.lower() in categories else None,
                f"domains:{folder}",
                source,
                timed=False,
            )
        )
    return out
