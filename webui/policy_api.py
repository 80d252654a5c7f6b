"""``/api/v1/policies``: the filtering policy as JSON, through ``gateway.policies`` like the pages and the CLI.

Reads need a login or any token; writes need a read-write token or a session with its CSRF header
(``webui.security`` enforces both for every route). A change bumps the policy revision and the running daemon
applies it within a second.

A scope's GET carries an ``ETag`` (``policies.scope_etag``); a PUT with ``If-Match`` replaces the scope only if it
is still as read, else 412 and nothing changes, so a script's read-edit-write cannot drop a rule the CLI or the web
page added in between. A PUT without ``If-Match`` replaces the scope unconditionally, for simple clients.
"""

from __future__ import annotations

from dataclasses import asdict

from flask import jsonify, request

from gateway import policies
from gateway.devices import service
from policy.lists import FetchError
from webui.api import bp, json_body
from webui.context import ctx
from webui.security import api_error


@bp.errorhandler(ValueError)
def _refused(exc: ValueError):  # noqa: ANN202
    # Every refusal of gateway.policies says what is wrong; elsewhere a ValueError is a bug, not bad input.
    if not (request.endpoint or "").startswith("api.policy"):
        raise exc
    return api_error(400, str(exc))


@bp.errorhandler(policies.ScopeChanged)
def _changed_since_read(exc: policies.ScopeChanged):  # noqa: ANN202
    return api_error(412, str(exc))


@bp.errorhandler(FetchError)
def _list_not_fetched(exc: FetchError):  # noqa: ANN202
    return api_error(502, str(exc))  # the list's server failed, not the request


@bp.get("/policies")
def policies_overview():  # noqa: ANN201
    return jsonify(policies.overview(_data()))


@bp.get("/policies/global")
def policy_global():  # noqa: ANN201
    data = _data()
    return _scope_response(data, "global", policies.describe_scope(data, "global"))


@bp.put("/policies/global")
def policy_global_put():  # noqa: ANN201
    _replace("global")
    return policy_global()


@bp.get("/policies/device/<mac>")
def policy_device(mac: str):  # noqa: ANN201
    device_type, category = _identity(mac)
    data = _data()
    return _scope_response(data, policies.scope_key("device", mac),
                           policies.device_view(data, mac, device_type, category))


@bp.put("/policies/device/<mac>")
def policy_device_put(mac: str):  # noqa: ANN201
    _replace(policies.scope_key("device", mac))
    return policy_device(mac)


@bp.delete("/policies/device/<mac>")
def policy_device_delete(mac: str):  # noqa: ANN201
    return _clear(policies.scope_key("device", mac))


@bp.get("/policies/type/<device_type>")
def policy_type(device_type: str):  # noqa: ANN201
    data, key = _data(), policies.scope_key("type", device_type)
    return _scope_response(data, key, policies.describe_scope(data, key))


@bp.put("/policies/type/<device_type>")
def policy_type_put(device_type: str):  # noqa: ANN201
    _replace(policies.scope_key("type", device_type))
    return policy_type(device_type)


@bp.delete("/policies/type/<device_type>")
def policy_type_delete(device_type: str):  # noqa: ANN201
    return _clear(policies.scope_key("type", device_type))


@bp.get("/policies/tag/<tag>")
def policy_tag(tag: str):  # noqa: ANN201
    data, key = _data(), policies.scope_key("tag", tag)
    return _scope_response(data, key, policies.describe_scope(data, key))


@bp.put("/policies/tag/<tag>")
def policy_tag_put(tag: str):  # noqa: ANN201
    _replace(policies.scope_key("tag", tag))
    return policy_tag(tag)


@bp.delete("/policies/tag/<tag>")
def policy_tag_delete(tag: str):  # noqa: ANN201
    return _clear(policies.scope_key("tag", tag))


@bp.post("/policies/lists")
def policy_list_add():  # noqa: ANN201
    """``{"id", "url"}`` (fetched now) or ``{"id", "file"}`` (a file name in ``<state_dir>/lists``)."""
    body = json_body(("id", "url", "file", "category"))
    report = policies.add_list(
        _dir(),
        _text(body, "id"),
        path=_text(body, "file") or None,
        url=_text(body, "url") or None,
        category=_text(body, "category") or None,
    )
    return jsonify(asdict(report)), 201


@bp.post("/policies/lists/<list_id>/update")
def policy_list_update(list_id: str):  # noqa: ANN201
    return jsonify(asdict(policies.update_list(_dir(), list_id)))


@bp.delete("/policies/lists/<list_id>")
def policy_list_delete(list_id: str):  # noqa: ANN201
    policies.remove_list(_dir(), list_id)
    return "", 204


@bp.put("/policies/schedules/<name>")
def policy_schedule_put(name: str):  # noqa: ANN201
    """``{"time_zone": "Europe/Berlin", "days": {"mon": "22:00-07:00", ...}}`` (Monday 22:00 to Tuesday 07:00)."""
    body = json_body(("time_zone", "days"))
    days = body.get("days", {})
    if not isinstance(days, dict) or not all(isinstance(v, str) for v in days.values()):
        return api_error(400, 'days: expected an object like {"mon": "21:00-24:00"}')
    policies.set_schedule(_dir(), name, _text(body, "time_zone") or "UTC", [f"{d}={r}" for d, r in days.items()])
    return jsonify(policies.overview(_data())["schedules"][name.strip()])  # saved under its name stripped


@bp.delete("/policies/schedules/<name>")
def policy_schedule_delete(name: str):  # noqa: ANN201
    policies.remove_schedule(_dir(), name)
    return "", 204


@bp.put("/policies/quarantine")
def policy_quarantine_put():  # noqa: ANN201
    """``{"enabled": true, "allow": ["pool.ntp.org", ...]}`` (``allow`` optional: keeps the list)."""
    body = json_body(("enabled", "allow"))
    allow = body.get("allow")
    if not isinstance(body.get("enabled"), bool):
        return api_error(400, "enabled: expected true or false")
    if allow is not None and not (isinstance(allow, list) and all(isinstance(n, str) for n in allow)):
        return api_error(400, "allow: expected a list of domain names")
    allowed = policies.set_quarantine(_dir(), body["enabled"], allow)
    return jsonify({"enabled": body["enabled"], "allow": allowed})


def _dir():  # noqa: ANN202
    return ctx().cfg.state_dir


def _data():  # noqa: ANN202
    return policies.load(_dir())


def _scope_response(data, scope: str, payload: dict):  # noqa: ANN001, ANN202 - PolicySet, a response
    """``payload`` as JSON with the scope's ETag, which a later PUT may send back in If-Match."""
    response = jsonify(payload)
    response.set_etag(policies.scope_etag(data, scope))
    return response


def _replace(scope: str) -> None:
    """PUT: replace ``scope`` with the body, only if it is still as read when the request has If-Match."""
    body = json_body()
    # "*" matches any current representation, and every scope has one (an empty policy): no condition.
    tags = request.if_match
    if_match = None if "If-Match" not in request.headers or tags.star_tag else tags.as_set()
    policies.replace_scope(_dir(), scope, body, if_match)


def _clear(scope: str):  # noqa: ANN202
    if not policies.clear_scope(_dir(), scope):
        return api_error(404, f"{scope} has no policy of its own")
    return "", 204


def _identity(mac: str) -> tuple[str | None, str | None]:
    """The device's type and category as its policy sees them (the owner's label first), if it is known."""
    try:
        d = service.get_device(ctx().store, mac).device
    except service.NotFound:
        return None, None
    return d.label_device_type or d.device_type, d.label_category or d.category


def _text(body: dict, key: str) -> str:
    """``body[key]`` stripped; "" when absent or null. Not ``or ""``: false, 0 or [] then passed as left out, and a
    schedule sent with ``"time_zone": 0`` was saved in UTC."""
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a string")
    return value.strip()
