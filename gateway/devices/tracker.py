"""The device tracker: which device (MAC) is behind each address, what it is called, when it was seen.

It lives in memory (the DNS hot path asks ``mac_for`` on every query: a dict hit) and writes what changed to
the store in one transaction per flush. Only the daemon's event consumer calls ``observe`` and ``flush``;
``mac_for`` is safe from the DNS server on the same event loop.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import ColumnElement, Select, UniqueConstraint, and_, delete, func, not_, or_, select, update
from sqlalchemy.orm import Session

from gateway.config import ConfigError
from gateway.events import AddressSeen, Counters, DeviceSeen, DhcpSeen, DnsQuery, Event, MdnsSeen, PacketSeen
from gateway.policyfile import load_policy
from gateway.store.db import Store
from gateway.store.schema import (
    Address,
    Device,
    DeviceName,
    DhcpFingerprint,
    Identification,
    MdnsService,
    ObservationWindow,
    Query,
)
from identifier.oui import vendor

log = logging.getLogger(__name__)

# A device's best name comes from the most trusted source that gave one.
NAME_RANK = {"user": 0, "dhcp": 1, "mdns": 2, "rdns": 3}
# What the tracker keeps of each kind a device chooses (its names of each source, DHCP fingerprints, mDNS services,
# addresses), in memory and in the store: the newest this many. A device or a hostile LAN host sending a new name in
# every packet would otherwise grow the daemon's memory and the database on the SD card forever. The device's page
# shows as many (``service.DETAIL_ROWS``); identification reads the observation window, never these rows.
HISTORY_ROWS = 100
# The devices kept when ``[devices] max`` is not set (``DevicesConfig.max``): far more than a home has.
DEVICES_MAX = 1000
# A device the owner never touched makes room for a new one past ``[devices] max`` only once unseen this long: a
# flood of spoofed MACs, all seen just now, cannot push out a real device that is merely switched off for the night.
STALE_S = 24 * 3600.0
# Rows hanging off a device, deleted with it (by the owner, or to make room).
DEVICE_ROWS = (Address, DeviceName, DhcpFingerprint, MdnsService, Identification, ObservationWindow)


# A device name's longest text, as long as its column (PostgreSQL refuses longer; SQLite would keep it).
NAME_MAX: int = Device.__table__.c.name.type.length
_FINGERPRINT_MAX: int = DhcpFingerprint.__table__.c.param_list.type.length  # each text column of the fingerprint


def clean_text(value: str | None, limit: int = _FINGERPRINT_MAX) -> str | None:
    """``value`` without control characters (PostgreSQL refuses NUL) and cut to ``limit`` characters (the
    column's size): a device chooses these strings, and one hostile value must not fail a whole batch."""
    if value is None:
        return None
    return "".join(ch for ch in value if ch.isprintable())[:limit] or None


def _param_list(codes: tuple[int, ...]) -> str:
    """Option 55 as "1,3,6", cut after the last whole code that fits its column (a client may ask for 255)."""
    text = ",".join(map(str, codes))
    return text if len(text) <= _FINGERPRINT_MAX else text[: _FINGERPRINT_MAX + 1].rsplit(",", 1)[0]


def best_own_name(names: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """(name, source) a device is called by what it said of itself: the most trusted source's latest name.
    ``names`` are (source, name) oldest first; the owner's ("user") are not the device's own and are skipped."""
    best: tuple[str, str] | None = None
    for source, name in names:
        if source != "user" and (best is None or NAME_RANK.get(source, 9) <= NAME_RANK.get(best[1], 9)):
            best = (name, source)
    return best


def address_key(ip: str) -> str:
    """The key of a client whose MAC cannot be known (loopback, routed): merged into a MAC when one maps."""
    return f"ip:{ip}"


@dataclass
class TrackedDevice:
    key: str
    first_seen: float
    last_seen: float
    name: str | None = None
    name_source: str | None = None
    new: bool = False  # not yet in the store
    dirty: bool = True
    # The batch (``take`` generation) that first wrote it; 0 when loaded from the store, None before any.
    stored: int | None = None
    # The histories below are dicts used as sets that remember insertion order, oldest first: past
    # HISTORY_ROWS the oldest is dropped here and its row by the next flush (``DeviceTracker.write``).
    names: dict[tuple[str, str], None] = field(default_factory=dict)  # (source, name) already stored
    # (param_list, vendor_class, hostname) already stored. Kept here because the table's UNIQUE cannot dedupe
    # them: SQL NULLs are distinct, so a request without option 60 or 12 added a row at every renewal.
    fingerprints: dict[tuple[str, str | None, str | None], None] = field(default_factory=dict)
    # mDNS services already stored or waiting to be: a device announces the same ones every few minutes, and
    # a row per announcement piled up in memory while the store could not be written (a full disk).
    services: dict[str, None] = field(default_factory=dict)
    addresses: dict[str, None] = field(default_factory=dict)  # the IPs mapped to it, least recently mapped first


@dataclass
class TrackerBatch:
    """The changes one flush writes."""

    devices: list[tuple[str, float, float, str | None, str | None, bool]]  # ..., new
    addresses: dict[str, tuple[str, str, float]]
    names: list[dict]
    fingerprints: list[dict]
    services: list[dict]
    merges: list[tuple[str, str]]
    generation: int = 0
    pruned: set[str] = field(default_factory=set)  # devices whose history went past HISTORY_ROWS: trim their rows
    evicted: list[str] = field(default_factory=list)  # forgotten to make room past [devices] max: delete their rows

    @property
    def empty(self) -> bool:
        return not (self.devices or self.addresses or self.names or self.fingerprints or self.services
                    or self.merges or self.pruned or self.evicted)

    def keys(self) -> set[str]:
        """Every device this batch changes something of."""
        return ({d[0] for d in self.devices} | {v[0] for v in self.addresses.values()} | {m[1] for m in self.merges}
                | {row["mac"] for rows in (self.names, self.fingerprints, self.services) for row in rows}
                | self.pruned | set(self.evicted))

    def part(self, key: str) -> TrackerBatch:
        """Only ``key``'s changes (a merge goes with the device it merges into), to be written on their own."""
        return TrackerBatch(
            devices=[d for d in self.devices if d[0] == key],
            addresses={ip: v for ip, v in self.addresses.items() if v[0] == key},
            names=[r for r in self.names if r["mac"] == key],
            fingerprints=[r for r in self.fingerprints if r["mac"] == key],
            services=[r for r in self.services if r["mac"] == key],
            merges=[m for m in self.merges if m[1] == key],
            generation=self.generation,
            pruned=self.pruned & {key},
            evicted=[k for k in self.evicted if k == key],
        )


@dataclass
class Change:
    """What ``observe`` noticed that others care about (alerts, identification)."""

    # "new_device" | "merged" | "renamed" | "evicted" (forgotten to make room) | "untracked" (no room: not kept)
    kind: str
    key: str
    old_key: str | None = None


class DeviceTracker:
    def __init__(self, store: Store, *, neighbour_lookup: Callable[[str], str | None] | None = None,
                 counters: Counters | None = None, max_devices: int = DEVICES_MAX,
                 state_dir: Path | None = None) -> None:
        self.store = store
        self.max_devices = max_devices
        self.state_dir = state_dir  # where policy.json is: a device with a policy of its own is never deleted
        # Devices the owner touched (named, approved or quarantined, labelled, given a policy): never forgotten to
        # make room. Replaced whole (``keep``) from a worker thread; read on the loop.
        self.kept: frozenset[str] = frozenset()
        self._evicted: list[str] = []  # forgotten to make room since the last take: their rows go in the next write
        # Forgotten to make room, but kept in the store: the owner touched them meanwhile. Each is loaded back from
        # the store when it is next seen, as at start, not met as a new device. Added to by the writer thread.
        self._spared: set[str] = set()
        self._no_room_until = float("-inf")  # (event time) no device can make room before this
        self._refused: set[str] = set()  # devices refused for want of room, to count each once (bounded)
        self._said_full = False
        self.counters = counters if counters is not None else Counters()
        self.devices: dict[str, TrackedDevice] = {}
        self.ip_to_key: dict[str, str] = {}
        self._neighbour_lookup = neighbour_lookup
        self._pending_addresses: dict[str, tuple[str, str, float]] = {}  # ip -> (key, source, ts)
        self._pending_names: list[dict] = []
        self._pending_fingerprints: list[dict] = []
        self._pending_services: list[dict] = []
        self._merges: list[tuple[str, str]] = []
        self._pruned: set[str] = set()  # devices that dropped history rows since the last take
        self._said_pruned = False
        self._generation = 0  # of the last batch taken
        self.written = 0  # generation of the last batch committed (set by the writer thread)
        self._load()

    # -- the hot path ------------------------------------------------------------------------------------
    def mac_for(self, ip: str) -> str | None:
        key = self.ip_to_key.get(ip)
        if key is not None and not key.startswith("ip:"):
            return key
        if self._neighbour_lookup is not None:
            return self._neighbour_lookup(ip)
        return None

    # -- the event consumer ------------------------------------------------------------------------------
    def observe(self, event: Event) -> list[Change]:
        """Fold one event into the device table; return what changed that others must hear about."""
        changes: list[Change] = []
        ts = event.ts
        if isinstance(event, DnsQuery):
            key = event.mac or self.mac_for(event.client) or address_key(event.client)
            event.mac = key
            changes += self._touch(key, ts)
            if key not in self.devices:  # no room: answered and logged, not kept
                return changes
            if key.startswith("ip:"):
                self.ip_to_key.setdefault(event.client, key)
            else:
                changes += self._map(event.client, key, "server", ts)
            return changes
        mac = event.mac
        changes += self._touch(mac, ts)
        if mac not in self.devices:
            return changes
        if isinstance(event, AddressSeen):
            changes += self._map(event.ip, mac, event.source, ts)
        elif isinstance(event, DhcpSeen):
            if event.hostname:
                changes += self._name(mac, event.hostname, "dhcp", ts)
            fingerprint = (_param_list(event.param_list), clean_text(event.vendor_class), clean_text(event.hostname))
            seen = self.devices[mac].fingerprints
            if fingerprint not in seen:
                self._remember(mac, seen, fingerprint, "DHCP fingerprints")
                param_list, vendor_class, hostname = fingerprint
                self._pending_fingerprints.append(
                    dict(mac=mac, first_seen=ts, hostname=hostname, param_list=param_list,
                         vendor_class=vendor_class, client_id=clean_text(event.client_id))
                )
        elif isinstance(event, MdnsSeen):
            for name in event.names:
                if name.endswith(".local") and "._" not in name:  # a host name, not a service instance
                    changes += self._name(mac, name.removesuffix(".local"), "mdns", ts)
            seen = self.devices[mac].services
            for service in filter(None, map(clean_text, event.services)):
                if service not in seen:
                    self._remember(mac, seen, service, "mDNS services")
                    self._pending_services.append(dict(mac=mac, service=service, first_seen=ts))
        elif isinstance(event, (PacketSeen, DeviceSeen)) and event.ip:
            changes += self._map(event.ip, mac, "packet", ts)
        return changes

    def _make_room(self, ts: float) -> str | None:
        """Forget the device the owner never touched that was seen longest ago, if unseen for ``STALE_S`` at
        ``ts``; returns its key, or None when none may go. One scan of the devices, then none until the oldest
        could be stale: under a flood every refused MAC would otherwise cost a scan."""
        if ts < self._no_room_until:
            return None
        kept = self.kept
        oldest = min((d for d in self.devices.values() if d.key not in kept), key=lambda d: d.last_seen, default=None)
        if oldest is None or oldest.last_seen > ts - STALE_S:
            self._no_room_until = float("inf") if oldest is None else oldest.last_seen + STALE_S
            return None
        self.forget(oldest.key)
        self._evicted.append(oldest.key)
        self.counters.add("devices_evicted")
        return oldest.key

    def _refuse(self, key: str) -> None:
        """Count a device left untracked for want of room once (most of the time: the set that remembers them
        starts over past ``max_devices``), and say it once per run."""
        if key in self._refused:
            return
        if len(self._refused) >= self.max_devices:
            self._refused.clear()
        self._refused.add(key)
        self.counters.add("devices_untracked")
        if not self._said_full:
            self._said_full = True
            log.warning("too many devices: possible MAC flood. [devices] max = %d reached and none the owner left "
                        "untouched was unseen for %d h: new devices (the first %s) are answered and filtered, not "
                        "kept (counted in devices_untracked; said once)", self.max_devices, STALE_S // 3600, key)

    def keep(self, keys: Iterable[str]) -> None:
        """The devices the owner touched now: never forgotten to make room (any thread)."""
        self.kept = frozenset(keys)
        self._no_room_until = float("-inf")  # one that was kept may go now

    def _touch(self, key: str, ts: float) -> list[Change]:
        dev = self.devices.get(key)
        if dev is None and key in self._spared:
            self._spared.discard(key)
            # one read on the loop, once for each such device; past [devices] max if need be: the owner touched it
            self._load([key])  # nothing when the owner has deleted it since: then it is new
            dev = self.devices.get(key)
        if dev is None:
            changes = []
            if len(self.devices) >= self.max_devices:
                gone = self._make_room(ts)
                if gone is None:
                    self._refuse(key)
                    return [Change("untracked", key)]
                changes.append(Change("evicted", gone))
            self.devices[key] = TrackedDevice(key, ts, ts, new=True)
            return [*changes, Change("new_device", key)]
        if ts > dev.last_seen:
            dev.last_seen = ts
            dev.dirty = True
        elif ts < dev.first_seen:  # a merged capture replayed out of time order: its first frame is not the earliest
            dev.first_seen = ts
            dev.dirty = True
        return []

    def _map(self, ip: str, mac: str, source: str, ts: float) -> list[Change]:
        if ip in ("0.0.0.0", "::") or not ip:
            return []
        old = self.ip_to_key.get(ip)
        self.ip_to_key[ip] = mac
        self._pending_addresses[ip] = (mac, source, ts)
        # Only a new mapping is filed in the device's addresses: reordering them at every query cost the DNS path
        # 0.3 us. So the one evicted past HISTORY_ROWS is the least recently mapped, and if it is still in use, its
        # next packet maps it again.
        if old != mac:
            if old in self.devices:  # the address moved: no longer one of the old device's
                self.devices[old].addresses.pop(ip, None)
            self._own_address(mac, ip)
        if old and old.startswith("ip:") and old in self.devices:
            self._merge(old, mac)
            return [Change("merged", mac, old)]
        return []

    def _add_name(self, mac: str, source: str, name: str) -> None:
        """Note (source, name) as stored; past HISTORY_ROWS of that source its oldest is dropped. Each source has
        its own bound, so a flood of mDNS names cannot push out the DHCP hostname; the owner's are not bounded."""
        names = self.devices[mac].names
        names[(source, name)] = None
        if source != "user" and sum(1 for s, _ in names if s == source) > HISTORY_ROWS:
            del names[next(k for k in names if k[0] == source)]
            self._pruned_one(mac, f"{source} names")

    def _own_address(self, mac: str, ip: str) -> None:
        """``ip`` as ``mac``'s newest address; the oldest past HISTORY_ROWS maps to nothing."""
        addresses = self.devices[mac].addresses
        addresses.pop(ip, None)  # to the newest end
        for evicted in self._remember(mac, addresses, ip, "addresses"):
            if self.ip_to_key.get(evicted) == mac:
                del self.ip_to_key[evicted]
            if self._pending_addresses.get(evicted, (None,))[0] == mac:
                del self._pending_addresses[evicted]

    def _merge(self, old: str, mac: str) -> None:
        """The address-keyed device turns out to be ``mac``: fold its history in."""
        gone = self.devices.pop(old)
        dev = self.devices[mac]
        dev.first_seen = min(dev.first_seen, gone.first_seen)
        dev.last_seen = max(dev.last_seen, gone.last_seen)
        for history, theirs, kind in ((dev.fingerprints, gone.fingerprints, "DHCP fingerprints"),
                                      (dev.services, gone.services, "mDNS services")):
            for item in theirs:
                if item not in history:
                    self._remember(mac, history, item, kind)
        dev.dirty = True
        if not gone.new:
            self._merges.append((old, mac))
        for ip, key in list(self.ip_to_key.items()):
            if key == old:
                self.ip_to_key[ip] = mac
                self._own_address(mac, ip)

    def _name(self, mac: str, name: str, source: str, ts: float) -> list[Change]:
        name = clean_text(name, NAME_MAX)  # shown as text
        if not name:
            return []
        dev = self.devices[mac]
        known = (source, name) in dev.names
        if not known:
            self._add_name(mac, source, name)
            self._pending_names.append(dict(mac=mac, name=name, source=source, first_seen=ts, last_seen=ts))
        if dev.name_source is None or NAME_RANK[source] < NAME_RANK.get(dev.name_source, 9) or (
            source == dev.name_source and name != dev.name
        ):
            if known:
                # An earlier name back in use (A, then B, then A again) is the newest once more, here and in its
                # row's last_seen, which decides the name after a restart and when the owner clears theirs.
                del dev.names[(source, name)]
                dev.names[(source, name)] = None
                self._pending_names.append(dict(mac=mac, name=name, source=source, first_seen=ts, last_seen=ts))
            dev.name, dev.name_source, dev.dirty = name, source, True
            return [Change("renamed", mac)]
        return []

    # -- persistence -------------------------------------------------------------------------------------
    def take(self) -> TrackerBatch:
        """Everything changed since the last call, detached from the live state (cheap; on the loop thread)."""
        self._generation += 1
        batch = TrackerBatch(
            devices=[(d.key, d.first_seen, d.last_seen, d.name, d.name_source, d.new)
                     for d in self.devices.values() if d.dirty],
            addresses=self._pending_addresses,
            names=self._pending_names,
            fingerprints=self._pending_fingerprints,
            services=self._pending_services,
            merges=self._merges,
            generation=self._generation,
            pruned=self._pruned,
            evicted=[key for key in self._evicted if key not in self.devices],  # back meanwhile: stays
        )
        for dev in self.devices.values():
            if dev.new:
                dev.stored = self._generation
            dev.dirty = dev.new = False
        self._pending_addresses, self._pending_names = {}, []
        self._pending_fingerprints, self._pending_services, self._merges = [], [], []
        self._pruned = set()
        self._evicted = []
        return batch

    def restore(self, batch: TrackerBatch) -> None:
        """Take back a batch the store refused (a full disk): the next ``take`` carries it again, with what
        changed since on top."""
        for key, *_, new in batch.devices:
            dev = self.devices.get(key)
            if dev is None:
                continue
            dev.dirty = True  # the live record is newer than the batch's copy and is what gets written
            if new:  # never stored after all: it must not pass for a device deleted in the store
                dev.new, dev.stored = True, None
        self._pending_addresses = {**batch.addresses, **self._pending_addresses}
        self._pending_names[:0] = batch.names
        self._pending_fingerprints[:0] = batch.fingerprints
        self._pending_services[:0] = batch.services
        self._merges[:0] = batch.merges
        self._pruned |= batch.pruned
        self._evicted[:0] = batch.evicted

    def write(self, batch: TrackerBatch) -> set[str]:
        """Store a batch in one transaction (in a worker thread: it may wait on the disk).

        Returns the devices it found deleted from the store (by the web UI or the CLI) since they were
        written: their changes are not written back, and the caller should ``forget`` them.
        """
        if batch.empty:
            self.written = max(self.written, batch.generation)
            return set()
        gone: set[str] = set()
        with self.store.transaction() as s:
            for key, first_seen, last_seen, name, name_source, new in batch.devices:
                # first: merged rows and addresses point at these
                if not self._write_device(s, key, first_seen, last_seen, name, name_source, new):
                    gone.add(key)
            s.flush()
            for old, mac in batch.merges:
                self._merge_rows(s, old, mac)
            for ip, (key, source, ts) in batch.addresses.items():
                if key in gone:
                    continue
                row = s.get(Address, ip)
                if row is None:
                    s.add(Address(ip=ip, mac=key, source=source, first_seen=ts, last_seen=ts))
                else:
                    row.mac, row.source, row.last_seen = key, source, max(row.last_seen, ts)
            s.flush()
            # A row already there is one the tracker dropped as the oldest and saw again: it is the newest now,
            # or the trim below would delete what the tracker holds as stored.
            for table, rows, seen in ((DeviceName, batch.names, "last_seen"),
                                      (DhcpFingerprint, batch.fingerprints, "first_seen"),
                                      (MdnsService, batch.services, "first_seen")):
                _insert_ignore(s, table, [row for row in rows if row["mac"] not in gone], refresh=seen)
            if batch.pruned - gone:
                _trim(s, sorted(batch.pruned - gone))
            spared = set(batch.evicted) - _delete_untouched(s, self._unpoliced(batch.evicted))
        self._spared |= spared  # after the commit: a rolled back delete is retried with the restored batch
        self.written = max(self.written, batch.generation)
        return gone

    def _unpoliced(self, keys: list[str]) -> list[str]:
        """``keys`` without the devices policy.json gives a policy of their own, read now: the daemon's copy of
        the policy (``kept``) may be older than an owner's change made a moment ago. None when it cannot be read:
        better keep a device's rows than delete a device that has a policy."""
        if not keys or self.state_dir is None:
            return keys
        try:
            owned = load_policy(self.state_dir).own_devices()
        except (ConfigError, OSError) as exc:
            log.warning("devices: none deleted to make room, the policy cannot be read: %s", exc)
            return []
        return [key for key in keys if key not in owned]

    def flush(self) -> None:
        for key in self.write(self.take()):
            self.forget(key)

    @staticmethod
    def _write_device(s: Session, key: str, first_seen: float, last_seen: float, name: str | None,
                      name_source: str | None, new: bool) -> bool:
        """Insert or update a device's row; False (and nothing written) when a stored device was deleted."""
        row = s.get(Device, key)
        if row is None:
            if not new:  # deleted behind our back: writing it again would undo the owner's delete
                return False
            row = Device(mac=key, first_seen=first_seen, last_seen=last_seen, status="new",
                         vendor=None if key.startswith("ip:") else vendor(key))
            s.add(row)
        row.first_seen = min(row.first_seen, first_seen)
        row.last_seen = max(row.last_seen, last_seen)
        if row.name_source != "user" and name:
            row.name, row.name_source = name, name_source
        return True

    def _remember(self, key: str, history: dict, item: object, kind: str) -> list:
        """Add ``item`` as the newest of one of ``key``'s histories; returns what fell out past HISTORY_ROWS."""
        history[item] = None
        evicted = []
        while len(history) > HISTORY_ROWS:
            oldest = next(iter(history))
            del history[oldest]
            evicted.append(oldest)
            self._pruned_one(key, kind)
        return evicted

    def _pruned_one(self, key: str, kind: str) -> None:
        """Count a history entry dropped; the next flush deletes its row. Said once per run, not per packet."""
        self.counters.add("history_dropped")
        self._pruned.add(key)
        if not self._said_pruned:
            self._said_pruned = True
            log.warning("device %s sent more than %d %s: only the newest %d are kept (counted in history_dropped; "
                        "said once)", key, HISTORY_ROWS, kind, HISTORY_ROWS)

    def _merge_rows(self, s: Session, old: str, mac: str) -> None:
        # The MAC's own window (its first minute, or a past identification) supersedes the address's.
        s.execute(delete(ObservationWindow).where(ObservationWindow.mac == old))
        for table in (Address, DeviceName, DhcpFingerprint, MdnsService, Identification):
            # A row the MAC's device already has (same name, same fingerprint) stays once: OR IGNORE, then drop.
            s.execute(update(table).where(table.mac == old).values(mac=mac)
                      .prefix_with("OR IGNORE", dialect="sqlite").execution_options(synchronize_session=False))
            s.execute(delete(table).where(table.mac == old).execution_options(synchronize_session=False))
        old_row = s.get(Device, old)
        if old_row is not None:
            s.delete(old_row)
        with self.store.querylog_session.begin() as qs:  # past queries follow the device
            qs.execute(update(Query).where(Query.mac == old).values(mac=mac))

    def stored_keys(self) -> tuple[int, set[str]]:
        """The generation committed so far and every device key in the store, read in that order (a thread
        may call this): a device written by that generation or earlier and missing from the set was deleted."""
        generation = self.written
        with self.store.session() as s:
            return generation, set(s.scalars(select(Device.mac)))

    def forget_missing(self, generation: int, stored: set[str]) -> list[str]:
        """Forget the devices ``stored_keys`` shows deleted from the store; returns their keys."""
        gone = [key for key, dev in self.devices.items()
                if dev.stored is not None and dev.stored <= generation and key not in stored]
        for key in gone:
            self.forget(key)
        return gone

    def forget(self, key: str) -> None:
        """Drop a device deleted in the store, addresses and unwritten changes included: its next packet
        makes it a new device again."""
        self.devices.pop(key, None)
        self._spared.discard(key)
        for ip in [ip for ip, k in self.ip_to_key.items() if k == key]:
            del self.ip_to_key[ip]
        self._pending_addresses = {ip: v for ip, v in self._pending_addresses.items() if v[0] != key}
        self._pending_names = [row for row in self._pending_names if row["mac"] != key]
        self._pending_fingerprints = [row for row in self._pending_fingerprints if row["mac"] != key]
        self._pending_services = [row for row in self._pending_services if row["mac"] != key]

    def _load(self, macs: list[str] | None = None) -> None:
        """Load the devices in the store (only ``macs``, when given) with their names, fingerprints, services and
        addresses."""

        def of(stmt: Select, column: ColumnElement) -> Select:  # ``column`` names the row's device
            return stmt if macs is None else stmt.where(column.in_(macs))

        owner_named: set[str] = set()
        with self.store.session() as s:
            for row in s.scalars(of(select(Device), Device.mac)):
                # The owner's name lives in the store alone: the tracker holds what the device calls itself. Had it
                # cached the owner's name, a name the owner cleared or changed later would be written back.
                if row.name_source == "user":
                    owner_named.add(row.mac)
                observed = (None, None) if row.name_source == "user" else (row.name, row.name_source)
                self.devices[row.mac] = TrackedDevice(row.mac, row.first_seen, row.last_seen, *observed,
                                                      dirty=False, stored=0)
                if row.mac.startswith("ip:"):  # it has no addresses row: its key is its address
                    self.ip_to_key.setdefault(row.mac[3:], row.mac)
            for ip, mac in s.execute(of(select(Address.ip, Address.mac), Address.mac)
                                     .order_by(Address.last_seen, Address.ip)):
                if macs is not None and self.ip_to_key.get(ip, mac) != mac:  # another device's since
                    continue
                self.ip_to_key[ip] = mac
                if mac in self.devices:
                    self._own_address(mac, ip)
            names = of(select(DeviceName.mac, DeviceName.source, DeviceName.name), DeviceName.mac).order_by(
                DeviceName.last_seen, DeviceName.id)
            names_of: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for mac, source, name in s.execute(names):
                if mac not in self.devices:
                    continue
                names_of[mac].append((source, name))
            for mac, names in names_of.items():
                dev = self.devices[mac]
                for source, name in names:  # a store written before the bound may hold more: trimmed here
                    self._add_name(mac, source, name)
                if mac in owner_named:  # under the owner's name: the best the device said of itself
                    dev.name, dev.name_source = best_own_name(names) or (None, None)
            fingerprints = of(select(DhcpFingerprint.mac, DhcpFingerprint.param_list, DhcpFingerprint.vendor_class,
                                     DhcpFingerprint.hostname), DhcpFingerprint.mac).order_by(
                DhcpFingerprint.first_seen, DhcpFingerprint.id)
            for mac, *fingerprint in s.execute(fingerprints):
                if mac in self.devices:
                    self._remember(mac, self.devices[mac].fingerprints, tuple(fingerprint), "DHCP fingerprints")
            services = of(select(MdnsService.mac, MdnsService.service), MdnsService.mac).order_by(
                MdnsService.first_seen, MdnsService.id)
            for mac, service in s.execute(services):
                if mac in self.devices:
                    self._remember(mac, self.devices[mac].services, service, "mDNS services")
        if macs is None:
            log.info("device tracker: %d devices, %d addresses", len(self.devices), len(self.ip_to_key))


def _insert_ignore(s: Session, table: type, rows: list[dict], refresh: str | None = None) -> None:
    """INSERT that skips rows violating a unique constraint, on SQLite and PostgreSQL alike; with ``refresh``,
    a row already there takes that column's new value instead."""
    if not rows:
        return
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    if refresh is None:
        s.execute(insert(table).on_conflict_do_nothing(), rows)
        return
    unique = next(c for c in table.__table__.constraints if isinstance(c, UniqueConstraint))
    keys = [column.name for column in unique.columns]
    # PostgreSQL refuses one INSERT that updates a row twice: the last of duplicates (a restored batch) wins
    rows = list({tuple(row.get(key) for key in keys): row for row in rows}.values())
    stmt = insert(table)
    s.execute(stmt.on_conflict_do_update(index_elements=keys, set_={refresh: stmt.excluded[refresh]}), rows)


def _untouched() -> ColumnElement[bool]:
    """A device the owner never named, approved or quarantined, nor labelled (no NULL makes it unknown)."""
    return and_(or_(Device.name_source.is_(None), Device.name_source != "user"), Device.status == "new",
                Device.label_manufacturer.is_(None), Device.label_device_type.is_(None),
                Device.label_category.is_(None))


def owner_touched(s: Session, macs: list[str] | None = None) -> set[str]:
    """The devices (of ``macs``, or all) the owner named, approved or quarantined, or labelled."""
    stmt = select(Device.mac).where(not_(_untouched()))
    if macs is not None:
        stmt = stmt.where(Device.mac.in_(macs))
    return set(s.scalars(stmt))


def _delete_untouched(s: Session, macs: list[str]) -> set[str]:
    """Delete ``macs`` and their rows, but not one the owner touched since the tracker chose it; returns those
    deleted. The condition is in the DELETE itself: PostgreSQL checks it again on a row it waited for, so a name
    the owner commits while the delete waits is kept (a check made before the delete would miss it)."""
    untouched = _untouched()
    deleted: set[str] = set()
    for start in range(0, len(macs), 500):  # within any database's limit on bound parameters
        chunk = macs[start:start + 500]
        gone = list(s.scalars(delete(Device).where(Device.mac.in_(chunk), untouched).returning(Device.mac)
                              .execution_options(synchronize_session=False)))
        for table in DEVICE_ROWS:  # ON DELETE CASCADE did it where foreign keys are enforced
            s.execute(delete(table).where(table.mac.in_(gone)).execution_options(synchronize_session=False))
        deleted.update(gone)
    return deleted


def _trim(s: Session, macs: list[str]) -> None:
    """Delete the rows of ``macs``'s histories past the newest HISTORY_ROWS of each kind (names of each source,
    the owner's excepted), in the order the tracker drops them from memory; for addresses by when they were last
    seen, where memory drops the least recently mapped (an address still in use is mapped and stored again by
    its next packet)."""
    kinds = (
        (DeviceName, DeviceName.id, (DeviceName.mac, DeviceName.source), (DeviceName.last_seen, DeviceName.id),
         DeviceName.source != "user"),
        (DhcpFingerprint, DhcpFingerprint.id, (DhcpFingerprint.mac,), (DhcpFingerprint.first_seen, DhcpFingerprint.id),
         None),
        (MdnsService, MdnsService.id, (MdnsService.mac,), (MdnsService.first_seen, MdnsService.id), None),
        (Address, Address.ip, (Address.mac,), (Address.last_seen, Address.ip), None),
    )
    for start in range(0, len(macs), 500):  # within any database's limit on bound parameters
        chunk = macs[start:start + 500]
        for table, pk, partition, order, where in kinds:
            ranked = select(pk.label("pk"), func.row_number().over(
                partition_by=partition, order_by=[column.desc() for column in order]).label("n")
            ).where(table.mac.in_(chunk), *([] if where is None else [where])).subquery()
            s.execute(delete(table).where(pk.in_(select(ranked.c.pk).where(ranked.c.n > HISTORY_ROWS)))
                      .execution_options(synchronize_session=False))
