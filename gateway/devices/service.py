"""What the CLI and the web UI do to devices: one set of functions for both, so no logic lives in a view."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, or_, select

from gateway.alerts.outbox import record
from gateway.alerts.payloads import check
from gateway.devices import device_key
from gateway.devices.tracker import DEVICE_ROWS, NAME_MAX, best_own_name
from gateway.events import Alert
from gateway.store.db import Store
from gateway.store.schema import (
    Address,
    Device,
    DeviceName,
    DhcpFingerprint,
    Identification,
    MdnsService,
)
from policy.model import hidden_character

STATUSES = ("new", "quarantined", "approved")
DEVICES_REVISION = "devices_revision"  # bumped on every change made outside the daemon
# The gateway's own upstream router (the default route's next hop; JSON list of MACs), written by the daemon: it is
# exempt from quarantine and shown as the router.
ROUTER_SETTING = "gateway_router"
# The longest owner-given labels, as long as their columns (the name's: tracker.NAME_MAX).
LABEL_MAX: dict[str, int] = {
    key: Device.__table__.c[f"label_{key}"].type.length for key in ("manufacturer", "device_type", "category")
}

# Rows of each kind the device page and API show: a device chooses its DHCP hostnames and mDNS names, and one
# sending thousands would otherwise make its page megabytes long.
DETAIL_ROWS = 100


class NotFound(LookupError):
    pass


@dataclass
class DeviceDetail:
    device: Device
    addresses: list[Address]
    names: list[DeviceName]
    fingerprints: list[DhcpFingerprint]
    services: list[MdnsService]
    identifications: list[Identification]


def list_devices(
    store: Store,
    *,
    search: str | None = None,
    status: str | None = None,
    limit: int | None = None,
    offset: int = 0,
    macs: list[str] | None = None,
) -> list[Device]:
    """Devices, most recently seen first; ``limit`` and ``offset`` page through them (a LAN host spoofing MACs
    can make thousands), ``macs`` keeps only these. Ties are ordered by MAC so that pages neither repeat nor
    skip one."""
    stmt = select(Device).order_by(Device.last_seen.desc(), Device.mac)
    if macs is not None:
        stmt = stmt.where(Device.mac.in_(macs))
    if limit is not None:
        stmt = stmt.limit(limit).offset(offset)
    if status:
        stmt = stmt.where(Device.status == status)
    if search:
        # autoescape: a '_' or '%' typed in the search is that character, not a wildcard matching every device
        text = search.lower()
        stmt = stmt.where(
            or_(
                Device.mac.contains(text, autoescape=True),
                Device.name.icontains(text, autoescape=True),
                Device.vendor.icontains(text, autoescape=True),
                Device.manufacturer.icontains(text, autoescape=True),
                Device.device_type.icontains(text, autoescape=True),
                Device.mac.in_(select(Address.mac).where(Address.ip.contains(text, autoescape=True))),
            )
        )
    with store.session() as s:
        return list(s.scalars(stmt))


def get_device(store: Store, mac: str) -> DeviceDetail:
    """The device and, of each kind of row hanging off it, the newest ``DETAIL_ROWS`` (identifications oldest
    first, the others newest first); ``mac`` may be typed any way ``device_key`` reads."""
    mac = device_key(mac)

    def newest(table, *order):  # noqa: ANN001, ANN202 - a mapped class and its columns
        return list(s.scalars(select(table).where(table.mac == mac).order_by(*(o.desc() for o in order))
                              .limit(DETAIL_ROWS)))

    with store.session() as s:
        device = s.get(Device, mac)
        if device is None:
            raise NotFound(mac)
        return DeviceDetail(
            device=device,
            addresses=newest(Address, Address.last_seen),
            names=newest(DeviceName, DeviceName.last_seen),
            fingerprints=newest(DhcpFingerprint, DhcpFingerprint.first_seen),
            services=newest(MdnsService, MdnsService.first_seen),
            # two of one time (a replay's model swap within a window stamps both at its close): the later written
            identifications=newest(Identification, Identification.ts, Identification.id)[::-1],
        )


def identification_count(store: Store, mac: str) -> int:
    """How many identifications the store holds of the device ``mac`` (a key as stored), of which ``get_device``
    gives the newest DETAIL_ROWS."""
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Identification).where(Identification.mac == mac))


def rename(store: Store, mac: str, name: str) -> None:
    """The owner's name for the device; every name given is kept in its history. An empty one clears it: the
    device is called at once by the best name it gave itself, as the daemon would call it (even if none runs)."""
    name = owner_text("name", name, NAME_MAX)
    now = time.time()
    with store.transaction() as s:
        device = _get(s, mac)
        if not name:
            own = s.execute(select(DeviceName.source, DeviceName.name).where(DeviceName.mac == device.mac)
                            .order_by(DeviceName.last_seen, DeviceName.id))  # oldest first, as the tracker loads
            device.name, device.name_source = best_own_name(own) or (None, None)
        else:
            device.name, device.name_source = name, "user"
            # A name the owner gave before is one history row (unique per mac, source, name): seen again now.
            earlier = s.scalar(
                select(DeviceName).where(
                    DeviceName.mac == device.mac, DeviceName.source == "user", DeviceName.name == name
                )
            )
            if earlier is None:
                s.add(DeviceName(mac=device.mac, name=name, source="user", first_seen=now, last_seen=now))
            else:
                earlier.last_seen = now
    store.bump_revision(DEVICES_REVISION)


def routers(store: Store) -> frozenset[str]:
    """The MACs of the gateway's own router as the daemon last found them (none if it never did)."""
    try:
        return frozenset(json.loads(store.get_setting(ROUTER_SETTING) or "[]"))
    except ValueError:
        return frozenset()


def set_status(store: Store, mac: str, status: str, *, by: str, publish: bool) -> None:
    """``approved`` lifts quarantine; ``quarantined`` puts the device back under its quarantine policy.

    Every status change of a device is made here, whoever makes it (``by``: ``web``, ``api``, ``home_assistant``),
    so here its quarantine's changes are alerted: ``quarantine_entered`` or ``quarantine_lifted``, in the same
    transaction, once per change (setting the status it has raises none), and in the outbox too when ``publish``
    (MQTT is configured; the daemon's publisher sends it). The daemon, reloading the device table after it, raises
    none of its own: Home Assistant's switch, then that reload, make one alert."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
    with store.transaction() as s:
        device = _get(s, mac, lock=True)  # two owners switching at once: the second sees the first's status
        was_in, goes_in = device.status == "quarantined", status == "quarantined"
        device.status = status
        if was_in != goes_in:
            alert = Alert("quarantine_entered" if goes_in else "quarantine_lifted", time.time(), device.mac,
                          {"by": by})
            check(alert)
            record(s.connection(), alert, publish=publish)
    store.bump_revision(DEVICES_REVISION)


def label(store: Store, mac: str, *, manufacturer: str, device_type: str, category: str) -> None:
    """The owner confirms or corrects the identity: these labels feed federated training."""
    given = {"manufacturer": manufacturer, "device_type": device_type, "category": category}
    texts = {key: owner_text(key, value, LABEL_MAX[key]) or None for key, value in given.items()}
    with store.transaction() as s:
        device = _get(s, mac)
        device.label_manufacturer, device.label_device_type, device.label_category = texts.values()
        device.labelled_at = time.time()
    store.bump_revision(DEVICES_REVISION)


def owner_text(field: str, text: str, limit: int) -> str:
    """``text`` as the owner gives it for ``field``: stripped and cut to ``limit``. ValueError for a control or
    bidi character: a newline or NUL (PostgreSQL refuses it) has no place in a name, and U+202E reverses the text
    shown after it, on every page and in Home Assistant. The tracker drops them from names a device sends."""
    text = text.strip()[:limit]
    if (bad := hidden_character(text)) is not None:
        raise ValueError(f"the {field} may not contain control or bidi characters (found U+{ord(bad):04X})")
    return text


def confirmed_types(store: Store) -> list[tuple[str, str]]:
    """(MAC, device type) of every device whose owner confirmed or corrected its type."""
    with store.session() as s:
        rows = s.execute(select(Device.mac, Device.label_device_type).where(Device.label_device_type.is_not(None)))
        return [(mac, device_type) for mac, device_type in rows]


def device_types(store: Store, limit: int = 200) -> list[str]:
    """The device types of the home's devices, the owner's label before the model's, sorted: the names a type's
    default policy must be given to apply (types match exactly). ``limit`` bounds the list a page offers."""
    return _labels(store, Device.label_device_type, Device.device_type, limit)


def device_categories(store: Store, limit: int = 200) -> list[str]:
    """The categories of the home's devices, as ``device_types`` finds types."""
    return _labels(store, Device.label_category, Device.category, limit)


def _labels(store: Store, owners, models, limit: int) -> list[str]:  # noqa: ANN001 - two columns of Device
    shown = func.coalesce(owners, models)
    with store.session() as s:
        return list(s.scalars(select(shown).where(shown.is_not(None)).distinct().order_by(shown).limit(limit)))


def forget(store: Store, mac: str) -> None:
    with store.transaction() as s:
        device = _get(s, mac)
        for table in DEVICE_ROWS:
            s.execute(delete(table).where(table.mac == device.mac))
        s.delete(device)
    store.bump_revision(DEVICES_REVISION)


def _get(session, mac: str, *, lock: bool = False) -> Device:  # noqa: ANN001 - a Session
    # lock: SELECT ... FOR UPDATE where the database has it (PostgreSQL); SQLite's writers are one at a time.
    device = session.get(Device, device_key(mac), with_for_update=lock)
    if device is None:
        raise NotFound(mac)
    return device
