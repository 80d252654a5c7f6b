"""The OpenAPI 3.1 description of ``/api/v1``, served at ``/api/docs``. Written by hand; a test checks that
its paths and methods match the app's URL map, so it cannot drift."""

from __future__ import annotations

from flask import Blueprint, jsonify

bp = Blueprint("openapi", __name__)

_JSON = "application/json"
_ERRORS = {
    "400": {
        "description": "bad request",
        "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
    },
    "401": {"description": "not logged in, or unknown or revoked token"},
    "403": {"description": "missing CSRF token (session), or a read-only token on a write"},
    "404": {"description": "no such device or token"},
}


def _op(
    summary: str,
    *,
    params: tuple[str, ...] = (),
    body: str | None = None,
    status: str = "200",
    schema: str | None = None,
) -> dict:
    op: dict = {"summary": summary, "responses": dict(_ERRORS)}
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


_STR = {"type": "string"}
_NUM = {"type": "number"}
_NULL_STR = {"type": ["string", "null"]}
_NULL_NUM = {"type": ["number", "null"]}

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
        "/api/v1/devices": {"get": _op("Devices, most recently seen first", params=("q", "status"))},
        "/api/v1/devices/{mac}": {
            "get": _op(
                "A device with identity, alternatives, signals, names and domain timeline",
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
            )
        },
        "/api/v1/alerts": {"get": _op("Alerts, newest first", params=("limit",))},
        "/api/v1/model": {"get": _op("Identification model version, metrics, plots, last federated round")},
        "/api/v1/tokens": {
            "get": _op("Live API tokens (session only)"),
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
            "mac": {"name": "mac", "in": "path", "required": True, "schema": _STR},
            "token_id": {"name": "token_id", "in": "path", "required": True, "schema": {"type": "integer"}},
            "q": {"name": "q", "in": "query", "schema": _STR, "description": "substring search"},
            "status": {
                "name": "status",
                "in": "query",
                "schema": {"enum": ["new", "quarantined", "approved"]},
            },
            "mac_query": {"name": "mac", "in": "query", "schema": _STR},
            "verdict": {
                "name": "verdict",
                "in": "query",
                "schema": {"enum": ["allowed", "blocked", "refused", "ratelimited"]},
            },
            "before": {"name": "before", "in": "query", "schema": {"type": "integer"}},
            "limit": {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 1000}},
            "hours": {"name": "hours", "in": "query", "schema": {"type": "integer", "default": 24}},
            "buckets": {"name": "buckets", "in": "query", "schema": {"type": "integer", "default": 24}},
        },
        "schemas": {
            "Error": {"type": "object", "properties": {"error": _STR}},
            "Summary": {
                "type": "object",
                "properties": {
                    k: {"type": "integer"}
                    for k in ("devices", "online", "new", "identifying", "queries_24h", "blocked_24h")
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
                "properties": {"name": _STR, "status": {"enum": ["new", "quarantined", "approved"]}},
            },
            "Label": {
                "type": "object",
                "properties": {"manufacturer": _STR, "device_type": _STR, "category": _STR},
            },
            "TokenCreate": {
                "type": "object",
                "required": ["name", "scope"],
                "properties": {"name": _STR, "scope": {"enum": ["read", "write"]}},
            },
        },
    },
}


@bp.get("/api/docs")
def docs():  # noqa: ANN201
    return jsonify(DOCUMENT)
