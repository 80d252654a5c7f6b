"""The alert payloads on ``iotgw/<gateway>/event/<kind>``: one JSON envelope with a schema version, and the
fields each kind's ``data`` must carry. Checked when an alert is sent, so a wrong call fails at its source
rather than as a malformed message in someone's Home Assistant automation."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from gateway.events import ALERT_KINDS, Alert

SCHEMA_VERSION = 1

_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_NUM = (int, float, type(None))

# kind -> (needs a device MAC, {field: allowed types}). Extra fields are allowed; these are the contract.
ALERT_FIELDS: dict[str, tuple[bool, dict[str, tuple[type, ...]]]] = {
    "new_device": (True, {"vendor": _OPT_STR, "name": _OPT_STR, "ip": _OPT_STR}),
    "device_identified": (
        True,
        {
            "manufacturer": _OPT_STR,
            "device_type": _OPT_STR,
            "category": _OPT_STR,
            "confidence": _NUM,
            "decided_after_s": _OPT_NUM,
        },
    ),
    "unknown_device": (True, {"confidence": _NUM, "decided_after_s": _OPT_NUM}),
    "device_online": (True, {"offline_s": _OPT_NUM}),
    "device_offline": (True, {"last_seen": _NUM, "idle_timeout_s": _NUM}),
    "blocked_summary": (True, {"count": (int,), "since": _NUM, "until": _NUM, "top": (list,)}),
    "quarantine_entered": (True, {"by": (str,)}),
    "quarantine_lifted": (True, {"by": (str,)}),
    "anomaly": (True, {"domain": (str,), "reason": (str,)}),
    "model_updated": (False, {"version": (str,), "previous_version": _OPT_STR}),
    "federated_round": (False, {"round": (int,), "status": (str,), "error": _OPT_STR}),
    "alerts_dropped": (False, {"dropped": (int,), "oldest_ts": _NUM, "newest_ts": _NUM}),
    "too_many_devices": (False, {"max": (int,), "message": (str,)}),
}
assert set(ALERT_FIELDS) == set(ALERT_KINDS), "every alert kind needs its payload contract"


def check(alert: Alert) -> None:
    """Raise ValueError naming the kind and field when ``alert`` does not satisfy its kind's contract."""
    if alert.kind not in ALERT_FIELDS:
        raise ValueError(f"unknown alert kind {alert.kind!r} (one of {', '.join(ALERT_KINDS)})")
    needs_mac, fields = ALERT_FIELDS[alert.kind]
    if needs_mac and not alert.mac:
        raise ValueError(f"alert {alert.kind}: needs the device's mac")
    for name, types in fields.items():
        if name not in alert.data:
            raise ValueError(f"alert {alert.kind}: data lacks {name!r}")
        value = alert.data[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"alert {alert.kind}: data[{name!r}] is {type(value).__name__}")
    try:
        json.dumps(alert.data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"alert {alert.kind}: data is not JSON: {exc}") from exc


def envelope(alert: Alert, gateway: str, device: dict[str, Any] | None) -> bytes:
    """The published message: the same top-level keys for every kind, the kind's fields under ``data``."""
    body = {
        "schema": SCHEMA_VERSION,
        "kind": alert.kind,
        "gateway": gateway,
        "ts": alert.ts,
        "time": datetime.fromtimestamp(alert.ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "mac": alert.mac,
        "device": device,
        "data": alert.data,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
