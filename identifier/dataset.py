"""Labelled observation windows: what training and evaluation take.

The identifier never reads pcaps (the gateway turns captures into observations); it reads label tables and the
supplychain-domains CSV, which are plain text, and takes the capture windows it is handed.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
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


class DataError(ValueError):
    """Training data that cannot be read as labelled: the message names the file, and the line when there is one.
    Training stops before anything is trained or written: a bundle records the SHA-256 of the data it learned,
    so it must not have quietly learned less, or other labels, than the files say."""


@dataclass(frozen=True)
class Label:
    device_type: str
    manufacturer: str
    category: str
    line: int = field(default=0, compare=False)  # of labels.csv, for errors about the folder it names


LABEL_COLUMNS = ("folder", "device_type", "manufacturer", "category")
DOMAIN_COLUMNS = ("device_folder", "source_dataset", "vendor", "type", "domain")
# The domain list's types that are kinds the captures' categories already name in their own word (its "Brewer" is
# what labels.csv calls an iKettle2: "appliance"). Every other listed type is its own category ("Speaker" ->
# "speaker"), so a device named by its type never shows another kind's category. "Huawei" is the list's type of a
# Huawei speaker and a Huawei plug: a maker, not a kind, so it names no category.
LISTED_TYPE_CATEGORY: dict[str, str | None] = {
    **dict.fromkeys(
        ("brewer", "coffee", "kettle", "cooker", "fridge", "dryer", "washer", "microwave", "cleaner", "humidifier"),
        "appliance",
    ),
    "strip": "plug",
    "gateway": "hub",
    "bulb": "light",
    "huawei": None,
}


def _csv_rows(path: str | Path, columns: tuple[str, ...]):
    """``(line, row)`` per data row of a UTF-8 CSV file that has ``columns`` (others may follow); DataError naming
    the file and line for a file that is not UTF-8, a header without them, or a row with too few or too many
    fields. A byte order mark (how Excel saves "CSV UTF-8") is no part of the first column's name."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}:1: the header has no {', '.join(missing)} column (want {', '.join(columns)})")
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise DataError(f"{path}:{reader.line_num}: {len(reader.fieldnames)} fields wanted, as in the header")
        yield reader.line_num, row


def read_labels(path: str | Path) -> dict[str, Label]:
    """``labels.csv``: capture folder -> labels. DataError naming file and line for a row that is not one: a
    field left empty, a folder that is not a plain name under ``captures/``, a folder listed twice (the second
    row silently relabelled the first's captures)."""
    out: dict[str, Label] = {}
    for line, row in _csv_rows(path, LABEL_COLUMNS):
        empty = [c for c in LABEL_COLUMNS if not row[c].strip()]
        if empty:
            raise DataError(f"{path}:{line}: {', '.join(empty)} is empty")
        folder = row["folder"]
        if folder in (".", "..") or Path(folder).name != folder or "\\" in folder:
            raise DataError(f"{path}:{line}: folder {folder!r} is not a folder name under captures/")
        if folder in out:
            raise DataError(f"{path}:{line}: folder {folder!r} is already labelled on line {out[folder].line}")
        out[folder] = Label(row["device_type"], row["manufacturer"], row["category"], line)
    return out


def listed_category(dtype: str) -> str | None:
    """The category of a device type of the domain list (``LISTED_TYPE_CATEGORY``); None for its "Unknown"."""
    lower = dtype.lower()
    return None if dtype == UNKNOWN else LISTED_TYPE_CATEGORY.get(lower, lower)


def domain_windows(
    path: str | Path, categories: set[str], exclude_sources: tuple[str, ...] = ()
) -> list[LabelledWindow]:
    """One DNS-only window per device of ``device_domains.csv``: its names as queries at t = 0, no MAC.

    The list's ``type`` column is the device type; it also becomes the category when its lower-case form is one of
    ``categories`` (Camera -> camera), so both data sets teach the category head. (Mapping the other types into
    those categories too, Brewer -> appliance, cost DNS-only device type 2 points on one seed of cross-validation;
    the category a listed type is shown with is ``listed_category``'s, through ``train.type_info``.)
    """
    names: dict[tuple[str, str, str, str], list[str]] = defaultdict(list)
    for _, row in _csv_rows(path, DOMAIN_COLUMNS):
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
