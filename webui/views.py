"""Plain dictionaries of store records for JSON and for templates: one place decides what a device looks like
to the outside, so the pages and the API always agree."""

from __future__ import annotations

from typing import Any

from gateway.devices.service import DeviceDetail
from gateway.events import Alert
from gateway.overview import DomainSeen, is_online
from gateway.store.schema import Device, Identification, Query

# Where a device's name came from, in the owner's words (the store's and the API's identifiers told an owner
# nothing). Every page shows a source through ``name_source``; an unknown one is shown as it is.
NAME_SOURCES = {
    "user": "named by you",
    "dhcp": "the name it gave when it asked for an address (DHCP)",
    "mdns": "the name it announces on the local network (mDNS)",
    "rdns": "the name the local DNS gives its address (reverse DNS)",
}


def name_source(source: str | None) -> str:
    return NAME_SOURCES.get(source or "", source or "")


# Each alert kind (``gateway.events.ALERT_KINDS``) as the dashboard and the alert list say it: "new_device" and
# "device_identified" were the MQTT topic's words, not an owner's. The API and MQTT keep the identifiers.
ALERT_KINDS = {
    "new_device": "new device",
    "device_identified": "device identified",
    "unknown_device": "device not recognised",
    "device_online": "back online",
    "device_offline": "went offline",
    "blocked_summary": "blocked queries summary",
    "quarantine_entered": "quarantined",
    "quarantine_lifted": "quarantine lifted",
    "anomaly": "unusual query",
    "model_updated": "identification model updated",
    "federated_round": "federated learning round",
    "alerts_dropped": "alerts lost while the MQTT broker was away",
    "too_many_devices": "device limit reached",
}


def alert_kind(kind: str) -> str:
    return ALERT_KINDS.get(kind, kind)


# What the identifier weighed (``identifier.features.SIGNALS`` and ``macblock``), as a device's page lists it under
# "Signals used": "oui" and "packet" told an owner nothing.
SIGNALS = {
    "dns": "the domains it looks up (DNS)",
    "dhcp": "how it asked for an address (DHCP)",
    "oui": "who made its network card (its MAC address's prefix)",
    "mdns": "what it announces on the local network (mDNS)",
    "packet": "the ports and protocols it uses",
    "macblock": "a MAC address next to a known unit's (one production run)",
}


def signal(name: str) -> str:
    return SIGNALS.get(name, name)


def device(d: Device, counts: tuple[int, int] | None = None, routers: frozenset[str] = frozenset()) -> dict[str, Any]:
    """``routers``: the gateway's own router (``service.routers``), shown as such and never quarantined as new."""
    return {
        "mac": d.mac,
        "name": d.name,
        "name_source": d.name_source,
        "vendor": d.vendor,
        "status": d.status,
        "router": d.mac in routers,
        "online": is_online(d),
        "first_seen": d.first_seen,
        "last_seen": d.last_seen,
        "identity": {
            "manufacturer": d.manufacturer,
            "device_type": d.device_type,
            "category": d.category,
            "confidence": d.confidence,
            "known": d.known,
            "decided_after_s": d.decided_after_s,
        },
        "label": {
            "manufacturer": d.label_manufacturer,
            "device_type": d.label_device_type,
            "category": d.label_category,
            "labelled_at": d.labelled_at,
        },
        "queries_24h": counts[0] if counts else 0,
        "blocked_24h": counts[1] if counts else 0,
    }


def device_detail(detail: DeviceDetail, timeline: list[DomainSeen],
                  routers: frozenset[str] = frozenset()) -> dict[str, Any]:
    out = device(detail.device, routers=routers)
    latest = detail.identifications[-1] if detail.identifications else None
    out.update(
        addresses=[{"ip": a.ip, "source": a.source, "last_seen": a.last_seen} for a in detail.addresses],
        names=[{"name": n.name, "source": n.source, "last_seen": n.last_seen} for n in detail.names],
        dhcp=[
            {
                "hostname": f.hostname,
                "param_list": f.param_list,
                "vendor_class": f.vendor_class,
                "client_id": f.client_id,
                "first_seen": f.first_seen,
            }
            for f in detail.fingerprints
        ],
        mdns_services=[m.service for m in detail.services],
        alternatives=alternatives(latest),
        signals=[str(s) for s in latest.signals] if latest else [],
        model_version=latest.model_version if latest else None,
        identifications=[identification(i) for i in detail.identifications],
        timeline=[
            {
                "sld": t.sld,
                "first_ts": t.first_ts,
                "last_ts": t.last_ts,
                "count": t.count,
                "blocked": t.blocked,
                "after_s": t.first_ts - detail.device.first_seen,
            }
            for t in timeline
        ],
    )
    return out


def alternatives(ident: Identification | None) -> list[dict[str, Any]]:
    """The identifier records ``[label, confidence]`` pairs; anything else is shown as its text."""
    out = []
    for alt in ident.alternatives if ident else []:
        if isinstance(alt, list | tuple) and len(alt) == 2 and isinstance(alt[1], int | float):
            out.append({"label": str(alt[0]), "confidence": float(alt[1])})
        else:
            out.append({"label": str(alt), "confidence": None})
    return out


def identification(i: Identification) -> dict[str, Any]:
    return {
        "ts": i.ts,
        "manufacturer": i.manufacturer,
        "device_type": i.device_type,
        "category": i.category,
        "confidence": i.confidence,
        "known": i.known,
        "decided_after_s": i.decided_after_s,
        "model_version": i.model_version,
    }


def query(q: Query) -> dict[str, Any]:
    return {
        "id": q.id,
        "ts": q.ts,
        "client": q.client,
        "mac": q.mac,
        "qname": q.qname,
        "qtype": q.qtype,
        "sld": q.sld,
        "rcode": q.rcode,
        "latency_ms": q.latency_ms,
        "verdict": q.verdict,
        "rule": q.rule,
        "source": q.source,
    }


def alert(a: Alert) -> dict[str, Any]:
    return {"kind": a.kind, "ts": a.ts, "mac": a.mac, "data": a.data}
