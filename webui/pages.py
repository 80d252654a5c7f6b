"""The server-rendered pages. Each view calls service functions and hands plain data to a template."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from flask import (
    Blueprint,
    abort,
    flash,
    redirect,
    render_template,
    request,
    send_file,
    send_from_directory,
    session,
    url_for,
)

from gateway import accounts, overview, policies
from gateway.alerts import recent_alerts
from gateway.devices import device_key, service
from gateway.store import querylog
from gateway.store.db import INT64_LIMIT, Store
from gateway.store.schema import Query
from webui import charts, views
from webui.auth_views import locked_out_message
from webui.context import ctx
from webui.security import device_cookie, give_device_cookie

bp = Blueprint("pages", __name__)
PAGE_SIZE = 100
DEVICE_PAGE_SIZE = 200
MAX_DEVICE_PAGE = 1000
# A device's page lists its newest identifications (the API gives service.DETAIL_ROWS): enough to see the answer
# settle and each new model's, short enough to read.
IDENTIFICATIONS_SHOWN = 10
VERDICTS = ("allowed", "blocked", "refused", "ratelimited")


def _int_arg(name: str) -> int | None:
    """The integer query argument ``name``, or None when absent; 400 when it is not an integer."""
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        abort(400, f"{name} must be an integer")


def before_id() -> int | None:
    """The query log page's ``before`` cursor (a query id), or None; 400 for anything no row id can be, which
    the database driver would otherwise refuse with an OverflowError (a 500)."""
    value = _int_arg("before")
    if value is not None and not -INT64_LIMIT <= value < INT64_LIMIT:
        abort(400, "before is out of range")
    return value


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """An integer query argument clamped to [low, high]; 400 if it is not an integer at all."""
    value = _int_arg(name)
    return default if value is None else max(low, min(value, high))


def device_page() -> tuple[int, int]:
    """``limit`` (default 200, at most 1000) and ``offset`` of a device list page."""
    return int_arg("limit", DEVICE_PAGE_SIZE, 1, MAX_DEVICE_PAGE), int_arg("offset", 0, 0, INT64_LIMIT - 1)


@bp.get("/")
def dashboard():  # noqa: ANN201
    store = ctx().store
    now = time.time()
    new_devices = service.list_devices(store, status="new", limit=10)
    return render_template(
        "dashboard.html",
        summary=overview.summary(store, now),
        chart=charts.bars(overview.queries_over_time(store, now=now)),
        new_devices=[views.device(d) for d in new_devices],
        alerts=_named_alerts(store, 10),
    )


def _named_alerts(store: Store, limit: int) -> list[dict]:
    """The newest alerts, each with its device's name: by its MAC alone the owner could not tell which device
    an alert was about once they had named it."""
    found = recent_alerts(store, limit)
    macs = sorted({a.mac for a in found if a.mac})
    names = {d.mac: d.name for d in service.list_devices(store, macs=macs)} if macs else {}
    return [views.alert(a) | {"name": names.get(a.mac)} for a in found]


@bp.get("/devices")
def devices():  # noqa: ANN201
    store = ctx().store
    search = request.args.get("q", "").strip() or None
    status = request.args.get("status") or None
    if status not in (None, *service.STATUSES):
        abort(400)
    limit, offset = device_page()
    # One more than shown tells whether there is a next page.
    found = service.list_devices(store, search=search, status=status, limit=limit + 1, offset=offset)
    counts = querylog.counts_since(store, time.time() - 86400)
    modes = policies.device_modes(policies.load(ctx().cfg.state_dir))
    routers = service.routers(store)
    rows = [views.device(d, counts.get(d.mac), routers) | {"mode": modes.get(d.mac, "default")}
            for d in found[:limit]]
    return render_template(
        "devices.html",
        devices=rows,
        q=search or "",
        status=status or "",
        statuses=service.STATUSES,
        limit=limit if limit != DEVICE_PAGE_SIZE else None,
        more=offset + limit if len(found) > limit else None,
    )


@bp.get("/devices/<mac>")
def device(mac: str):  # noqa: ANN201
    store = ctx().store
    try:
        detail = service.get_device(store, mac)
    except service.NotFound:
        abort(404)
    d = detail.device
    data = views.device_detail(detail, overview.domain_timeline(store, d.mac), service.routers(store))
    queries = _shown_queries(querylog.recent(store, mac=d.mac, limit=50))
    # the page says how many there are: past DETAIL_ROWS, get_device's list no longer tells
    recorded = service.identification_count(store, d.mac)
    history = views.identification_history(data["identifications"], IDENTIFICATIONS_SHOWN,
                                           complete=recorded == len(detail.identifications))
    policy_data = policies.load(ctx().cfg.state_dir)
    editor = None
    if not d.mac.startswith("ip:"):  # a device known only by its address has no policy of its own yet
        editor = policies.device_view(
            policy_data, d.mac, d.label_device_type or d.device_type, d.label_category or d.category
        )
    return render_template(
        "device.html",
        d=data,
        queries=queries,
        history=history,
        recorded=recorded,
        statuses=service.STATUSES,
        policy=editor,
        modes=policies.MODES,
        schedules=sorted(policy_data.schedules),
    )


@bp.post("/devices/<mac>/name")
def device_rename(mac: str):  # noqa: ANN201
    return _device_action(
        mac, lambda store, m: service.rename(store, m, request.form.get("name", "")), "Renamed."
    )


@bp.post("/devices/<mac>/status")
def device_status(mac: str):  # noqa: ANN201
    status = request.form.get("status", "")
    publish = bool(ctx().cfg.mqtt.url)
    return _device_action(
        mac, lambda store, m: service.set_status(store, m, status, by="web", publish=publish),
        f"Status set to {status}.",
    )


@bp.post("/devices/<mac>/label")
def device_label(mac: str):  # noqa: ANN201
    form = request.form
    return _device_action(
        mac,
        lambda store, m: service.label(
            store,
            m,
            manufacturer=form.get("manufacturer", ""),
            device_type=form.get("device_type", ""),
            category=form.get("category", ""),
        ),
        "Identity recorded; it will be used for training.",
    )


@bp.post("/devices/<mac>/forget")
def device_forget(mac: str):  # noqa: ANN201
    try:
        service.forget(ctx().store, mac)
    except service.NotFound:
        abort(404)
    flash("Device forgotten.")
    return redirect(url_for("pages.devices"))


@bp.get("/queries")
def queries():  # noqa: ANN201
    args = request.args
    verdict = args.get("verdict") or None
    if verdict not in (None, *VERDICTS):
        abort(400)
    before = before_id()
    rows = querylog.recent(
        ctx().store,
        mac=device_key(args.get("mac", "")) or None,
        search=args.get("q") or None,
        verdict=verdict,
        limit=PAGE_SIZE,
        before_id=before,
    )
    return render_template(
        "queries.html",
        queries=_shown_queries(rows),
        q=args.get("q", ""),
        mac=args.get("mac", ""),
        verdict=verdict or "",
        verdicts=VERDICTS,
        older=rows[-1].id if len(rows) == PAGE_SIZE else None,
    )


def _shown_queries(rows: list[Query]) -> list[dict]:
    """Query log rows for a page, each with its rule as shown (its words, or the key of a row older than them)."""
    return [views.query(q) | {"rule_shown": q.rule_shown} for q in rows]


@bp.get("/alerts")
def alerts():  # noqa: ANN201
    return render_template("alerts.html", alerts=_named_alerts(ctx().store, 200))


@bp.get("/model")
def model():  # noqa: ANN201
    return render_template("model.html", m=overview.model_status(ctx().store, ctx().cfg))


@bp.get("/model/plots/<name>")
def model_plot(name: str):  # noqa: ANN201
    if not name.endswith(overview.PLOT_SUFFIXES):
        abort(404)
    return send_from_directory(overview.model_dir(ctx().cfg), name)  # refuses paths outside the directory


@bp.get("/settings")
def settings():  # noqa: ANN201
    return render_template(
        "settings.html",
        tokens=accounts.list_tokens(ctx().store),
        min_length=accounts.MIN_PASSWORD_LENGTH,
        lifetimes=accounts.TOKEN_LIFETIMES_DAYS,
        default_lifetime=accounts.TOKEN_DEFAULT_DAYS,
        is_expired=accounts.is_expired,
    )


@bp.post("/settings/password")
def settings_password():  # noqa: ANN201
    form = request.form
    store = ctx().store
    try:
        ok = accounts.verify_login(store, accounts.ADMIN, form.get("current", ""), request.remote_addr,
                                   device=device_cookie())
    except accounts.LockedOut as exc:  # the right current password is not heard either: say why
        flash(locked_out_message(exc))
        return redirect(url_for("pages.settings"))
    if not ok:
        flash("The current password is wrong.")
    elif form.get("password", "") != form.get("confirm", ""):
        flash("The two new passwords differ.")
    else:
        try:
            accounts.set_password(store, form.get("password", ""))
        except ValueError as exc:
            flash(str(exc).capitalize() + ".")
        else:
            # The change ended every session, this one included, and revoked every browser's device cookie: the
            # stale session's keys go, and the login page says why it is there (it was shown without a word, as
            # if the change had failed). The message rides in the session cookie, like every other flash.
            session.clear()
            flash("Password changed: every session was ended, this one too. Log in with the new password.")
            # This browser just proved the password, as a login does: it gets a new cookie. Left with none, it was
            # refused with every other client once guessing from many addresses (the usual reason to change a
            # password) locked the account again, minutes after the change.
            return give_device_cookie(redirect(url_for("auth.login")), accounts.ADMIN)
    return redirect(url_for("pages.settings"))


@bp.post("/settings/backup")
def settings_backup():  # noqa: ANN201
    """The file ``iotgw backup`` writes (without the query log), as a download. It holds the password hash and the
    federation key, so the current password is asked again, as for changing it: a session cookie alone (a browser
    left logged in) must not be enough to carry them off."""
    from gateway.backup import BackupError, create  # lazily: only this route needs it

    try:
        ok = accounts.verify_login(ctx().store, accounts.ADMIN, request.form.get("current", ""), request.remote_addr,
                                   device=device_cookie())
    except accounts.LockedOut as exc:
        flash(locked_out_message(exc))
        return redirect(url_for("pages.settings"))
    if not ok:
        flash("The current password is wrong.")
        return redirect(url_for("pages.settings"))
    cfg = ctx().cfg
    name = f"iotgw-backup-{time.strftime('%Y-%m-%d-%H%M%S')}.tar.gz"
    work = Path(tempfile.mkdtemp(prefix="iotgw-web-backup-"))
    try:
        create(cfg, work / name, config_file=Path(cfg.source) if Path(cfg.source).is_file() else None)
        backup = open(work / name, "rb")  # noqa: SIM115 - send_file closes it once sent
    except BackupError as exc:
        flash(str(exc))
        return redirect(url_for("pages.settings"))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the open file stays readable until sent; nothing is left behind
    response = send_file(backup, mimetype="application/gzip", as_attachment=True, download_name=name)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/settings/tokens")
def settings_token_create():  # noqa: ANN201
    try:
        days = accounts.parse_lifetime(request.form.get("expires", str(accounts.TOKEN_DEFAULT_DAYS)))
        token, secret = accounts.create_token(
            ctx().store, request.form.get("name", ""), request.form.get("scope", "read"), days
        )
    except ValueError as exc:
        flash(str(exc).capitalize() + ".")
        return redirect(url_for("pages.settings"))
    # Rendered directly, never redirected with the secret in a URL or stored in the session cookie.
    return render_template("token_created.html", token=token, secret=secret)


@bp.post("/settings/tokens/<int:token_id>/revoke")
def settings_token_revoke(token_id: int):  # noqa: ANN201
    try:
        accounts.revoke_token(ctx().store, token_id)
    except accounts.TokenNotFound:
        abort(404)
    flash("Token revoked.")
    return redirect(url_for("pages.settings"))


def _device_action(mac: str, action, done: str):  # noqa: ANN001, ANN202 - action(store, mac)
    try:
        action(ctx().store, mac)
    except service.NotFound:
        abort(404)
    except ValueError as exc:
        flash(str(exc))
    else:
        flash(done)
    return redirect(url_for("pages.device", mac=device_key(mac)))
