"""Who may do what: login on every route, CSRF on every write made with a session, bearer tokens for
scripts, clients on the LAN only, requests only under the gateway's own names (no DNS rebinding), and the
security headers on every response.

Checked in one ``before_request`` hook rather than per-view decorators, so a new route is protected by default
and a test can enumerate the URL map to prove it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import time
from urllib.parse import urlsplit

from flask import Flask, Response, g, jsonify, redirect, render_template, request, session, url_for
from werkzeug.exceptions import HTTPException

from gateway import accounts
from gateway.config import (
    DEFAULT_PATH,
    Config,
    ConfigError,
    link_local_interfaces,
    on_lan_link,
    parse_hostport,
    peer_ip,
)
from webui.context import ctx

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Reachable without a session: the login and setup forms (still CSRF-checked) and the CSS/JS they need.
PUBLIC_ENDPOINTS = frozenset({"auth.login", "auth.setup", "static"})
# Token management needs the admin's session: a leaked token must not be able to mint itself successors.
SESSION_ONLY_ENDPOINTS = frozenset({"api.tokens", "api.token_create", "api.token_revoke"})
SESSION_LIFETIME_S = 12 * 3600
# The device cookie a browser gets at login (``gateway.accounts`` has the scheme): it outlives the session by far,
# since what it proves is that this browser once typed the password.
DEVICE_COOKIE = "iotgw_device"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
# Names that only the LAN resolves (mDNS, router and RFC 8375 home domains): no one on the internet can point one
# at the gateway, so they need no configuration. Single-label names (``raspberrypi``) are local in the same way.
LOCAL_SUFFIXES = (".local", ".lan", ".home", ".home.arpa", ".internal", ".localdomain", ".localhost")
# What a page's error says when its view gave no reason of its own (Werkzeug's texts speak to developers).
ERROR_TITLES = {400: "This request cannot be handled", 404: "Nothing here", 405: "Not possible here"}
ERROR_TEXTS = {
    400: "Something in the address or the form is not what this page expects. Go back and try again.",
    404: "There is nothing at this address: the device may have been forgotten, or the link is out of date.",
    405: "This address does not take that kind of request: use the page's own buttons and links.",
}

CSP = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",  # no inline script anywhere: an injected <script> in a device name cannot run
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def install(app: Flask) -> None:
    app.before_request(_authorize)
    app.after_request(_add_headers)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(ConfigError, _broken_policy_file)
    app.jinja_env.globals["csrf_token"] = csrf_token


def csrf_token() -> str:
    """The session's CSRF token (created on first use, also for the anonymous login form)."""
    if CSRF_FIELD not in session:
        session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return session[CSRF_FIELD]


def start_session(username: str, state: tuple[float, int] | None = None) -> None:
    """After a successful login: a fresh session (new CSRF token) bound to the password. ``state`` is the
    account's ``session_state`` as read before the password was checked (else it is read now): a password set
    anew meanwhile then leaves this session refused, as it does every other, rather than bound to the new one."""
    session.clear()
    session.permanent = True
    session["user"] = username
    if state is None:
        state = accounts.session_state(ctx().store, username)
    session["pwd_at"], session["gen"] = state if state else (None, None)
    session["login_at"] = time.time()
    csrf_token()


def device_cookie() -> str | None:
    """The device cookie the request carries, if any (``accounts.verify_login`` decides whether it is valid)."""
    return request.cookies.get(DEVICE_COOKIE) or None


def give_device_cookie(response: Response, username: str, password_changed_at: float | None = None) -> Response:
    """After a login: a new device cookie for this browser, replacing the one it presented. HttpOnly (no script,
    an injected one included, can read it), SameSite=Strict (no other site's page sends it along) and Secure over
    HTTPS, as the session cookie is; it lasts ``accounts.DEVICE_LIFETIME_S``, as its row does. None given if the
    password changed since ``password_changed_at`` (``accounts.issue_device_cookie``)."""
    secret = accounts.issue_device_cookie(ctx().store, username, replacing=device_cookie(),
                                          password_changed_at=password_changed_at)
    if secret is None:
        return response
    response.set_cookie(DEVICE_COOKIE, secret, max_age=accounts.DEVICE_LIFETIME_S, path="/", httponly=True,
                        samesite="Strict", secure=request.is_secure)
    return response


def from_lan() -> bool:
    """True for loopback and the LAN prefixes of ``[dns].lan``, a link-local one only from a LAN link (see
    ``config.on_lan_link``). The peer address is waitress's socket peer; X-Forwarded-For is deliberately not
    trusted."""
    peer = request.remote_addr or ""
    try:
        # The zone dropped: webui.server's fix_addr wrote the interface a link-local peer came in on there
        addr = peer_ip(peer)
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    if not any(addr in ipaddress.ip_network(prefix, strict=False) for prefix in ctx().cfg.dns.lan):
        return False
    if addr.version == 6 and addr.is_link_local:
        return on_lan_link(peer.partition("%")[2], _lan_links(ctx().cfg))
    return True


def _lan_links(cfg: Config) -> list[str]:
    """The interfaces a link-local peer is trusted on: the DNS server's (``config.link_local_interfaces``), with the
    zone of ``[web] listen`` besides."""
    links = link_local_interfaces(cfg.dns, cfg.capture.interface)
    try:
        zone = parse_hostport(cfg.web.listen, 8080)[0].partition("%")[2]
    except ValueError:  # `iotgw web` refuses it at start; an app served by a test listens elsewhere
        return links
    return [*links, zone] if zone else links


def host_allowed(host: str, configured: list[str]) -> bool:
    """Whether the web UI answers a request whose Host header is ``host``.

    DNS rebinding: a web page from the internet makes its own name resolve to the gateway and then reads and
    posts as a same-origin page, from the browser of someone on the LAN (who passes the LAN check and can
    reach the password-less first-visit setup). Its Host header is then the attacker's name, so only the
    gateway's addresses, LAN-only names and the names of ``[web] hosts`` are answered.
    """
    try:
        name = (urlsplit("//" + host).hostname or "").rstrip(".")
    except ValueError:  # a malformed port or bracket
        return False
    if not name:
        return False
    try:
        ipaddress.ip_address(name.split("%")[0])
        return True
    except ValueError:
        pass
    if name == "localhost" or "." not in name or name.endswith(LOCAL_SUFFIXES):
        return True
    for entry in configured:
        entry = entry.lower().rstrip(".")
        if name == entry.lstrip(".") or (entry.startswith(".") and name.endswith(entry)):
            return True
    return False


def is_api() -> bool:
    return request.path.startswith("/api/")


def api_error(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status


def _authorize():  # noqa: ANN202 - None or a response
    g.principal = None
    cfg = ctx().cfg
    if not host_allowed(request.host, cfg.web.hosts):
        log.warning("refused a request for host %r from %s", request.host[:100], request.remote_addr)
        return _refuse(
            403, f"This gateway does not answer to the name {request.host[:100]!r}. If it is one of its names, "
            f"add it to hosts in the [web] section of {_config_file(cfg)}."
        )
    if not from_lan():
        # The admin UI is the LAN's, like the DNS server: a port forwarded by mistake reaches nothing.
        log.warning("refused a web request from %s, outside [dns] lan", request.remote_addr)
        return _refuse(403, f"This gateway's web UI answers its LAN only ([dns] lan in {_config_file(cfg)}).")
    if request.endpoint == "static":
        return None
    if _has_nul():
        return _refuse(400, "A NUL character is in the request: no name, search or password holds one.")
    if "Authorization" in request.headers:
        return _authorize_token()
    store = ctx().store
    if not accounts.has_password(store):
        if request.endpoint != "auth.setup":
            return (
                api_error(401, "no password set: open the web UI to set one")
                if is_api()
                else redirect(url_for("auth.setup"))
            )
        return _check_csrf()
    g.principal = _session_principal()
    if g.principal is None and request.endpoint not in PUBLIC_ENDPOINTS:
        if is_api():
            return api_error(401, "login required")
        if request.method in SAFE_METHODS:
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        return _refuse(401, "Login required.")
    return _check_csrf()


def _has_nul() -> bool:
    """Whether the path, a query argument or a form field holds a NUL, which PostgreSQL refuses in any query
    parameter: a login name or a search with one was a 500, before a login too. Login's ``next`` never reaches
    the database: a bad one only sends the login to the dashboard."""
    fields = [*request.args.items(multi=True), *request.form.items(multi=True)]
    fields = [(key, value) for key, value in fields if key != "next"]
    return "\x00" in request.path or any("\x00" in key or "\x00" in value for key, value in fields)


def _authorize_token():  # noqa: ANN202
    scheme, _, secret = request.headers["Authorization"].partition(" ")
    if not is_api() or scheme.lower() != "bearer" or not secret.strip():
        return _refuse(401, "Bearer tokens are accepted on /api/ only, as 'Authorization: Bearer TOKEN'.")
    if request.endpoint in SESSION_ONLY_ENDPOINTS:
        return api_error(403, "tokens are managed with a login session or `iotgw user token`")
    principal = accounts.authenticate_token(ctx().store, secret.strip())
    if principal is None:
        return api_error(401, "unknown, revoked or expired token")
    if request.method not in SAFE_METHODS and not principal.can_write:
        return api_error(403, "this token is read-only")
    g.principal = principal  # no CSRF check: a browser never attaches this header on its own
    return None


def _config_file(cfg: Config) -> str:
    return cfg.source if cfg.source != "(defaults)" else str(DEFAULT_PATH)


def _session_principal() -> accounts.Principal | None:
    user = session.get("user")
    if not user:
        return None
    state = accounts.session_state(ctx().store, user)
    # A password change or a logout ends every older session; the signed cookie alone would otherwise live on.
    if state is None or (session.get("pwd_at"), session.get("gen")) != state:
        return None
    if time.time() - session.get("login_at", 0) > SESSION_LIFETIME_S:
        return None
    return accounts.Principal(name=user, can_write=True)


def _check_csrf():  # noqa: ANN202
    if request.method in SAFE_METHODS:
        return None
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    expected = session.get(CSRF_FIELD, "")
    # Compared as bytes: compare_digest refuses a str with a non-ASCII character (TypeError), and a forged token
    # "é" made a 500, before any login too.
    if not sent or not expected or not hmac.compare_digest(_utf8(sent), _utf8(expected)):
        return _refuse(403, "Missing or wrong CSRF token: reload the page and try again.")
    return None


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate is refused like any wrong token, not raised


def _refuse(status: int, message: str):  # noqa: ANN202
    if is_api():
        return api_error(status, message)
    return Response(message + "\n", status=status, mimetype="text/plain")


def _http_error(exc: HTTPException):  # noqa: ANN202 - a response, or the exception's own HTML page
    """Under /api/, every error is ``{"error": ...}`` JSON, also for a path or a method no route has (those
    came as Werkzeug's HTML page). A page's error is shown in the site's layout with a way back: Werkzeug's bare
    page had no navigation and, for a forgotten device, only "check your spelling"."""
    if is_api():
        return api_error(exc.code or 500, exc.description or exc.name)
    code = exc.code or 500
    if code < 400:  # a routing redirect (a missing trailing slash) is no error
        return exc
    default = type(exc).description  # the class's generic text, as opposed to abort(code, "what was wrong")
    message = exc.description if exc.description != default else ERROR_TEXTS.get(code, exc.description)
    title = ERROR_TITLES.get(code, exc.name)
    return render_template("error.html", code=code, name=exc.name, title=title, message=message), code


def _broken_policy_file(exc: ConfigError):  # noqa: ANN202
    """A policy file edited by hand into something unreadable: the Devices list, every device page and the
    policy API need it, so say what is wrong with it (they were a bare 500)."""
    log.error("%s", exc)
    return _refuse(500, f"The policy file cannot be read: {exc}. Fix it, or move it aside to start again from an "
                        "empty policy.")


def _add_headers(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"  # pages carry private data; keep them out of caches
    return response
