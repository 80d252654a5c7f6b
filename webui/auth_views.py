"""Login, logout and the first-visit setup page."""

from __future__ import annotations

import logging
import math
import time
from urllib.parse import urlsplit

from flask import Blueprint, g, redirect, render_template, request, session, url_for

from gateway import accounts
from webui.context import ctx
from webui.security import device_cookie, give_device_cookie, start_session

bp = Blueprint("auth", __name__)
log = logging.getLogger(__name__)


@bp.route("/login", methods=["GET", "POST"])
def login():  # noqa: ANN201
    error, status = None, 200
    if request.method == "POST":
        username = request.form.get("username", accounts.ADMIN).strip() or accounts.ADMIN
        # Read before the password is checked: a password set anew during the check must leave this login's
        # session and device cookie refused, as it does every other (start_session, give_device_cookie).
        state = accounts.session_state(ctx().store, username)
        try:
            # The TCP peer: waitress is told to trust no proxy header, so a client cannot name another's address.
            ok = accounts.verify_login(ctx().store, username, request.form.get("password", ""), request.remote_addr,
                                       device=device_cookie())
        except accounts.LockedOut as exc:
            log.warning("login refused for %r from %s: locked out (%s)", username[:64], request.remote_addr,
                        exc.cause)
            error, status = locked_out_message(exc), 429
        else:
            if ok:
                start_session(username, state)
                return give_device_cookie(redirect(_local(request.args.get("next"))), username,
                                          state[0] if state else None)
            # For an audit or fail2ban; %r keeps a hostile user name on one line. Never the password.
            log.warning("failed login for %r from %s", username[:64], request.remote_addr)
            error, status = "Wrong user name or password.", 401
    return render_template("login.html", error=error), status


@bp.post("/logout")
def logout():  # noqa: ANN201
    """Ends the session on the server too (every session of the user), so a copied cookie stops working."""
    if g.principal is not None and g.principal.token_id is None:
        accounts.end_sessions(ctx().store, g.principal.name)
    session.clear()
    return redirect(url_for("auth.login"))


@bp.route("/setup", methods=["GET", "POST"])
def setup():  # noqa: ANN201
    store = ctx().store
    if accounts.has_password(store):
        return redirect(url_for("auth.login"))
    error = None
    if request.method == "POST":
        password = request.form.get("password", "")
        if password != request.form.get("confirm", ""):
            error = "The two passwords differ."
        else:
            try:
                created = accounts.set_initial_password(store, password)
            except ValueError as exc:
                error = str(exc).capitalize() + "."
            else:
                if not created:
                    return redirect(url_for("auth.login"))
                start_session(accounts.ADMIN)
                return give_device_cookie(redirect(url_for("pages.dashboard")), accounts.ADMIN)
    return render_template(
        "setup.html", error=error, min_length=accounts.MIN_PASSWORD_LENGTH
    ), 400 if error else 200


def locked_out_message(exc: accounts.LockedOut) -> str:
    """What the login form and the password change say to a locked-out client: until when, and whether it is its
    own failures or the account's. It speaks of the client's own browser or address only, never of others."""
    until = time.strftime("%H:%M", time.localtime(exc.until))
    minutes = max(1, math.ceil((exc.until - time.time()) / 60))
    when = f"Try again at {until} (in {minutes} min)."
    if exc.cause == "device":
        return f"Too many failed logins from this browser. {when}"
    if exc.cause == "address":
        return f"Too many failed logins from this address. {when}"
    return (
        f"Too many failed logins to this account from many addresses: only a browser that has logged in to it "
        f"before is let in until {until} (in {minutes} min)."
    )


def _local(target: str | None) -> str:
    """Only a path on this site, else the dashboard: ``//evil.example`` or ``https://...`` would make login an
    open redirect, and browsers drop tabs and newlines from a URL (``/%09/evil.example`` is ``//evil.example``)
    while a CR or LF cannot go into a header at all."""
    if not target or not target.isprintable() or " " in target or "\\" in target:
        return url_for("pages.dashboard")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/") or parts.path.startswith("//"):
        return url_for("pages.dashboard")
    return target
