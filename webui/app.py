"""The Flask app factory: ``create_app(store, cfg)`` builds the web UI and the JSON API on one store."""

from __future__ import annotations

import logging
import secrets
import stat
import time
from datetime import timedelta
from pathlib import Path

import dnslib
from flask import Flask, Response, has_request_context, request
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy.exc import OperationalError

from gateway.config import Config
from gateway.statedir import write_private
from gateway.store.db import BUSY_TIMEOUT_S, Store, database_busy
from webui import security, views
from webui.context import WebContext

log = logging.getLogger(__name__)
SECRET_KEY_FILE = "web-secret-key"  # noqa: S105 - a file name
MAX_BODY_BYTES = 64 * 1024  # forms and JSON bodies are small; refuse anything bigger


def create_app(store: Store, cfg: Config) -> Flask:
    """The app, on the daemon's database."""
    # The blueprints import this module's siblings; the policy modules add their routes to api and pages.
    from webui import api, auth_views, openapi, pages, policy_api, policy_pages  # noqa: F401

    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=load_secret_key(cfg.state_dir),
        SESSION_COOKIE_NAME="iotgw_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        # Secure only on a request that came over HTTPS (see _SessionCookie): waitress serves plain HTTP on the
        # LAN (a Pi has no certificate a browser trusts), and a Secure cookie is never sent back over HTTP.
        SESSION_COOKIE_SECURE=False,
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=security.SESSION_LIFETIME_S),
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
    )
    app.session_interface = _SessionCookie()
    # Everything rendered is escaped, whatever a template's file name: names come from the network.
    app.jinja_env.autoescape = True
    app.json.sort_keys = False  # keep the documented field order in API answers
    app.jinja_env.filters["when"] = views.when
    app.jinja_env.filters["ago"] = _ago
    app.jinja_env.filters["pct"] = views.pct
    app.jinja_env.filters["qtype"] = _qtype
    app.jinja_env.filters["name_source"] = views.NAME_SOURCES
    app.jinja_env.filters["address_source"] = views.ADDRESS_SOURCES
    app.jinja_env.filters["alert_kind"] = views.ALERT_KINDS
    app.jinja_env.filters["alert_details"] = views.alert_details
    app.jinja_env.filters["signal"] = views.SIGNALS
    app.jinja_env.filters["decided_after"] = views.decided_after
    app.jinja_env.filters["answer"] = views.answer_words
    app.jinja_env.filters["first_asked"] = views.first_asked
    app.extensions["iotgw"] = WebContext(store=store, cfg=cfg)
    security.install(app)
    app.register_blueprint(auth_views.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(openapi.bp)
    app.register_error_handler(OperationalError, _database_busy)
    return app


def _database_busy(exc: OperationalError):  # noqa: ANN202 - a response
    """A 503 that says to try again, not a 500, when another process (the daemon, a CLI command, a backup) held
    the database's write lock too long: nothing was changed. Any other database error stays a 500."""
    if not database_busy(exc):
        raise exc
    log.warning("%s %s: the database stayed locked by another process for %.0f s", request.method, request.path,
                BUSY_TIMEOUT_S)
    message = (f"The gateway's database is busy: another process held it for {BUSY_TIMEOUT_S:.0f} s. Nothing was "
               "changed; try again in a moment.")
    response = security.api_error(503, message)[0] if security.is_api() else Response(message + "\n",
                                                                                      mimetype="text/plain")
    response.status_code = 503
    response.headers["Retry-After"] = "5"  # a flush or a CLI command holds it for far less
    return response


class _SessionCookie(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure whenever the request came over HTTPS: a setting fixed at
    start would either drop every login over plain HTTP or send the cookie in clear text after HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or (has_request_context() and request.is_secure)


def load_secret_key(state_dir: Path) -> bytes:
    """The key that signs session cookies: made once, kept 0600 in the state directory, so sessions survive a
    restart and only the gateway's own user can forge one.

    A new key is written to a temporary file and linked into place, so a second process starting at the same
    moment finds either no key or a whole one, never an empty file; made by root (``sudo iotgw web``), the file
    belongs to the state directory's owner like every other file there.
    """
    path = Path(state_dir) / SECRET_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        key = secrets.token_bytes(32)
        if write_private(path, key, replace=False):  # False: another process made its key first; that one counts
            return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("%s was readable by others (mode %o); tightening to 0600", path, mode)
        path.chmod(0o600)
    key = path.read_bytes()
    if len(key) < 32:
        raise RuntimeError(f"{path}: secret key too short; delete the file to make a new one")
    return key


def _ago(ts: float | None) -> str:
    """How long ago, in the largest whole unit; "just now" within the second, where "0 s ago" read like a fault.
    A time ahead of the clock (the daemon's clock a moment ahead of the web UI's) is also just now."""
    if not ts:
        return "never"
    s = time.time() - ts
    if s < 1:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{int(s // size)} {unit} ago"
    return f"{int(s)} s ago"


def _qtype(number: int | None) -> str:
    """A query's record type by its name (A, AAAA, HTTPS): the log stores the number, which told an owner nothing."""
    return "—" if number is None else str(dnslib.QTYPE.get(number, number))
