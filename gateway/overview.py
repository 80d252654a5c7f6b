"""Read-only views across the store for the dashboard, the device page and the model page: counts, queries
over time, the domains a device queried, the model bundle's metadata. The web UI's pages and API share them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Integer, cast, func, select

import identifier
from gateway.alerts.presence import IDLE_TIMEOUT_S
from gateway.config import Config
from gateway.store.db import Store
from gateway.store.schema import Device, Query

IDENTIFY_WINDOW_S = 300  # an unidentified device younger than this is still being watched
FEDERATION_SETTING = "federation_last_round"  # JSON written by `iotgw federation join` after each round
# Written by the daemon: new devices it did not keep since it started, [devices] max being reached with none to
# make room (its devices_untracked counter). Above 0 it is most likely a host spoofing MACs or addresses.
UNTRACKED_SETTING = "devices_untracked"
PLOT_SUFFIXES = (".png", ".svg")


@dataclass
class Summary:
    devices: int
    online: int
    new: int
    identifying: int
    queries_24h: int
    blocked_24h: int
    untracked: int = 0  # new devices not kept for want of room since the daemon started (UNTRACKED_SETTING)


@dataclass
class Bucket:
    start: float
    total: int
    blocked: int


@dataclass
class DomainSeen:
    sld: str
    first_ts: float
    last_ts: float
    count: int
    blocked: int


@dataclass
class ModelStatus:
    directory: str
    version: str | None = None
    metrics: dict = field(default_factory=dict)
    training_data_sha256: str | None = None
    plots: list[str] = field(default_factory=list)
    error: str | None = None
    federation: dict | None = None


def summary(store: Store, now: float | None = None) -> Summary:
    now = time.time() if now is None else now
    with store.session() as s:
        devices = s.scalar(select(func.count()).select_from(Device)) or 0
        online = s.scalar(select(func.count()).where(Device.last_seen >= now - IDLE_TIMEOUT_S)) or 0
        new = s.scalar(select(func.count()).where(Device.status == "new")) or 0
        identifying = (
            s.scalar(
                select(func.count()).where(
                    Device.confidence.is_(None), Device.first_seen >= now - IDENTIFY_WINDOW_S
                )
            )
            or 0
        )
    blocked = func.sum((Query.verdict == "blocked").cast(Integer))
    with store.querylog_session() as s:
        total, blocked_n = s.execute(select(func.count(), blocked).where(Query.ts >= now - 86400)).one()
    untracked = int(store.get_setting(UNTRACKED_SETTING) or 0)
    return Summary(devices, online, new, identifying, int(total), int(blocked_n or 0), untracked)


def is_online(device: Device, now: float | None = None) -> bool:
    return device.last_seen >= (time.time() if now is None else now) - IDLE_TIMEOUT_S


def queries_over_time(
    store: Store, *, hours: int = 24, buckets: int = 24, now: float | None = None
) -> list[Bucket]:
    """Queries and blocked queries per bucket over the last ``hours``, oldest first, empty buckets kept."""
    now = time.time() if now is None else now
    hours = max(1, min(hours, 24 * 90))
    buckets = max(1, min(buckets, 240))
    since = now - hours * 3600
    width = hours * 3600 / buckets
    index = cast((Query.ts - since) / width, Integer)
    blocked = func.sum((Query.verdict == "blocked").cast(Integer))
    stmt = select(index, func.count(), blocked).where(Query.ts >= since, Query.ts < now).group_by(index)
    out = [Bucket(since + i * width, 0, 0) for i in range(buckets)]
    with store.querylog_session() as s:
        for i, n, b in s.execute(stmt):
            if 0 <= i < buckets:
                out[i].total, out[i].blocked = int(n), int(b or 0)
    return out


def domain_timeline(store: Store, mac: str, limit: int = 200) -> list[DomainSeen]:
    """The second-level domains a device queried, in the order it first asked for them."""
    blocked = func.sum((Query.verdict == "blocked").cast(Integer))
    first = func.min(Query.ts)
    stmt = (
        select(Query.sld, first, func.max(Query.ts), func.count(), blocked)
        .where(Query.mac == mac.lower())
        .group_by(Query.sld)
        .order_by(first)
        .limit(limit)
    )
    with store.querylog_session() as s:
        return [DomainSeen(sld, f, la, int(n), int(b or 0)) for sld, f, la, n, b in s.execute(stmt)]


def model_dir(cfg: Config) -> Path:
    """The bundle the daemon loads (``Config.model_dir``: configured, federated or shipped)."""
    return cfg.model_dir or Path(identifier.__file__).parent / "bundle"


def model_status(store: Store, cfg: Config) -> ModelStatus:
    """The bundle's version and metrics read from its ``bundle.json`` (without loading the weights), its
    evaluation plots, and the last federated round if one was recorded."""
    d = model_dir(cfg)
    status = ModelStatus(directory=str(d))
    try:
        meta = json.loads((d / "bundle.json").read_text(encoding="utf-8"))
        status.version = str(meta.get("version")) if meta.get("version") is not None else None
        status.metrics = meta.get("metrics") or {}
        status.training_data_sha256 = meta.get("training_data_sha256")
    except FileNotFoundError:
        status.error = "no model bundle installed"
    except (OSError, ValueError) as exc:
        status.error = f"cannot read {d / 'bundle.json'}: {exc}"
    if d.is_dir():
        status.plots = sorted(p.name for p in d.iterdir() if p.suffix in PLOT_SUFFIXES and p.is_file())
    raw = store.get_setting(FEDERATION_SETTING)
    if raw:
        try:
            status.federation = json.loads(raw)
        except ValueError:
            status.federation = {"error": "unreadable record"}
    return status
