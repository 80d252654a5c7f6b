"""The OpenAPI 3.1 description of ``/api/v1``, served at ``/api/docs``. Written by hand; a test checks that
its paths and methods match the app's URL map, so it cannot drift."""

from __future__ import annotations

from flask import Blueprint, jsonify

from gateway import accounts
from gateway.devices import service
from policy.model import SCOPE_NAME_MAX

bp = Blueprint("openapi", __name__)

_JSON = "application/json"
_ERRORS = {
    "400": {
        "description": "bad request",
        "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    },
    "401": {"description": "not logged in, or unknown, revoked or expired token"},
    "403": {"description": "missing CSRF token (session), or a read-only token on a write"},
    "404": {"description": "no such device, token or policy"},
}


def _op(
    summary: str,
    *,
    params: tuple[str, ...] = (),
    body: str | None = None,
    status: str = "200",
    schema: str | None = None,
    errors: dict | None = None,
) -> dict:
    op: dict = {"summary": summary, "responses": dict(_ERRORS) | (errors or {})}
    if params:
        op["parameters"] = [{"$ref": f"#/components/parameters/{p}"} for p in params]
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    ok: dict = {"description": "ok"}
    if schema:
        ok["content"] = {_JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    op["responses"][status] = ok
    return op


def _versioned(op: dict) -> dict:
    """``op`` on one policy scope: its 200 carries the scope's ETag; a PUT may send it back in If-Match."""
    op["responses"]["200"]["headers"] = {
        "ETag": {"description": "the scope's version, for If-Match on a PUT", "schema": _STR}
    }
    if "requestBody" in op:
        op["parameters"] = [*op.get("parameters", []), {"$ref": "#/components/parameters/if_match"}]
        op["responses"]["412"] = {
            "description": "If-Match names a version the scope no longer has (another writer changed it); "
            "nothing was changed: GET it again and redo the change",
            "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return op


_FETCH_FAILED = {"502": {"description": "the list's server could not be reached, answered an error or was too slow"}}
_STR = {"type": "string"}
_NUM = {"type": "number"}
_NULL_STR = {"type": ["string", "null"]}
_NULL_NUM = {"type": ["number", "null"]}

_SCOPE_NAME = f"at most {SCOPE_NAME_MAX} characters, no control or bidi characters (400 otherwise)"

DOCUMENT: dict = {
    "openapi": "3.1.0",
    "info": {
        "title": "iotgw",
        "version": "1",
        "description": "The gateway's JSON API. Authenticate with a login session (send the page's CSRF "
        "token in X-CSRF-Token on writes) or with 'Authorization: Bearer TOKEN' from `iotgw user token "
        "create`; read tokens may only GET. Tokens are managed with a session only.",
    },
    "security": [{"bearer": []}, {"session": []}],
    "paths": {
        "/api/docs": {"get": _op("This document")},
        "/api/v1/summary": {"get": _op("Dashboard counters", schema="Summary")},
        "/api/v1/stats/queries": {
            "get": _op("Queries and blocked queries per time bucket", params=("hours", "buckets"))
        },
        "/api/v1/devices": {
            "get": _op(
                "Devices, most recently seen first, a page at a time; when there are more, the Link header"
                ' (rel="next") has the next page\'s URL, or ask again with offset=offset+limit',
                params=("q", "status", "device_limit", "offset"),
            )
        },
        "/api/v1/devices/{mac}": {
            "get": _op(
                "A device with identity, alternatives, signals, names and domain timeline (of its addresses, "
                "names, DHCP fingerprints, mDNS services and identifications, the newest 100 of each)",
                params=("mac",),
                schema="Device",
            ),
            "patch": _op(
                "Rename and/or set status (new, quarantined, approved)",
                params=("mac",),
                body="DeviceUpdate",
                schema="Device",
            ),
            "delete": _op(
                "Forget the device and everything recorded about it", params=("mac",), status="204"
            ),
        },
        "/api/v1/devices/{mac}/label": {
            "put": _op(
                "Confirm or correct the identity (labels for federated training)",
                params=("mac",),
                body="Label",
                schema="Device",
            ),
        },
        "/api/v1/queries": {
            "get": _op(
                "Query log, newest first; page with before=<id of the last row>",
                params=("q", "mac_query", "verdict", "before", "limit"),
                schema="Queries",
            )
        },
        "/api/v1/alerts": {"get": _op("Alerts, newest first", params=("limit",))},
        "/api/v1/model": {"get": _op("Identification model version, metrics, plots, last federated round")},
        "/api/v1/policies": {
            "get": _op("Every policy scope, block list, category, schedule and the quarantine", schema="Policies")
        },
        "/api/v1/policies/global": {
            "get": _versioned(_op("The global policy", schema="ScopePolicy")),
            "put": _versioned(_op("Replace the global policy", body="ScopePolicy", schema="ScopePolicy")),
        },
        "/api/v1/policies/device/{mac}": {
            "get": _versioned(_op(
                "A device's own policy and the scopes it inherits from (the ETag is the device's own policy's)",
                params=("mac",), schema="ScopePolicy",
            )),
            "put": _versioned(
                _op("Replace a device's own policy", params=("mac",), body="ScopePolicy", schema="ScopePolicy")
            ),
            "delete": _op("Drop a device's own policy (it inherits again)", params=("mac",), status="204"),
        },
        "/api/v1/policies/type/{device_type}": {
            "get": _versioned(_op("A device type's default policy", params=("device_type",), schema="ScopePolicy")),
            "put": _versioned(_op(
                "Replace a device type's default policy",
                params=("device_type",),
                body="ScopePolicy",
                schema="ScopePolicy",
            )),
            "delete": _op("Drop a device type's default policy", params=("device_type",), status="204"),
        },
        "/api/v1/policies/tag/{tag}": {
            "get": _versioned(_op(
                "A category's default policy (AdGuard Home device tags: device_camera, device_tv, ...)",
                params=("tag",),
                schema="ScopePolicy",
            )),
            "put": _versioned(_op(
                "Replace a category's default policy", params=("tag",), body="ScopePolicy", schema="ScopePolicy"
            )),
            "delete": _op("Drop a category's default policy", params=("tag",), status="204"),
        },
        "/api/v1/policies/lists": {
            "post": _op(
                "Add a block list from a URL (downloaded now, never through a proxy from the environment; 502 for a"
                " server on the gateway itself, loopback or link-local, also after a redirect) or a file name in"
                " <state_dir>/lists",
                body="ListAdd",
                status="201",
                schema="ListReport",
                errors=_FETCH_FAILED,
            ),
        },
        "/api/v1/policies/lists/{list_id}": {
            "delete": _op("Remove a list no rule uses", params=("list_id",), status="204"),
        },
        "/api/v1/policies/lists/{list_id}/update": {
            "post": _op("Download a URL list again", params=("list_id",), schema="ListReport", errors=_FETCH_FAILED),
        },
        "/api/v1/policies/schedules/{name}": {
            "put": _op("Create or replace a weekly schedule", params=("schedule",), body="Schedule"),
            "delete": _op("Remove a schedule no rule uses", params=("schedule",), status="204"),
        },
        "/api/v1/policies/quarantine": {
            "put": _op("Switch quarantine of new devices and set its allow list", body="Quarantine"),
        },
        "/api/v1/tokens": {
            "get": _op(
                "API tokens not revoked, with expires_at (null: never) and expired (refused, until revoked)"
                " (session only)"
            ),
            "post": _op(
                "Create a token; the secret is in the response only (session only)",
                body="TokenCreate",
                status="201",
            ),
        },
        "/api/v1/tokens/{token_id}": {
            "delete": _op("Revoke a token (session only)", params=("token_id",), status="204"),
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": "iotgw_session"},
        },
        "parameters": {
            "mac": {
                "name": "mac",
                "in": "path",
                "required": True,
                "schema": _STR,
                "description": "aa:bb:cc:dd:ee:ff, AA-BB-CC-DD-EE-FF, aabbccddeeff or aabb.ccdd.eeff, any case; "
                "ip:ADDRESS for one known by address",
            },
            "device_type": {"name": "device_type", "in": "path", "required": True, "schema": _STR,
                            "description": _SCOPE_NAME},
            "tag": {"name": "tag", "in": "path", "required": True, "schema": _STR,
                    "description": "a device tag (device_tv) or a category (tv); " + _SCOPE_NAME},
            "list_id": {"name": "list_id", "in": "path", "required": True, "schema": _STR},
            "schedule": {"name": "name", "in": "path", "required": True, "schema": _STR},
            "token_id": {"name": "token_id", "in": "path", "required": True, "schema": {"type": "integer"}},
            "if_match": {
                "name": "If-Match",
                "in": "header",
                "schema": _STR,
                "description": "the ETag of the scope as read: the PUT replaces it only if no one changed it since "
                "(412 otherwise). Without it the scope is replaced whatever it holds now.",
            },
            "q": {"name": "q", "in": "query", "schema": _STR, "description": "substring search"},
            "status": {
                "name": "status",
                "in": "query",
                "schema": {"enum": ["new", "quarantined", "approved"]},
            },
            "mac_query": {"name": "mac", "in": "query", "schema": _STR, "description": "a device's MAC, any spelling"},
            "verdict": {
                "name": "verdict",
                "in": "query",
                "schema": {"enum": ["allowed", "blocked", "refused", "ratelimited"]},
            },
            "before": {"name": "before", "in": "query", "schema": {"type": "integer"}},
            "limit": {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                "description": "taken into 1..1000; 400 if it is not an integer",
            },
            "device_limit": {
                "name": "limit",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 200},
                "description": "devices per page; a larger value is taken as 1000",
            },
            "offset": {
                "name": "offset",
                "in": "query",
                "schema": {"type": "integer", "minimum": 0, "default": 0},
                "description": "how many devices to skip",
            },
            "hours": {
                "name": "hours",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 2160, "default": 24},
                "description": "taken into 1..2160 (90 days); 400 if it is not an integer",
            },
            "buckets": {
                "name": "buckets",
                "in": "query",
                "schema": {"type": "integer", "minimum": 1, "maximum": 240, "default": 24},
                "description": "taken into 1..240; 400 if it is not an integer",
            },
        },
        "schemas": {
            "Error": {"type": "object", "properties": {"error": _STR}},
            "Queries": {"type": "array", "items": {"$ref": "#/components/schemas/Query"}},
            "Query": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "ts": _NUM,
                    "client": _STR,
                    "mac": _NULL_STR,
                    "qname": _STR,
                    "qtype": {"type": "integer"},
                    "sld": _STR,
                    "rcode": {"type": ["integer", "null"]},
                    "latency_ms": _NULL_NUM,
                    "verdict": {"enum": ["allowed", "blocked", "refused", "ratelimited"]},
                    "rule": {**_NULL_STR, "description": "the policy engine's key of the rule that decided"},
                    "source": {"enum": ["server", "capture", "replay"]},
                    "rule_words": {
                        **_NULL_STR,
                        "description": "the rule as the owner reads it, said by the policy engine when it decided; "
                        "null without a rule and in rows logged before the words were kept (show the key)",
                    },
                },
            },
            "Summary": {
                "type": "object",
                "properties": {
                    k: {"type": "integer"}
                    for k in ("devices", "online", "new", "identifying", "queries_24h", "blocked_24h", "untracked")
                },
            },
            "Device": {
                "type": "object",
                "properties": {
                    "mac": _STR,
                    "name": _NULL_STR,
                    "name_source": _NULL_STR,
                    "vendor": _NULL_STR,
                    "status": {"enum": ["new", "quarantined", "approved"]},
                    "router": {"type": "boolean"},  # the gateway's own router: not quarantined as a new device
                    "online": {"type": "boolean"},
                    "first_seen": _NUM,
                    "last_seen": _NUM,
                    "identity": {
                        "type": "object",
                        "properties": {
                            "manufacturer": _NULL_STR,
                            "device_type": _NULL_STR,
                            "category": _NULL_STR,
                            "confidence": _NULL_NUM,
                            "known": {"type": ["boolean", "null"]},
                            "decided_after_s": _NULL_NUM,
                        },
                    },
                    "label": {"$ref": "#/components/schemas/Label"},
                },
            },
            "DeviceUpdate": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "name": {
                        "type": ["string", "null"],
                        "maxLength": service.NAME_MAX,
                        "description": "no control or bidi characters (400); joiners are fine",
                    },
                    "status": {"enum": list(service.STATUSES)},
                },
            },
            "Label": {
                "type": "object",
                "description": "a field left out or null is cleared; no control or bidi characters (400)",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    key: {"type": ["string", "null"], "maxLength": limit} for key, limit in service.LABEL_MAX.items()
                },
            },
            "Rule": {
                "type": "object",
                "required": ["action", "kind"],
                "properties": {
                    "action": {"enum": ["block", "allow"]},
                    "kind": {"enum": ["name", "list", "category", "all"]},
                    "value": {"type": "string", "description": "the domain (and its subdomains), list or category"},
                    "schedule": _NULL_STR,
                    "label": {"type": "string", "readOnly": True},
                },
            },
            "ScopePolicy": {
                "type": "object",
                "description": "A scope's own policy; null settings inherit (device, type, tag, global). "
                "scope, mode and inherits are read-only.",
                "properties": {
                    "scope": {"type": "string", "readOnly": True},
                    "rules": {"type": "array", "items": {"$ref": "#/components/schemas/Rule"}},
                    "strict": {"type": ["boolean", "null"]},
                    "paused": {"type": ["boolean", "null"]},
                    "answer": {"enum": ["null", "nxdomain", "nodata", "refused", None]},
                    "mode": {"enum": ["default", "strict", "paused"], "readOnly": True},
                    "inherits": {"type": "array", "readOnly": True, "items": {"type": "object"}},
                },
            },
            "Policies": {
                "type": "object",
                "properties": {
                    "revision": {"type": "integer"},
                    "policies": {"type": "array", "items": {"$ref": "#/components/schemas/ScopePolicy"}},
                    "lists": {"type": "array", "items": {"type": "object"}},
                    "categories": {"type": "object"},
                    "schedules": {"type": "object"},
                    "quarantine": {"$ref": "#/components/schemas/Quarantine"},
                    "profiles": {"type": "object"},
                },
            },
            "ListAdd": {
                "type": "object",
                "required": ["id"],
                "additionalProperties": False,
                "properties": {"id": _STR, "url": _STR, "file": _STR, "category": _STR},
            },
            "ListReport": {
                "type": "object",
                "properties": {
                    "list_id": _STR,
                    "path": _STR,
                    "blocked": {"type": "integer"},
                    "exceptions": {"type": "integer"},
                    "error_count": {"type": "integer"},
                    "errors": {
                        "type": "array",
                        "items": _STR,
                        "description": "the first bad lines as 'file:line: reason'; a fetched list's lines are not"
                        " quoted (the report must not show what a LAN server answered)",
                    },
                },
            },
            "Schedule": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "time_zone": _STR,
                    "days": {
                        "type": "object",
                        "description": 'weekday -> "HH:MM-HH:MM"; an end before the start is on the next day:'
                        ' {"mon": "22:00-07:00"} is Monday 22:00 to Tuesday 07:00',
                        "additionalProperties": _STR,
                    },
                },
            },
            "Quarantine": {
                "type": "object",
                "required": ["enabled"],
                "additionalProperties": False,
                "properties": {"enabled": {"type": "boolean"}, "allow": {"type": "array", "items": _STR}},
            },
            "TokenCreate": {
                "type": "object",
                "required": ["name", "scope"],
                "additionalProperties": False,
                "properties": {
                    "name": _STR,
                    "scope": {"enum": ["read", "write"]},
                    "expires_in_days": {
                        "enum": list(accounts.TOKEN_LIFETIMES_DAYS),
                        "default": accounts.TOKEN_DEFAULT_DAYS,
                        "description": "days until the token stops working; null: never",
                    },
                },
            },
        },
    },
}


@bp.get("/api/docs")
def docs():  # noqa: ANN201
    return jsonify(DOCUMENT)
