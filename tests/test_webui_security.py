"""The web UI's security, through Flask's test client on a real SQLite store (and waitress on a loopback port where
the server itself decides): every route needs a login, every write needs a CSRF token (or a read-write bearer
token), lockout of a guessing address, setup only from the LAN, headers, the body size limit."""

from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flask import url_for

from gateway import accounts
from gateway.devices import service
from gateway.store.db import Store
from gateway.store.schema import ApiToken
from tests.webui_seed import add_device, config
from webui.app import SECRET_KEY_FILE, create_app, load_secret_key
from webui.openapi import DOCUMENT
from webui.server import CONNECTION_LIMIT, MAX_CONNECTIONS_PER_CLIENT, MAX_READ_BYTES, serve_in_thread

PASSWORD = "correct horse battery"  # noqa: S105 - the test account's
MAC = "aa:bb:cc:00:00:01"
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
PRE_LOGIN = {"auth.login", "auth.setup"}
# What a forged write sends: enough for a device change and for a policy change to succeed if let through.
FORGED = {"name": "pwned", "status": "approved", "scope": "global", "action": "block", "target": "pwned.example",
          "mode": "paused", "rules": [{"action": "block", "kind": "all"}], "enabled": True}


@pytest.fixture
def env(tmp_path):
    cfg = config(tmp_path)
    store = Store(cfg.db_url)
    accounts.set_password(store, PASSWORD)
    add_device(store, MAC, hostname="plug", identified=True, queries=("a.example.com", "b.tracker.net"))
    token, _ = accounts.create_token(store, "victim", "read")
    app = create_app(store, cfg)
    app.testing = True
    yield app, store, token.id
    store.close()


def _csrf(client) -> str:  # noqa: ANN001
    client.get("/login")
    with client.session_transaction() as sess:
        return sess["csrf_token"]


def _login(client) -> str:  # noqa: ANN001
    token = _csrf(client)
    r = client.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 302, r.data
    with client.session_transaction() as sess:
        return sess["csrf_token"]


def _routes(app, methods: set[str]) -> list[tuple[str, str, str]]:  # noqa: ANN001
    """(endpoint, method, url) for every rule of the URL map with one of ``methods``."""
    values = {"mac": MAC, "token_id": 1, "name": "x.png", "device_type": "cam", "tag": "device_tv",
              "list_id": "ads"}
    out = []
    with app.test_request_context():
        for rule in app.url_map.iter_rules():
            if rule.endpoint == "static":
                continue
            url = url_for(rule.endpoint, **{a: values[a] for a in rule.arguments})
            out.extend((rule.endpoint, m, url) for m in sorted(rule.methods & methods))
    return out


def _state(app, store, token_id):  # noqa: ANN001, ANN202
    d = service.get_device(store, MAC).device
    policy_file = Path(app.extensions["iotgw"].cfg.state_dir) / "policy.json"
    live = [t.id for t in accounts.list_tokens(store)]
    return (
        d.name,
        d.status,
        d.label_device_type,
        token_id in live,
        accounts.verify_login(store, "admin", PASSWORD, "127.0.0.1"),
        policy_file.exists(),  # any policy write, refused or not, would create it
    )


def test_the_matrix_covers_every_write_route(env):
    app, _, _ = env
    endpoints = {e for e, _, _ in _routes(app, WRITE_METHODS)}
    # A sample, so that an empty enumeration cannot pass the tests below.
    assert {
        "pages.device_rename",
        "pages.device_status",
        "api.device_update",
        "api.device_forget",
        "api.token_create",
        "auth.logout",
        "auth.login",
        "pages.policy_rule_add",
        "pages.policy_mode",
        "api.policy_device_put",
        "api.policy_global_put",
        "api.policy_list_add",
    } <= endpoints


def test_every_write_route_rejects_requests_without_a_session(env):
    app, store, token_id = env
    before = _state(app, store, token_id)
    client = app.test_client()
    for endpoint, method, url in _routes(app, WRITE_METHODS):
        r = client.open(url, method=method, data={k: v for k, v in FORGED.items() if isinstance(v, str)})
        assert r.status_code in (401, 403), (endpoint, method, r.status_code)
        r = client.open(url, method=method, json=FORGED)
        assert r.status_code in (401, 403), (endpoint, method, r.status_code)
    assert _state(app, store, token_id) == before


def test_every_write_route_rejects_a_session_without_csrf_token(env):
    app, store, token_id = env
    client = app.test_client()
    _login(client)
    before = _state(app, store, token_id)
    for endpoint, method, url in _routes(app, WRITE_METHODS):
        for kwargs in (
            {"data": {k: v for k, v in FORGED.items() if isinstance(v, str)} | {"csrf_token": "forged"}},
            {"json": FORGED},
            {"json": FORGED, "headers": {"X-CSRF-Token": "forged"}},
        ):
            r = client.open(url, method=method, **kwargs)
            assert r.status_code == 403, (endpoint, method, kwargs, r.status_code)
    assert _state(app, store, token_id) == before
    assert client.get("/devices").status_code == 200  # still logged in: the refusals were CSRF, not auth


@pytest.mark.parametrize("where", ["form", "header"])
def test_a_csrf_token_with_a_non_ascii_character_is_refused_not_a_500(env, where):
    app, _, _ = env
    client = app.test_client()
    _csrf(client)
    form = {"username": "admin", "password": PASSWORD}
    if where == "form":
        r = client.post("/login", data=form | {"csrf_token": "\u00e9"})
    else:
        r = client.post("/login", data=form, headers={"X-CSRF-Token": "\u00e9"})
    assert r.status_code == 403 and b"CSRF" in r.data


def test_writes_with_the_csrf_token_succeed(env):
    app, store, _ = env
    client = app.test_client()
    token = _login(client)
    r = client.post(f"/devices/{MAC}/status", data={"status": "approved", "csrf_token": token})
    assert r.status_code == 302 and service.get_device(store, MAC).device.status == "approved"
    r = client.patch(f"/api/v1/devices/{MAC}", json={"name": "Kitchen plug"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and r.json["name"] == "Kitchen plug"


def test_every_page_and_api_read_needs_a_login(env):
    app, _, _ = env
    client = app.test_client()
    reads = [(e, u) for e, _, u in _routes(app, {"GET"}) if e not in PRE_LOGIN]
    assert len(reads) >= 15
    for endpoint, url in reads:
        r = client.get(url)
        if url.startswith("/api/"):
            assert r.status_code == 401 and "error" in r.json, endpoint
        else:
            assert r.status_code == 302 and r.location.startswith("/login"), endpoint


def test_read_token_reads_and_cannot_write(env):
    app, store, _ = env
    _, secret = accounts.create_token(store, "dashboard", "read")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {secret}"}
    r = client.get("/api/v1/devices", headers=auth)
    assert r.status_code == 200 and r.json[0]["mac"] == MAC
    r = client.patch(f"/api/v1/devices/{MAC}", json={"status": "approved"}, headers=auth)
    assert r.status_code == 403
    assert service.get_device(store, MAC).device.status == "new"


def test_write_token_writes_without_csrf_and_revocation_takes_effect(env):
    app, store, _ = env
    token, secret = accounts.create_token(store, "automation", "write")
    client = app.test_client()
    auth = {"Authorization": f"Bearer {secret}"}
    r = client.patch(f"/api/v1/devices/{MAC}", json={"status": "quarantined"}, headers=auth)
    assert r.status_code == 200 and service.get_device(store, MAC).device.status == "quarantined"
    # Tokens cannot manage tokens, and are not accepted on pages.
    assert (
        client.post("/api/v1/tokens", json={"name": "x", "scope": "write"}, headers=auth).status_code == 403
    )
    assert client.get("/devices", headers=auth).status_code == 401
    accounts.revoke_token(store, token.id)
    assert client.get("/api/v1/devices", headers=auth).status_code == 401


def test_a_token_expires_when_chosen_is_refused_like_a_revoked_one_and_listed_as_expired(env):
    app, store, victim_id = env
    client = app.test_client()
    csrf = _login(client)
    made = {}
    for days in (30, None):
        r = client.post("/api/v1/tokens", json={"name": f"d{days}", "scope": "read", "expires_in_days": days},
                        headers={"X-CSRF-Token": csrf})
        assert r.status_code == 201, r.json
        made[days] = r.json
    assert made[None]["expires_at"] is None and made[30]["expires_at"] > time.time() + 29 * 86400
    r = client.post("/api/v1/tokens", json={"name": "x", "scope": "read", "expires_in_days": 7},
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400 and "30, 90 or 365 days, or never" in r.json["error"]
    r = client.post("/settings/tokens", data={"name": "form", "scope": "read", "expires": "365", "csrf_token": csrf})
    assert r.status_code == 200 and "expires " in r.get_data(as_text=True)
    with store.transaction() as s:  # thirty days later
        s.get(ApiToken, made[30]["id"]).expires_at = time.time() - 1
    bearer = app.test_client()
    expired = bearer.get("/api/v1/devices", headers={"Authorization": f"Bearer {made[30]['token']}"})
    gone, gone_secret = accounts.create_token(store, "gone", "read")
    accounts.revoke_token(store, gone.id)
    accounts.revoke_token(store, victim_id)
    revoked = bearer.get("/api/v1/devices", headers={"Authorization": f"Bearer {gone_secret}"})
    assert (expired.status_code, expired.json) == (revoked.status_code, revoked.json) == (
        401, {"error": "unknown, revoked or expired token"})
    assert bearer.get("/api/v1/devices", headers={"Authorization": f"Bearer {made[None]['token']}"}).status_code == 200
    listing = {t["name"]: (t["expired"], t["expires_at"] is None) for t in client.get("/api/v1/tokens").json}
    assert listing == {"d30": (True, False), "dNone": (False, True), "form": (False, False)}
    page = client.get("/settings").get_data(as_text=True)
    assert re.search(r"<td[^>]*>d30</td>.*?<strong class=\"expired\">expired 20", page, re.S)
    assert re.search(r"<td[^>]*>dNone</td>.*?<td data-label=\"Expires\">never</td>", page, re.S)


def test_login_locks_out_the_address_after_five_failures(env, caplog):
    app, _, _ = env
    client = app.test_client()
    token = _csrf(client)
    caplog.set_level(logging.WARNING, logger="webui.auth_views")
    for _ in range(accounts.MAX_FAILED_LOGINS):
        r = client.post("/login", data={"username": "admin", "password": "guess", "csrf_token": token})
        assert r.status_code == 401
    r = client.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token})
    page = r.get_data(as_text=True)
    assert r.status_code == 429
    assert re.search(r"Too many failed logins from this address\. Try again at \d\d:\d\d \(in 15 min\)\.", page)
    assert client.get("/devices").status_code == 302
    # Each failure is logged with its source address (for an audit or fail2ban), never with a password.
    failed = [m for m in caplog.messages if m.startswith("failed login for 'admin' from 127.0.0.1")]
    assert len(failed) == accounts.MAX_FAILED_LOGINS
    assert any("locked out" in m for m in caplog.messages)
    assert "guess" not in caplog.text and PASSWORD not in caplog.text


def test_changing_the_password_while_locked_out_says_so_rather_than_that_the_password_is_wrong(env):
    """The owner's browser got five current passwords wrong: its device cookie is locked, and the right one is
    then refused with that reason. A guesser at the owner's address (the test client's, shared by all clients
    here) does not lock the owner's browser out, since the cookie, not the address, judges it."""
    app, store, _ = env
    owner = app.test_client()
    csrf = _login(owner)
    guesser = app.test_client()
    token = _csrf(guesser)
    for _ in range(accounts.MAX_FAILED_LOGINS):
        guesser.post("/login", data={"username": "admin", "password": "guess", "csrf_token": token})
    assert guesser.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token}
                        ).status_code == 429
    wrong = {"current": "typo", "password": "another long password", "confirm": "another long password"}
    for _ in range(accounts.MAX_FAILED_LOGINS):
        page = owner.get(owner.post("/settings/password", data=wrong | {"csrf_token": csrf}).location)
        assert "The current password is wrong." in page.get_data(as_text=True)
    form = wrong | {"current": PASSWORD}
    r = owner.post("/settings/password", data=form | {"csrf_token": csrf})
    page = owner.get(r.location).get_data(as_text=True)
    assert "Too many failed logins from this browser. Try again at " in page and "(in 15 min)" in page
    assert "is wrong" not in page
    assert accounts.session_state(store, "admin") is not None and owner.get("/settings").status_code == 200


def test_a_password_changed_in_the_web_ui_revokes_device_cookies_and_the_next_login_gives_a_new_one(env, monkeypatch):
    monkeypatch.setattr(accounts, "MAX_ACCOUNT_FAILURES", 10)  # the rule, at a fifth of the argon2 checks
    app, store, _ = env
    owner = app.test_client()
    csrf = _login(owner)
    old = owner.get_cookie("iotgw_device").value
    form = {"current": PASSWORD, "password": "another long password", "confirm": "another long password"}
    assert owner.post("/settings/password", data=form | {"csrf_token": csrf}).location == "/login"
    login = {"username": "admin", "password": "another long password", "csrf_token": _csrf(owner)}
    assert owner.post("/login", data=login).status_code == 302
    new = owner.get_cookie("iotgw_device").value
    for n in range(accounts.MAX_ACCOUNT_FAILURES // accounts.MAX_FAILED_LOGINS):
        for _ in range(accounts.MAX_FAILED_LOGINS):
            accounts.verify_login(store, "admin", "guess", f"fd00::{n:x}")
    with pytest.raises(accounts.LockedOut) as locked:  # the cookie from before the change is worth nothing now
        accounts.verify_login(store, "admin", "another long password", "192.168.1.20", device=old)
    assert locked.value.cause == "account"
    assert accounts.verify_login(store, "admin", "another long password", "192.168.1.20", device=new)


def test_the_browser_that_changed_the_password_still_gets_in_when_guessing_locks_the_account_again(env, monkeypatch):
    """The owner changes the password because someone is guessing it; the guessing goes on from fresh addresses,
    and the account soon refuses every client without a device cookie again. The browser that made the change
    proved the password as a login does: it must not be the one shut out with the guessers."""
    monkeypatch.setattr(accounts, "MAX_ACCOUNT_FAILURES", 10)  # the rule, at a fifth of the argon2 checks
    app, store, _ = env
    owner = app.test_client()
    csrf = _login(owner)
    form = {"current": PASSWORD, "password": "another long password", "confirm": "another long password"}
    assert owner.post("/settings/password", data=form | {"csrf_token": csrf}).location == "/login"
    for n in range(accounts.MAX_ACCOUNT_FAILURES // accounts.MAX_FAILED_LOGINS):
        for _ in range(accounts.MAX_FAILED_LOGINS):
            accounts.verify_login(store, "admin", "guess", f"fd00::{n:x}")
    with pytest.raises(accounts.LockedOut):  # the account refuses clients without a cookie again
        accounts.verify_login(store, "admin", "another long password", "192.168.1.30")
    login = {"username": "admin", "password": "another long password", "csrf_token": _csrf(owner)}
    assert owner.post("/login", data=login).status_code == 302


def test_a_login_that_proved_a_password_set_anew_during_its_check_keeps_no_session_and_no_device_cookie(
        env, monkeypatch):
    """Whoever knows the old password logs in as the owner sets a new one (the argon2 check takes a while): the
    new password ends every session and revokes every cookie, and must end this login's too. Its session was bound
    to the password as read after the check, the new one, and its device cookie issued after the revocation."""
    app, store, _ = env
    check = accounts.verify_login

    def checked_during_a_password_change(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        ok = check(*args, **kwargs)
        accounts.set_password(store, "the owner's new password")  # committed as the check returns
        return ok

    monkeypatch.setattr(accounts, "verify_login", checked_during_a_password_change)
    late = app.test_client()
    r = late.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": _csrf(late)})
    assert r.status_code == 302
    assert late.get("/settings").status_code == 302  # to the login page: the session is refused
    assert late.get_cookie("iotgw_device") is None


class _ClientAt:
    """A browser at client address ``source``: its connections are bound there, so the server's TCP peer is it
    (all of 127.0.0.0/8 is routed to lo on Linux). Keeps its cookies (``cookies``: name to value; pass some to
    start with them), follows no redirect. ``set_cookies`` holds the last response's Set-Cookie headers."""

    def __init__(self, server, source: str, cookies: dict[str, str] | None = None) -> None:  # noqa: ANN001
        self.server, self.source, self.cookies = server, source, dict(cookies or {})
        self.set_cookies: list[str] = []

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
        from urllib.parse import urlencode

        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=60,
                                          source_address=(self.source, 0))
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())} if self.cookies else {}
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        self.set_cookies = response.msg.get_all("Set-Cookie") or []
        for cookie in self.set_cookies:
            name, _, value = cookie.split(";", 1)[0].partition("=")
            self.cookies[name] = value
        return response.status, text

    def login(self, password: str) -> tuple[int, str]:
        _, page = self.request("GET", "/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        return self.request("POST", "/login", {"username": "admin", "password": password, "csrf_token": csrf})


@pytest.fixture
def served(tmp_path):
    cfg = config(tmp_path)
    store = Store(cfg.db_url)
    accounts.set_password(store, PASSWORD)
    server = serve_in_thread(store, cfg)
    yield server
    server.stop()
    store.close()


def test_a_device_guessing_is_locked_out_while_the_owner_logs_in_from_another_address(served):
    """The lock was the account's: a compromised device guessing five times every 15 minutes kept the owner out
    of the web UI for good. Now it is the address's; here a real server sees each client's own TCP peer."""
    device, owner = _ClientAt(served, "127.0.0.2"), _ClientAt(served, "127.0.0.1")
    for _ in range(accounts.MAX_FAILED_LOGINS):
        assert device.login("guess")[0] == 401
    status, page = device.login(PASSWORD)  # the right password, not even checked
    assert status == 429 and "Too many failed logins from this address. Try again at " in page
    status, _ = owner.login(PASSWORD)
    assert status == 302 and owner.request("GET", "/devices")[0] == 200
    assert device.login(PASSWORD)[0] == 429  # the owner's login did not unlock the device
    assert device.request("GET", "/devices")[0] == 302


def test_guessing_from_many_addresses_shuts_out_browsers_without_a_device_cookie_but_not_the_owners(served):
    """A device can take many addresses (aliases, IPv6 privacy addresses); five guesses from each would make the
    per-address rule no limit. Past MAX_ACCOUNT_FAILURES from all, a browser without a device cookie is refused,
    the right password or not, whatever its address (the owner's old one included: DHCP may have given it to
    the device), while the owner's browser, which logged in before, gets in with its cookie from a new address.
    What the refused client is told names no address."""
    owner = _ClientAt(served, "127.0.0.1")
    assert owner.login(PASSWORD)[0] == 302  # some day before
    device_cookie = {"iotgw_device": owner.cookies["iotgw_device"]}
    for n in range(accounts.MAX_ACCOUNT_FAILURES // accounts.MAX_FAILED_LOGINS):
        device = _ClientAt(served, f"127.0.0.{10 + n}")
        for _ in range(accounts.MAX_FAILED_LOGINS):
            assert device.login("guess")[0] == 401
    status, page = _ClientAt(served, "127.0.0.200").login(PASSWORD)
    assert status == 429, page
    assert "from many addresses" in page and "127.0.0." not in page
    assert _ClientAt(served, "127.0.0.1").login(PASSWORD)[0] == 429  # the owner's old address, without the cookie
    moved = _ClientAt(served, "127.0.0.250", device_cookie)  # the owner's browser on a fresh address
    assert moved.login(PASSWORD)[0] == 302 and moved.request("GET", "/devices")[0] == 200
    # The login renewed the cookie; the one it replaced, copied before, no longer gets past the refusal.
    assert moved.cookies["iotgw_device"] != device_cookie["iotgw_device"]
    assert _ClientAt(served, "127.0.0.251", device_cookie).login(PASSWORD)[0] == 429


def test_a_login_gives_a_device_cookie_for_this_site_only_that_no_script_can_read(served, tmp_path):
    """HttpOnly, SameSite=Strict, Path=/ and long-lived; not Secure over plain HTTP (the browser would never send
    it back), as the session cookie is not. Only its digest is in the database."""
    from sqlalchemy import select

    from gateway.store.schema import LoginDevice

    owner = _ClientAt(served, "127.0.0.1")
    assert owner.login(PASSWORD)[0] == 302
    [device] = [c for c in owner.set_cookies if c.startswith("iotgw_device=")]
    attributes = {a.strip().split("=", 1)[0].lower(): a.strip().partition("=")[2] for a in device.split(";")[1:]}
    assert attributes == {"expires": attributes["expires"], "max-age": str(accounts.DEVICE_LIFETIME_S),
                          "httponly": "", "path": "/", "samesite": "Strict"}
    secret = owner.cookies["iotgw_device"]
    assert len(secret) >= 43  # 256 random bits
    store = Store(config(tmp_path).db_url)
    try:
        with store.session() as s:
            [row] = s.scalars(select(LoginDevice)).all()
        assert row.username == "admin" and secret not in row.cookie_sha256
    finally:
        store.close()


def test_five_wrong_passwords_in_a_browser_with_a_device_cookie_lock_out_that_browser_not_its_address(served):
    """The owner's browser typing the password wrong five times is locked out by its cookie; another browser on
    the same machine (the same address) is not, where before the address was."""
    owner = _ClientAt(served, "127.0.0.1")
    assert owner.login(PASSWORD)[0] == 302
    cookie = {"iotgw_device": owner.cookies["iotgw_device"]}
    typing = _ClientAt(served, "127.0.0.1", cookie)  # the same browser, its session over
    for _ in range(accounts.MAX_FAILED_LOGINS):
        assert typing.login("typo")[0] == 401
    status, page = typing.login(PASSWORD)
    assert status == 429 and "Too many failed logins from this browser. Try again at " in page
    assert _ClientAt(served, "127.0.0.3", cookie).login(PASSWORD)[0] == 429  # the cookie's, from any address
    other = _ClientAt(served, "127.0.0.1")  # another browser on the same machine
    assert other.login(PASSWORD)[0] == 302 and other.request("GET", "/devices")[0] == 200


def test_one_host_holding_half_sent_requests_leaves_the_web_ui_answering_the_others(served):
    """Waitress serves CONNECTION_LIMIT connections in all and keeps one that sent part of a request for minutes:
    more than that many from one LAN host (a compromised device) left the owner's browser without an answer. Now
    an address holds MAX_CONNECTIONS_PER_CLIENT of them; its connections past that are closed as soon as accepted,
    and the ones it holds are still served."""
    device = []
    try:
        for _ in range(CONNECTION_LIMIT + 10):
            # The timeout only keeps the old server, which never answers these, from hanging the test.
            s = socket.create_connection((served.host, served.port), timeout=60, source_address=("127.0.0.2", 0))
            s.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the blank line that ends it never comes
            device.append(s)
        assert _ClientAt(served, "127.0.0.1").request("GET", "/login")[0] == 200
        # The server accepts connections in the order they were made, so the first are the ones it keeps.
        held, refused = device[:MAX_CONNECTIONS_PER_CLIENT], device[MAX_CONNECTIONS_PER_CLIENT:]
        assert all(_closed_by_peer(s) for s in refused)
        held[-1].sendall(b"\r\n")
        assert held[-1].recv(64).startswith(b"HTTP/1.1 200")
    finally:
        for s in device:
            s.close()


def test_a_served_ui_gives_its_port_as_the_number_a_socket_connects_to(served):
    """It was the string getnameinfo gives: connect() raised TypeError, while http.client took it."""
    with socket.socket() as s:
        s.settimeout(60)
        s.connect((served.host, served.port))
        s.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 200")


def _closed_by_peer(s: socket.socket) -> bool:
    """Whether the server closed ``s``: an end of stream, or a reset since it closed with the request unread."""
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


def test_password_change_ends_other_sessions(env):
    app, store, _ = env
    other = app.test_client()
    _login(other)
    assert other.get("/devices").status_code == 200
    accounts.set_password(store, "another long password")
    assert other.get("/devices").status_code == 302


def test_logout_ends_the_session_on_the_server_so_a_copied_cookie_stops_working(env):
    app, _, _ = env
    client = app.test_client()
    csrf = _login(client)
    copied = client.get_cookie("iotgw_session").value
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 302
    replay = app.test_client()
    replay.set_cookie("iotgw_session", copied)
    assert replay.get("/api/v1/summary").status_code == 401
    r = replay.patch(f"/api/v1/devices/{MAC}", json={"name": "after-logout"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 401
    assert service.get_device(env[1], MAC).device.name == "plug"
    again = app.test_client()
    _login(again)  # a new login after the logout works
    assert again.get("/api/v1/summary").status_code == 200


@pytest.mark.parametrize(
    "next_url",
    ["//evil.example/x", "/%09/evil.example", "/%0d/evil.example", "/%0a/evil.example", "/%0d%0aSet-Cookie:%20x=1",
     "https://evil.example/", "/%5c/evil.example", "/%20/evil.example", "javascript:alert(1)", "devices", "/%00"],
)
def test_login_redirects_only_to_local_paths(env, next_url):
    app, _, _ = env
    client = app.test_client()
    token = _csrf(client)
    data = {"username": "admin", "password": PASSWORD, "csrf_token": token}
    r = client.post(f"/login?next={next_url}", data=data)
    assert r.status_code == 302 and r.location == "/"


def test_login_redirects_to_a_local_path_with_its_query(env):
    app, _, _ = env
    client = app.test_client()
    token = _csrf(client)
    data = {"username": "admin", "password": PASSWORD, "csrf_token": token}
    r = client.post("/login?next=/devices%3Fq%3D//x", data=data)
    assert r.status_code == 302 and r.location == "/devices?q=//x"


def test_query_cursor_and_token_id_beyond_64_bits_are_client_errors(env):
    app, store, token_id = env
    client = app.test_client()
    csrf = _login(client)
    assert client.get(f"/queries?before={2**63}").status_code == 400
    assert client.get(f"/api/v1/queries?before={2**63}").status_code == 400
    assert client.post(f"/settings/tokens/{2**63}/revoke", data={"csrf_token": csrf}).status_code == 404
    assert client.delete(f"/api/v1/tokens/{2**63}", headers={"X-CSRF-Token": csrf}).status_code == 404
    assert token_id in [t.id for t in accounts.list_tokens(store)]


def test_token_names_with_control_characters_are_refused_by_the_form_and_the_api(env):
    app, store, token_id = env
    client = app.test_client()
    csrf = _login(client)
    r = client.post("/api/v1/tokens", json={"name": "a\x1b[2Jb", "scope": "read"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400 and "control characters" in r.get_json()["error"]
    r = client.post("/settings/tokens", data={"name": "a\nb", "scope": "read", "csrf_token": csrf})
    assert r.status_code == 302 and "control characters" in client.get("/settings").get_data(as_text=True)
    assert [t.id for t in accounts.list_tokens(store)] == [token_id]


@pytest.mark.parametrize("body", [{"name": ["ha"], "scope": "read"}, {"name": {"x": 1}, "scope": "write"},
                                  {"name": 42, "scope": "read"}, {"name": "ha", "scope": ["write"]}])
def test_a_token_name_or_scope_that_is_no_string_is_refused(env, body):
    app, store, token_id = env
    client = app.test_client()
    csrf = _login(client)
    r = client.post("/api/v1/tokens", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400 and "must be a string" in r.get_json()["error"]
    assert [t.id for t in accounts.list_tokens(store)] == [token_id]


def test_a_token_asked_with_a_misspelt_field_is_refused_not_made_with_the_default_lifetime(env):
    app, store, token_id = env
    client = app.test_client()
    csrf = _login(client)
    r = client.post("/api/v1/tokens", json={"name": "ha", "scope": "read", "expires_in": 30},
                    headers={"X-CSRF-Token": csrf})
    assert r.status_code == 400 and "unknown field 'expires_in'" in r.get_json()["error"]
    assert [t.id for t in accounts.list_tokens(store)] == [token_id]


def test_security_headers_and_cookie_flags(env):
    app, _, _ = env
    client = app.test_client()
    r = client.get("/login")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    assert client.get("/api/v1/devices").headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_beyond_the_limit_is_refused_before_the_server_reads_it_all(tmp_path, framing):
    """Waitress took in up to 1 GiB per request (a temporary file on the SD card) before the app's 64 KiB limit
    answered 413, from anyone on the LAN and before any login. The refusal now comes while most is unsent."""
    cfg = config(tmp_path)
    store = Store(cfg.db_url)
    server = serve_in_thread(store, cfg)
    head = "POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    chunk = b"a" * 4096
    try:
        # The timeout only keeps a server that waits for the rest from hanging the test; it is no measure.
        with socket.create_connection((server.host, server.port), timeout=60) as s:
            if framing == "length":
                s.sendall(f"{head}Content-Length: {1 << 29}\r\n\r\n".encode())  # and not one byte of the body
            else:
                s.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
                for _ in range(MAX_READ_BYTES // len(chunk) + 2):  # past the limit, never the final empty chunk
                    s.sendall(b"1000\r\n" + chunk + b"\r\n")
            reply = s.recv(64)
    finally:
        server.stop()
        store.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply


def test_the_session_cookie_is_secure_when_the_page_came_over_https(env):
    app, _, _ = env
    client = app.test_client()
    r = client.get("/login", base_url="https://localhost")
    cookie = r.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', r.get_data(as_text=True)).group(1)
    form = {"username": "admin", "password": PASSWORD, "csrf_token": csrf}
    r = client.post("/login", data=form, base_url="https://localhost")
    cookies = {c.split("=", 1)[0]: c for c in r.headers.getlist("Set-Cookie")}
    assert r.status_code == 302 and set(cookies) == {"iotgw_session", "iotgw_device"}
    assert all("; Secure" in c for c in cookies.values()), cookies  # the device cookie as well as the session's
    assert client.get("/devices", base_url="https://localhost").status_code == 200


def test_setup_page_only_from_the_lan_and_only_once(tmp_path):
    cfg = config(tmp_path)
    store = Store(cfg.db_url)
    app = create_app(store, cfg)
    outsider = app.test_client()
    outsider.environ_base["REMOTE_ADDR"] = "8.8.8.8"
    assert outsider.get("/").status_code == 403
    assert outsider.get("/setup").status_code == 403
    lan = app.test_client()
    lan.environ_base["REMOTE_ADDR"] = "192.168.1.20"
    assert lan.get("/").location == "/setup"
    assert lan.get("/api/v1/devices").status_code == 401
    token = _csrf_from(lan, "/setup")
    r = lan.post(
        "/setup", data={"password": "a long password", "confirm": "a long password", "csrf_token": token}
    )
    assert r.status_code == 302 and lan.get("/devices").status_code == 200
    # Setting the password is a login too: the owner's browser holds a device cookie from the start.
    assert accounts.verify_login(store, "admin", "a long password", "192.168.1.21",
                                 device=lan.get_cookie("iotgw_device").value)
    second = app.test_client()
    token = _csrf_from(second, "/login")
    r = second.post(
        "/setup", data={"password": "hijack password", "confirm": "hijack password", "csrf_token": token}
    )
    assert r.status_code == 302 and r.location == "/login"
    assert accounts.verify_login(store, "admin", "a long password", "192.168.1.20")
    store.close()


def test_only_the_lan_is_answered_even_with_a_valid_token_or_session(env):
    """The unit has no IP allow list (list downloads need the Internet), so the app keeps the Internet out."""
    app, store, _ = env
    _, secret = accounts.create_token(store, "script", "write")
    bearer = {"Authorization": f"Bearer {secret}"}
    client = app.test_client()
    _login(client)
    # fe80::/10 is in the LAN, but a link-local peer without a LAN interface (here none is known: see
    # test_webui_link_local) may be any link's
    for peer, status in (("8.8.8.8", 403), ("2001:db8::1", 403), ("100.64.0.7", 403), ("10.1.2.3", 200),
                         ("fd00::7", 200), ("fe80::7", 403), ("fe80::7%lo", 403)):
        client.environ_base["REMOTE_ADDR"] = peer
        assert client.get("/devices").status_code == status, peer
        assert client.get("/api/v1/devices", headers=bearer).status_code == status, peer
    outsider = app.test_client()
    outsider.environ_base["REMOTE_ADDR"] = "8.8.8.8"
    r = outsider.get("/api/v1/devices", headers=bearer)
    assert r.status_code == 403 and "[dns] lan" in r.json["error"]
    cfg = app.extensions["iotgw"].cfg
    cfg.dns.lan = [*cfg.dns.lan, "100.64.0.0/10"]  # a VPN's range, added to the LAN
    client.environ_base["REMOTE_ADDR"] = "100.64.0.7"
    assert client.get("/devices").status_code == 200


def test_a_page_rebound_to_the_gateways_address_cannot_take_its_setup(tmp_path):
    """DNS rebinding: a LAN browser on an attacker's page, whose name now resolves to the gateway, passes the
    LAN check; its Host header is the attacker's name, and that is refused before the setup form is given."""
    cfg = config(tmp_path)
    store = Store(cfg.db_url)
    app = create_app(store, cfg)
    lan = app.test_client()
    lan.environ_base["REMOTE_ADDR"] = "192.168.1.20"
    rebound = {"Host": "rebind.attacker.example:8080"}
    r = lan.get("/setup", headers=rebound)
    assert r.status_code == 403 and b"does not answer to the name" in r.data
    assert b"[web]" in r.data and b"csrf_token" not in r.data
    form = {"password": "attacker password", "confirm": "attacker password", "csrf_token": "x"}
    assert lan.post("/setup", data=form, headers=rebound).status_code == 403
    assert lan.get("/static/style.css", headers=rebound).status_code == 403
    assert not accounts.has_password(store)
    for host in ("192.168.1.2:8080", "[fd00::1]:8080", "iotgw.local:8080", "raspberrypi", "gw.home.arpa.",
                 "localhost:8080"):
        assert lan.get("/setup", headers={"Host": host}).status_code == 200, host
    store.close()


def test_the_names_of_web_hosts_are_answered_and_a_lookalike_is_not(tmp_path):
    cfg = config(tmp_path)
    cfg.web.hosts = ["iotgw.example.org", ".home.example.net"]
    store = Store(cfg.db_url)
    client = create_app(store, cfg).test_client()
    for host in ("iotgw.example.org", "IOTGW.example.org:8443", "home.example.net", "pi.home.example.net"):
        assert client.get("/setup", headers={"Host": host}).status_code == 200, host
    for host in ("example.org", "evil-iotgw.example.org", "evilhome.example.net", "iotgw.example.org.evil.net",
                 "iotgw.example.org:bad"):
        assert client.get("/setup", headers={"Host": host}).status_code == 403, host
    assert client.get("/api/v1/devices", headers={"Host": "x.attacker.example"}).json["error"].startswith(
        "This gateway does not answer")
    store.close()


def _csrf_from(client, path: str) -> str:  # noqa: ANN001
    client.get(path)
    with client.session_transaction() as sess:
        return sess["csrf_token"]


def test_secret_key_is_made_once_and_kept_private(env, tmp_path):
    app, store, _ = env
    path = Path(app.extensions["iotgw"].cfg.state_dir) / SECRET_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = create_app(store, app.extensions["iotgw"].cfg)
    assert again.secret_key == app.secret_key


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a file to another user needs root")
def test_a_secret_key_made_by_root_belongs_to_the_state_directorys_owner(tmp_path):
    """`sudo iotgw web` once must not leave a key file the service user cannot read."""
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    os.chown(state, 4242, 4243)
    key = load_secret_key(state)
    made = (state / SECRET_KEY_FILE).stat()
    assert (made.st_uid, made.st_gid, stat.S_IMODE(made.st_mode)) == (4242, 4243, 0o600)
    assert [p.name for p in state.iterdir()] == [SECRET_KEY_FILE]  # no temporary file left behind
    assert load_secret_key(state) == key


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to hold up the first process's write")
def test_a_web_ui_starting_while_another_makes_the_key_never_reads_it_empty(tmp_path):
    """Two processes starting at once (the service and an admin's `iotgw web`): the second finds no key or the
    whole key, never a file made but not yet written. strace holds the first process's first write(2), the key's, for
    seconds, so the second surely looks in between."""
    maker = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=write", "-e", "inject=write:delay_enter=3s:when=1",
         sys.executable, "-c", "import sys; from webui.app import load_secret_key; "
         "print(load_secret_key(sys.argv[1]).hex())", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        while not (tmp_path / SECRET_KEY_FILE).exists() and maker.poll() is None:
            time.sleep(0.01)
        second = load_secret_key(tmp_path)
        first = maker.communicate(timeout=60)[0].strip()
    finally:
        maker.kill()
        maker.wait()
    assert maker.returncode == 0
    assert second.hex() == first


def test_hostile_names_are_escaped(env):
    app, store, _ = env
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    add_device(store, "aa:bb:cc:00:00:66", hostname=evil, ip="192.168.1.66", queries=(evil + ".evil.com",))
    client = app.test_client()
    _login(client)
    for url in ("/", "/devices", "/devices/aa:bb:cc:00:00:66", "/queries"):
        html = client.get(url).get_data(as_text=True)
        assert "<script>alert" not in html and "<img src=x" not in html, url
        assert "&lt;script&gt;alert(" in html, url


def test_the_device_forms_refuse_names_and_labels_with_control_or_bidi_characters(env):
    app, store, _ = env
    client = app.test_client()
    csrf = _login(client)
    before = service.get_device(store, MAC).device
    r = client.post(f"/devices/{MAC}/name", data={"name": "gnp.\u202eexe", "csrf_token": csrf})
    assert r.status_code == 302
    assert "may not contain control or bidi characters (found U+202E)" in client.get(r.location).get_data(as_text=True)
    r = client.post(f"/devices/{MAC}/label", data={"manufacturer": "TP-Link", "category": "plug\r\nx",
                                                  "csrf_token": csrf})
    assert "found U+000D" in client.get(r.location).get_data(as_text=True)
    after = service.get_device(store, MAC).device
    assert (after.name, after.label_manufacturer, after.labelled_at) == (before.name, None, None)


def test_openapi_document_matches_the_url_map(env):
    app, _, _ = env
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            routes |= {(path, m.lower()) for m in rule.methods - {"HEAD", "OPTIONS"}}
    documented = {(p, m) for p, ops in DOCUMENT["paths"].items() for m in ops}
    assert routes == documented


def test_no_template_or_script_bypasses_escaping():
    root = Path(__file__).resolve().parents[1] / "webui"
    for path in [*root.rglob("*.html"), *root.rglob("*.js"), *root.rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        for banned in (
            "|safe",
            "Markup(",
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "autoescape false",
            "document.write",
        ):
            assert banned not in text, f"{path.name} uses {banned}"


def test_a_stored_time_no_date_can_show_is_said_so_and_never_makes_a_page_an_error(env):
    """A time past what a date can hold (a record of an older version, a hand-edited database; replays now skip
    frames stamped past the year 9999) made the alert list and the device page answer 500."""
    from gateway.alerts.outbox import Outbox
    from gateway.events import Alert
    from gateway.store.schema import Device

    app, store, _ = env
    with store.transaction() as s:
        s.get(Device, MAC).first_seen = 1.8e19
    Outbox(store).put(Alert("device_offline", 1.8e19, MAC, {"last_seen": float("nan"), "idle_timeout_s": 1e300}),
                      publish=False)
    client = app.test_client()
    _login(client)
    for url in ("/alerts", f"/devices/{MAC}", "/devices", "/"):
        r = client.get(url)
        assert r.status_code == 200, (url, r.status_code)
    assert "not a valid time" in client.get("/alerts").get_data(as_text=True)


def test_a_domain_asked_in_the_devices_first_packets_reads_at_once_not_after_0_0_s(env):
    from gateway.store.schema import Device, Query

    app, store, _ = env
    with store.querylog_session() as s:
        first = min(q.ts for q in s.query(Query).filter_by(mac=MAC))
    with store.transaction() as s:
        s.get(Device, MAC).first_seen = first
    client = app.test_client()
    _login(client)
    page = client.get(f"/devices/{MAC}").get_data(as_text=True)
    cells = re.findall(r'<td data-label="First asked">([^<]*)</td>', page)
    assert cells == ["at once", "after 1.0 s"]


def test_a_domain_asked_as_the_device_was_decided_at_once_reads_at_once_too(env):
    # 0.07 s after the first packet: the identification reads "at once" (under a tenth of a second), and the
    # domain that decided it read "after 0.1 s" on the same page
    from gateway.store.schema import Device, Query

    app, store, _ = env
    with store.querylog_session() as s:
        first = min(q.ts for q in s.query(Query).filter_by(mac=MAC))
    with store.transaction() as s:
        device = s.get(Device, MAC)
        device.first_seen, device.decided_after_s = first - 0.07, 0.07
    client = app.test_client()
    _login(client)
    page = client.get(f"/devices/{MAC}").get_data(as_text=True)
    assert "at once (within a tenth of a second" in page
    assert re.findall(r'<td data-label="First asked">([^<]*)</td>', page)[0] == "at once"
