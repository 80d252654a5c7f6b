"""The JSON API under ``/api/v1``: the same service functions as the pages, for scripts and Home Assistant.

Authentication is a login session (with the ``X-CSRF-Token`` header on writes) or ``Authorization: Bearer``
with a token from ``iotgw user token create``; see ``webui.security``.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from flask import Blueprint, abort, jsonify, request, url_for

from gateway import accounts, overview
from gateway.alerts import recent_alerts
from gateway.devices import device_key, service
from gateway.store import querylog
from webui import views
from webui.context import ctx
from webui.pages import VERDICTS, before_id, device_page, int_arg
from webui.security import api_error

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.get("/summary")
def summary():  # noqa: ANN201
    return jsonify(asdict(overview.summary(ctx().store)))


@bp.get("/stats/queries")
def query_stats():  # noqa: ANN201
    hours = int_arg("hours", 24, 1, 24 * 90)
    buckets = int_arg("buckets", 24, 1, 240)
    return jsonify([asdict(b) for b in overview.queries_over_time(ctx().store, hours=hours, buckets=buckets)])


@bp.get("/devices")
def devices():  # noqa: ANN201
    store = ctx().store
    status = request.args.get("status") or None
    if status not in (None, *service.STATUSES):
        return api_error(400, f"status must be one of {', '.join(service.STATUSES)}")
    limit, offset = device_page()
    search = request.args.get("q") or None
    found = service.list_devices(store, search=search, status=status, limit=limit + 1, offset=offset)
    counts = querylog.counts_since(store, time.time() - 86400)
    routers = service.routers(store)
    response = jsonify([views.device(d, counts.get(d.mac), routers) for d in found[:limit]])
    if len(found) > limit:  # the next page, as GitHub's API says it
        args = {"q": search, "status": status, "limit": limit, "offset": offset + limit}
        response.headers["Link"] = f'<{url_for("api.devices", **args)}>; rel="next"'
    return response


@bp.get("/devices/<mac>")
def device(mac: str):  # noqa: ANN201
    store = ctx().store
    try:
        detail = service.get_device(store, mac)
    except service.NotFound:
        return api_error(404, f"no device {mac}")
    timeline = overview.domain_timeline(store, detail.device.mac)
    return jsonify(views.device_detail(detail, timeline, service.routers(store)))


@bp.patch("/devices/<mac>")
def device_update(mac: str):  # noqa: ANN201
    """``{"name": "..."}`` renames (empty or null clears the owner's name: the device's own best name shows again);
    ``{"status": "approved"}`` approves."""
    body = json_body(("name", "status"))
    if not body:
        return api_error(400, "expected an object with 'name' and/or 'status'")
    fields = _texts(body, {"name": service.NAME_MAX, "status": None})  # set_status checks the status itself
    store = ctx().store
    try:
        if "name" in fields:  # checked first: a refused name must not leave the status changed
            service.owner_text("name", fields["name"], service.NAME_MAX)
        if "status" in fields:
            service.set_status(store, mac, fields["status"], by="api", publish=bool(ctx().cfg.mqtt.url))
        if "name" in fields:
            service.rename(store, mac, fields["name"])
    except service.NotFound:
        return api_error(404, f"no device {mac}")
    except ValueError as exc:
        return api_error(400, str(exc))
    return device(mac)


@bp.put("/devices/<mac>/label")
def device_label(mac: str):  # noqa: ANN201
    """Confirm or correct the identity: ``{"manufacturer", "device_type", "category"}``; a field left out or
    null is cleared."""
    body = json_body(tuple(service.LABEL_MAX))
    if not body:
        return api_error(400, "expected an object with 'manufacturer', 'device_type' and/or 'category'")
    fields = _texts(body, service.LABEL_MAX)
    try:
        service.label(
            ctx().store,
            mac,
            manufacturer=fields.get("manufacturer", ""),
            device_type=fields.get("device_type", ""),
            category=fields.get("category", ""),
        )
    except service.NotFound:
        return api_error(404, f"no device {mac}")
    except ValueError as exc:
        return api_error(400, str(exc))
    return device(mac)


@bp.delete("/devices/<mac>")
def device_forget(mac: str):  # noqa: ANN201
    try:
        service.forget(ctx().store, mac)
    except service.NotFound:
        return api_error(404, f"no device {mac}")
    return "", 204


@bp.get("/queries")
def queries():  # noqa: ANN201
    args = request.args
    verdict = args.get("verdict") or None
    if verdict not in (None, *VERDICTS):
        return api_error(400, f"verdict must be one of {', '.join(VERDICTS)}")
    rows = querylog.recent(
        ctx().store,
        mac=device_key(args.get("mac", "")) or None,
        search=args.get("q") or None,
        verdict=verdict,
        limit=int_arg("limit", 100, 1, 1000),
        before_id=before_id(),
    )
    return jsonify([views.query(q) for q in rows])


@bp.get("/alerts")
def alerts():  # noqa: ANN201
    limit = int_arg("limit", 100, 1, 1000)
    return jsonify([views.alert(a) for a in recent_alerts(ctx().store, limit)])


@bp.get("/model")
def model():  # noqa: ANN201
    return jsonify(asdict(overview.model_status(ctx().store, ctx().cfg)))


@bp.get("/tokens")
def tokens():  # noqa: ANN201
    return jsonify([_token(t) for t in accounts.list_tokens(ctx().store)])


@bp.post("/tokens")
def token_create():  # noqa: ANN201
    body = json_body(("name", "scope", "expires_in_days"))
    fields = _texts(body, {"name": None, "scope": None})  # a list or object would be stored as its repr
    days = body.get("expires_in_days", accounts.TOKEN_DEFAULT_DAYS)  # null: never
    try:
        token, secret = accounts.create_token(ctx().store, fields.get("name", ""), fields.get("scope", ""), days)
    except ValueError as exc:
        return api_error(400, str(exc))
    return jsonify(_token(token) | {"token": secret}), 201


@bp.delete("/tokens/<int:token_id>")
def token_revoke(token_id: int):  # noqa: ANN201
    try:
        accounts.revoke_token(ctx().store, token_id)
    except accounts.TokenNotFound:
        return api_error(404, f"no live token {token_id}")
    return "", 204


def json_body(fields: tuple[str, ...] | None = None) -> dict:
    """The request's JSON object; 400 for anything else, also for nesting deeper than the parser's recursion
    (``[[[[...`` within the 64 KiB body limit raised RecursionError, a 500). With ``fields``, also 400 for a key
    not among them: a misspelt one (``timezone``, ``expires_in``) was ignored, and the request carried out with
    the default instead (a schedule in UTC, a token for 90 days)."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        abort(400, "the JSON body is nested too deeply")
    if not isinstance(body, dict):
        abort(400, "expected a JSON object with Content-Type: application/json")
    unknown = sorted(set(body) - set(fields)) if fields is not None else []
    if unknown:
        abort(400, f"unknown field {unknown[0]!r} (expected {', '.join(fields)})")
    return body


def _texts(body: dict, limits: dict[str, int | None]) -> dict[str, str]:
    """The fields of ``limits`` that ``body`` has, as text (null is ""). Aborts with 400 for any other JSON type
    (its Python repr would be stored) or for a text longer than its limit, if it has one."""
    out = {}
    for key, limit in limits.items():
        if key not in body:
            continue
        value = body[key]
        if value is None:
            value = ""
        if not isinstance(value, str):
            abort(400, f"'{key}' must be a string or null")
        if limit is not None and len(value.strip()) > limit:
            abort(400, f"'{key}' is longer than {limit} characters")
        out[key] = value
    return out


def _token(t) -> dict:  # noqa: ANN001 - an ApiToken
    return {
        "id": t.id,
        "name": t.name,
        "scope": t.scope,
        "created_at": t.created_at,
        "last_used_at": t.last_used_at,
        "expires_at": t.expires_at,
        "expired": accounts.is_expired(t),
    }
