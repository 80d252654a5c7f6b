"""Plain dictionaries of store records for JSON and for templates: one place decides what a device looks like
to the outside, so the pages and the API always agree."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from gateway.devices.service import DeviceDetail
from gateway.events import Alert
from gateway.overview import DomainSeen, is_online
from gateway.store.schema import Device, Identification, Query


class Words(dict):
    """Identifiers (a name source, an alert kind...) in an owner's words, used as a template filter: the store's
    and the API's identifiers told an owner nothing. One it has no words for is shown as it is."""

    def __call__(self, key: str | None) -> str:
        return self.get(key or "", key or "")


# Where a device's name came from.
NAME_SOURCES = Words({
    "user": "named by you",
    "dhcp": "the name it gave when it asked for an address (DHCP)",
    "mdns": "the name it announces on the local network (mDNS)",
    "rdns": "the name the local DNS gives its address (reverse DNS)",
})
# Each alert kind (``gateway.events.ALERT_KINDS``) as the dashboard and the alert list say it; the API and MQTT
# keep the identifiers.
ALERT_KINDS = Words({
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
})
# What the identifier weighed (``identifier.features.SIGNALS`` and ``macblock``), as a device's page lists it under
# "Signals used".
SIGNALS = Words({
    "dns": "the domains it looks up (DNS)",
    "dhcp": "how it asked for an address (DHCP)",
    "oui": "who made its network card (its MAC address's prefix)",
    "mdns": "what it announces on the local network (mDNS)",
    "packet": "the ports and protocols it uses",
    "macblock": "a MAC address next to a known unit's (one production run)",
})
# How the gateway learnt a device's address (``Address.source``), as the device's page lists its addresses.
ADDRESS_SOURCES = Words({
    "server": "its DNS queries come from it",
    "dhcp": "given to it by DHCP",
    "neighbour": "in the gateway's neighbour table",
    "packet": "seen in its traffic",
})


def when(ts: float | None) -> str:
    """A local date and time; a stored time no date can show (NaN, past the year 9999: a record of another
    version, or a hand-edited database) is shown as such rather than making the page an error."""
    if not ts:
        return "—"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return "not a valid time"


def pct(value: float | None) -> str:
    return f"{value * 100:.0f}%" if value is not None else "—"


def duration(s: float) -> str:
    """Seconds to one decimal under a minute; longer, its two largest whole units ("5 min", "2 h 3 min"): an
    offline time of 7384.2 s told an owner nothing."""
    if not math.isfinite(s):
        return "not a valid duration"
    if round(s, 1) < 60:  # 59.97 s is "60.0 s" to one decimal: "1 min" from here
        return f"{s:.1f} s"
    parts, rest = [], int(round(s))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size} {unit}")
            rest %= size
    return " ".join(parts[:2])


AT_ONCE_S = 0.1  # within a tenth of a second of a device's first packet reads "at once", decisions and domains alike


def decided_after(s: float | None) -> str:
    """When the identifier decided, from the device's first packet. "after 0.0 s" read like a fault: a device that
    names itself in its first packets (a DHCP request with its host name) is decided at once. None: it never was
    sure, and the daemon took its best guess when its window (its first minute) ended."""
    if s is None:
        return "as a best guess at the end of its first minute"
    if s < AT_ONCE_S:
        return "at once (within a tenth of a second of first being seen)"
    return f"after {s:.1f} s"


def first_asked(s: float) -> str:
    """When a device first asked for a domain, from its first packet, read as its identification's time is: the
    page said "at once" of a decision and "after 0.1 s" of the query it was decided on."""
    return "at once" if s < AT_ONCE_S else f"after {s:.1f} s"


def _top(top: list) -> str:
    """A blocked summary's most blocked names, ``[{"name": ..., "count": ...}]``; anything else as its text."""
    return ", ".join(f"{t['name']} ({t['count']})" if isinstance(t, dict) and {"name", "count"} <= t.keys()
                     else str(t) for t in top) if isinstance(top, list) else str(top)


def _yes(value: object) -> str:
    return "yes" if value is True else "no" if value is False else str(value)


def _by(value: object) -> str:
    return {"home_assistant": "Home Assistant"}.get(str(value), str(value))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_or_text(say: Callable[[float], str]) -> Callable[[object], str]:
    """``say`` for a number; anything else (an alert recorded by another version) as its text, never an error page."""
    return lambda v: say(v) if _is_number(v) else str(v)


def _decided(value: object) -> str:
    return decided_after(value) if value is None or _is_number(value) else str(value)


# Every key an alert's details carry (``gateway.alerts.payloads.ALERT_FIELDS`` and the extras the daemon, presence,
# the blocked summary and federation add), in the owner's words and rounded for reading: the alert list showed
# "decided_after_s: 3.0001440048217773, confidence: 0.9397". A key missing here is shown as it is.
ALERT_DETAILS: dict[str, tuple[str, Callable[[object], str]]] = {
    # new_device
    "vendor": ("maker of its network card", str),
    "name": ("name", str),
    "ip": ("address", str),
    # device_identified, unknown_device
    "manufacturer": ("manufacturer", str),
    "device_type": ("type", str),
    "category": ("category", str),
    "confidence": ("confidence", _number_or_text(pct)),
    "decided_after_s": ("decided", _decided),
    # ... when a new model re-identified the device from its first minute and changed its type
    "previous_device_type": ("type before", str),
    "model_version": ("re-identified by model", str),
    # device_online, device_offline
    "offline_s": ("offline for", _number_or_text(duration)),
    "last_seen": ("last seen", _number_or_text(when)),
    "idle_timeout_s": ("counted offline after no traffic for", _number_or_text(duration)),
    # blocked_summary
    "count": ("blocked queries", str),
    "since": ("from", _number_or_text(when)),
    "until": ("to", _number_or_text(when)),
    "interval_s": ("summed up every", _number_or_text(duration)),
    "top": ("most blocked", _top),
    # quarantine_entered, quarantine_lifted
    "by": ("by", _by),
    # anomaly
    "domain": ("domain", str),
    "reason": ("why", str),
    # model_updated
    "version": ("model version", str),
    "previous_version": ("replacing", str),
    "accuracy": ("accuracy", _number_or_text(pct)),
    "accuracy_before": ("accuracy before", _number_or_text(pct)),
    "rolled_back": ("rolled back", _yes),
    # federated_round (and model_updated's round)
    "round": ("round", str),
    "status": ("result", str),
    "error": ("error", str),
    "run_id": ("run", str),
    # alerts_dropped
    "dropped": ("alerts lost", str),
    "oldest_ts": ("first lost", _number_or_text(when)),
    "newest_ts": ("last lost", _number_or_text(when)),
    # too_many_devices
    "max": ("device limit", str),
    "message": ("why", str),
}
# An empty detail (a new device's name before it gave one) read "name: None" and is left out; a decision time of
# None says something: the device never was sure within its first minute.
_NONE_SAYS = {"decided_after_s"}


def alert_details(data: dict) -> list[tuple[str, str]]:
    """An alert's details as (label, value) pairs in the owner's words, in the alert's order."""
    out = []
    for key, value in data.items():
        if value is None and key not in _NONE_SAYS:
            continue
        label, say = ALERT_DETAILS.get(key, (key, str))
        out.append((label, say(value)))
    return out


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


def identification_history(rows: list[dict[str, Any]], limit: int, *, complete: bool) -> list[dict[str, Any]]:
    """A device's stored identifications (``identification`` dicts, oldest first) newest first, at most ``limit``,
    each with ``change``: what it changed from the one before it, in words, so that an owner sees when and why
    the answer moved (a revision on more traffic, a new model). ``complete``: ``rows`` starts at the device's
    first identification (none was cut off), so the oldest can be called the first answer."""
    out = []
    for i, row in enumerate(rows):
        if i == 0:
            change = "first answer" if complete else ""
        else:
            change = _change(rows[i - 1], row)
        out.append(row | {"change": change})
    return out[::-1][:limit]


def answer_words(i: dict[str, Any]) -> str:
    """An identification's answer as its history lists it: "type (manufacturer) · category", or unknown."""
    if i["known"] is False:
        return "unknown device"
    text = i["device_type"] or "—"
    if i["manufacturer"]:
        text += f" ({i['manufacturer']})"
    return text + (f" · {i['category']}" if i["category"] else "")


def _change(before: dict[str, Any], row: dict[str, Any]) -> str:
    parts = []
    if answer_words(before) != answer_words(row):
        parts.append(f"answer changed from {answer_words(before)}")
    if before["model_version"] != row["model_version"]:
        parts.append(f"new model (was {before['model_version']})")
    if not parts:
        parts.append("same answer" if before["confidence"] == row["confidence"]
                     else f"same answer, confidence was {pct(before['confidence'])}")
    return "; ".join(parts)


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
        # the rule as the policy engine said it when it decided; None in rows written before it did (their key only)
        "rule_words": q.rule_words,
    }


def alert(a: Alert) -> dict[str, Any]:
    return {"kind": a.kind, "ts": a.ts, "mac": a.mac, "data": a.data}
