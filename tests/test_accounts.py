"""Accounts: argon2 passwords, lockout of a client address or a device cookie after five failures (and of every
client without a device cookie after many from all), hashed API tokens, and ``iotgw user``."""

from __future__ import annotations

import io
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from sqlalchemy import inspect, select

from gateway import accounts
from gateway.cli import Parser
from gateway.commands import user as user_command
from gateway.store.db import Store
from gateway.store.schema import ApiToken, LoginAddress, LoginDevice, User

DEVICE, OWNER = "192.168.1.66", "192.168.1.10"  # a compromised device guessing, and the owner's laptop


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    yield s
    s.close()


def test_migration_creates_the_account_tables(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"users", "api_tokens"} <= tables


def test_password_is_stored_as_argon2_and_verifies(store):
    assert not accounts.has_password(store)
    accounts.set_password(store, "correct horse")
    with store.session() as s:
        digest = s.get(User, "admin").password_hash
    assert digest.startswith("$argon2id$") and "correct horse" not in digest
    assert accounts.verify_login(store, "admin", "correct horse", OWNER)
    assert not accounts.verify_login(store, "admin", "wrong horse", OWNER)
    assert not accounts.verify_login(store, "nobody", "correct horse", OWNER)


def test_short_password_is_refused(store):
    with pytest.raises(ValueError, match="at least 8"):
        accounts.set_password(store, "short")
    assert not accounts.has_password(store)


def test_initial_password_cannot_replace_an_existing_one(store):
    assert accounts.set_initial_password(store, "first password")
    assert not accounts.set_initial_password(store, "second password")
    assert accounts.verify_login(store, "admin", "first password", OWNER)


def test_five_failures_lock_the_address_for_fifteen_minutes_and_no_other(store):
    """The lock was the account's: a device guessing five times every 15 minutes kept the owner out for good."""
    accounts.set_password(store, "correct horse")
    t0 = 1_000_000.0
    for i in range(accounts.MAX_FAILED_LOGINS):
        assert not accounts.verify_login(store, "admin", f"guess {i}", DEVICE, now=t0 + i)
    with pytest.raises(accounts.LockedOut) as locked:  # even with the right password, which is not checked
        accounts.verify_login(store, "admin", "correct horse", DEVICE, now=t0 + 10)
    assert locked.value.until == pytest.approx(t0 + 4 + accounts.LOCKOUT_S) and locked.value.cause == "address"
    assert accounts.verify_login(store, "admin", "correct horse", OWNER, now=t0 + 11)  # the owner, meanwhile
    with pytest.raises(accounts.LockedOut):  # and the owner's login did not unlock the device
        accounts.verify_login(store, "admin", "correct horse", DEVICE, now=t0 + 4 + accounts.LOCKOUT_S - 1)
    assert accounts.verify_login(store, "admin", "correct horse", DEVICE, now=t0 + 4 + accounts.LOCKOUT_S + 1)


def test_an_address_is_counted_in_one_spelling_and_a_non_address_is_refused(store):
    accounts.set_password(store, "correct horse")
    spellings = ["2001:db8::7", "2001:DB8:0:0::7", "2001:db8::7%eth0"]
    for i in range(accounts.MAX_FAILED_LOGINS):
        assert not accounts.verify_login(store, "admin", "guess", spellings[i % 3], now=100.0)
    with pytest.raises(accounts.LockedOut):
        accounts.verify_login(store, "admin", "correct horse", "2001:0db8::0007", now=101.0)
    for i in range(accounts.MAX_FAILED_LOGINS):
        accounts.verify_login(store, "admin", "guess", "::ffff:192.168.1.9" if i % 2 else "192.168.1.9", now=100.0)
    with pytest.raises(accounts.LockedOut):
        accounts.verify_login(store, "admin", "correct horse", "192.168.1.9", now=101.0)
    with pytest.raises(ValueError, match="must be an IP address, not 'unix:/run/x'"):
        accounts.verify_login(store, "admin", "correct horse", "unix:/run/x")


def test_a_success_from_an_address_resets_its_failure_count(store):
    accounts.set_password(store, "correct horse")
    for _ in range(accounts.MAX_FAILED_LOGINS - 1):
        accounts.verify_login(store, "admin", "nope", OWNER, now=100.0)
    assert accounts.verify_login(store, "admin", "correct horse", OWNER, now=101.0)
    for _ in range(accounts.MAX_FAILED_LOGINS - 1):
        accounts.verify_login(store, "admin", "nope", OWNER, now=102.0)
    assert accounts.verify_login(store, "admin", "correct horse", OWNER, now=103.0)  # not locked: count restarted


def _guess_from_many(store, now: float, first: int = 0) -> int:  # noqa: ANN001
    """Five wrong guesses from each of fresh addresses until the account has had MAX_ACCOUNT_FAILURES; returns the
    next unused address number."""
    n = first
    for _ in range(accounts.MAX_ACCOUNT_FAILURES // accounts.MAX_FAILED_LOGINS):
        for _ in range(accounts.MAX_FAILED_LOGINS):
            assert not accounts.verify_login(store, "admin", "guess", f"fd00::{n:x}", now=now)
        n += 1
    return n


def _owner_cookie(store: Store, now: float) -> str:
    """The owner's browser logs in from OWNER at ``now`` and keeps the device cookie it is given."""
    assert accounts.verify_login(store, "admin", "correct horse", OWNER, now=now)
    return accounts.issue_device_cookie(store, "admin", now=now)


def test_distributed_guessing_shuts_out_clients_without_a_device_cookie_but_not_the_owners_browser(store):
    """A device with many addresses (aliases, IPv6 privacy addresses) guesses five times from each: past
    MAX_ACCOUNT_FAILURES from all, every client without a device cookie is refused for LOCKOUT_S, while the
    owner's browser, which has one from a login 20 days ago, still logs in, and keeps its own five-in-a-row rule."""
    accounts.set_password(store, "correct horse")
    t0 = 1_000_000.0
    cookie = _owner_cookie(store, t0 - 20 * 86400)
    n = _guess_from_many(store, t0)
    with pytest.raises(accounts.LockedOut) as locked:  # a new address, right password or not
        accounts.verify_login(store, "admin", "correct horse", f"fd00::{n:x}", now=t0 + 1)
    assert locked.value.cause == "account" and locked.value.until == pytest.approx(t0 + accounts.LOCKOUT_S)
    with pytest.raises(accounts.LockedOut) as locked:  # an address that failed before but never logged in
        accounts.verify_login(store, "admin", "correct horse", "192.168.1.77", now=t0 + 1)
    assert locked.value.cause == "account"
    assert accounts.verify_login(store, "admin", "correct horse", OWNER, device=cookie, now=t0 + 2)
    for _ in range(accounts.MAX_FAILED_LOGINS):
        assert not accounts.verify_login(store, "admin", "typo", OWNER, device=cookie, now=t0 + 3)
    with pytest.raises(accounts.LockedOut) as locked:
        accounts.verify_login(store, "admin", "correct horse", OWNER, device=cookie, now=t0 + 4)
    assert locked.value.cause == "device"
    # After LOCKOUT_S clients without a cookie are heard again.
    assert accounts.verify_login(store, "admin", "correct horse", f"fd00::{n:x}", now=t0 + accounts.LOCKOUT_S)


def test_the_owners_browser_on_a_fresh_ipv6_privacy_address_gets_in_while_the_account_refuses_new_clients(store):
    """Hole (a): the owner's laptop had moved to a new privacy address, which was new to the account, so it was
    refused for as long as the guessing went on. Its device cookie lets it in from any address."""
    accounts.set_password(store, "correct horse")
    t0 = 1_000_000.0
    cookie = _owner_cookie(store, t0 - 86400)  # yesterday, from OWNER
    _guess_from_many(store, t0)
    fresh = "2001:db8:1:2:a1b2:c3d4:e5f6:789"  # today's privacy address of the same laptop
    assert accounts.verify_login(store, "admin", "correct horse", fresh, device=cookie, now=t0 + 1)
    with pytest.raises(accounts.LockedOut):  # the same address without the cookie is just another new client
        accounts.verify_login(store, "admin", "correct horse", fresh, now=t0 + 2)


def test_an_address_that_logged_in_earns_no_exemption_from_the_account_wide_refusal(store):
    """Hole (b): an address that had logged in within 30 days was let past the account-wide refusal, so a guessing
    device that DHCP gave a departed laptop's address kept its five guesses per 15 minutes on top of the 50."""
    accounts.set_password(store, "correct horse")
    t0 = 1_000_000.0
    assert accounts.verify_login(store, "admin", "correct horse", OWNER, now=t0 - 86400)  # the laptop, yesterday
    _guess_from_many(store, t0)
    with pytest.raises(accounts.LockedOut) as locked:  # today OWNER is the guessing device's, holding no cookie
        accounts.verify_login(store, "admin", "guess", OWNER, now=t0 + 1)
    assert locked.value.cause == "account"


def test_failures_with_a_device_cookie_lock_out_that_cookie_not_the_address_nor_the_account(store):
    """Five typos in the owner's browser lock that browser's cookie only: another browser without a cookie at the
    same address still logs in, and the typos do not count toward the account-wide refusal."""
    accounts.set_password(store, "correct horse")
    cookie = _owner_cookie(store, 100.0)
    for _ in range(accounts.MAX_FAILED_LOGINS):
        assert not accounts.verify_login(store, "admin", "typo", OWNER, device=cookie, now=200.0)
    with pytest.raises(accounts.LockedOut) as locked:
        accounts.verify_login(store, "admin", "correct horse", DEVICE, device=cookie, now=201.0)  # from anywhere
    assert locked.value.cause == "device" and locked.value.until == pytest.approx(200.0 + accounts.LOCKOUT_S)
    assert accounts.verify_login(store, "admin", "correct horse", OWNER, now=202.0)  # no cookie: the address's
    with store.session() as s:
        user = s.get(User, "admin")
        assert user.recent_failures == 0 and s.scalars(select(LoginAddress)).all() == []
    assert accounts.verify_login(store, "admin", "correct horse", OWNER, device=cookie,
                                 now=200.0 + accounts.LOCKOUT_S)


@pytest.mark.parametrize("which", ["forged", "not text", "other account", "revoked by a new password", "expired",
                                   "replaced"])
def test_a_device_cookie_that_is_not_a_live_one_of_the_account_counts_as_none(store, which, monkeypatch):
    monkeypatch.setattr(accounts, "MAX_ACCOUNT_FAILURES", 10)  # the rule, at a fifth of the argon2 checks
    accounts.set_password(store, "correct horse")
    accounts.set_password(store, "correct horse", username="guest")
    t0 = 1_000_000.0
    cookie = {
        "forged": lambda: "x" * 43,
        "not text": lambda: "caf\udce9\x00" + "\u00e9" * 4096,
        "other account": lambda: accounts.issue_device_cookie(store, "guest", now=t0 - 1),
        "expired": lambda: accounts.issue_device_cookie(store, "admin", now=t0 - accounts.DEVICE_LIFETIME_S - 1),
    }.get(which, lambda: accounts.issue_device_cookie(store, "admin", now=t0 - 1))()
    if which == "revoked by a new password":
        accounts.set_password(store, "correct horse")
    if which == "replaced":  # the next login gave the browser a new cookie; a copy of the old one is worth nothing
        accounts.issue_device_cookie(store, "admin", replacing=cookie, now=t0 - 1)
    _guess_from_many(store, t0)
    with pytest.raises(accounts.LockedOut) as locked:
        accounts.verify_login(store, "admin", "correct horse", OWNER, device=cookie, now=t0 + 1)
    assert locked.value.cause == "account"


def test_a_new_password_revokes_every_device_cookie_of_the_account_only(store):
    accounts.set_password(store, "correct horse")
    accounts.set_password(store, "guest password", username="guest")
    for username in ("admin", "admin", "guest"):
        accounts.issue_device_cookie(store, username, now=100.0)
    accounts.set_password(store, "a new password")
    with store.session() as s:
        assert [d.username for d in s.scalars(select(LoginDevice))] == ["guest"]


def test_failures_spread_over_more_than_fifteen_minutes_do_not_shut_out_new_addresses(store):
    accounts.set_password(store, "correct horse")
    half = accounts.MAX_ACCOUNT_FAILURES // 2
    for i in range(half):
        accounts.verify_login(store, "admin", "guess", f"fd00::{i // 4:x}", now=1000.0)
    for i in range(half):
        accounts.verify_login(store, "admin", "guess", f"fd00::1:{i // 4:x}", now=1000.0 + accounts.LOCKOUT_S)
    assert accounts.verify_login(store, "admin", "correct horse", "fd00::2:1", now=1001.0 + accounts.LOCKOUT_S)


def test_the_address_and_device_rows_stay_bounded_and_a_flood_never_pushes_out_a_device_cookie(store, monkeypatch):
    """Only the password makes a device cookie, so a flood of failures from fresh addresses drops only other
    addresses' rows; cookies are kept up to their own bound per account, the longest unused dropped, and a
    successful login leaves no address row behind."""
    monkeypatch.setattr(accounts, "MAX_ADDRESSES", 6)  # the real 1024 would take as many argon2 checks
    monkeypatch.setattr(accounts, "MAX_DEVICES", 2)
    accounts.set_password(store, "correct horse")
    cookies = [_owner_cookie(store, 100.0 + i) for i in range(3)]  # three browsers of the owner's
    for i in range(20):
        assert not accounts.verify_login(store, "admin", "guess", f"fd00::{i:x}", now=200.0 + i)
    with store.session() as s:
        addresses = {r.address for r in s.scalars(select(LoginAddress))}
        devices = {r.cookie_sha256 for r in s.scalars(select(LoginDevice))}
    assert addresses == {f"fd00::{i:x}" for i in range(14, 20)}  # the newest six failures; OWNER's login left none
    assert devices == {accounts._cookie_sha256(c) for c in cookies[1:]}  # the first, the longest unused, dropped
    assert accounts.verify_login(store, "admin", "correct horse", OWNER, device=cookies[2], now=300.0)
    renewed = accounts.issue_device_cookie(store, "admin", replacing=cookies[2], now=300.0)
    with store.session() as s:  # a login renews the browser's cookie in place: no row for each login
        devices = {r.cookie_sha256 for r in s.scalars(select(LoginDevice))}
    assert devices == {accounts._cookie_sha256(c) for c in (cookies[1], renewed)}


def test_lockouts_survive_a_restart_and_a_new_password_ends_them(tmp_path):
    url = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    store = Store(url)
    accounts.set_password(store, "correct horse")
    for _ in range(accounts.MAX_FAILED_LOGINS):
        accounts.verify_login(store, "admin", "guess", DEVICE, now=100.0)
    store.close()
    store = Store(url)  # a restarted `iotgw web`
    try:
        with pytest.raises(accounts.LockedOut):
            accounts.verify_login(store, "admin", "correct horse", DEVICE, now=101.0)
        assert accounts.verify_login(store, "admin", "correct horse", OWNER, now=101.0)
        cookie = accounts.issue_device_cookie(store, "admin", now=101.0)
        store.close()
        store = Store(url)  # restarted again: the cookie is still the browser's and still counts its failures
        for _ in range(accounts.MAX_FAILED_LOGINS):
            assert not accounts.verify_login(store, "admin", "typo", OWNER, device=cookie, now=101.0)
        with pytest.raises(accounts.LockedOut):
            accounts.verify_login(store, "admin", "correct horse", OWNER, device=cookie, now=102.0)
        accounts.set_password(store, "a new password")  # `iotgw user set-password`: the guesses were at the old one
        assert accounts.verify_login(store, "admin", "a new password", DEVICE, now=102.0)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("username", "password", "expected"),
    [("admin", "correct horse", True), ("admin", "wrong horse", False), ("nobody", "correct horse", False)],
)
def test_password_check_holds_no_write_lock_so_other_writers_go_on(store, monkeypatch, username, password, expected):
    accounts.set_password(store, "correct horse")
    checking, release = threading.Event(), threading.Event()
    real_verify = accounts._verify

    def held_verify(digest: str, pw: str) -> bool:  # the real argon2 check, held open until the writer is done
        checking.set()
        release.wait()
        return real_verify(digest, pw)

    monkeypatch.setattr(accounts, "_verify", held_verify)
    results: list[bool] = []
    login = threading.Thread(target=lambda: results.append(accounts.verify_login(store, username, password, OWNER)))
    login.start()
    try:
        assert checking.wait(timeout=60)  # guard against a hang only
        store.set_setting("written-during-check", "yes")  # any other writer: the daemon, token auth, the CLI
        assert not release.is_set()  # so the write finished while the password check was still in progress
    finally:
        release.set()
        login.join()
    assert results == [expected]
    assert store.get_setting("written-during-check") == "yes"


def test_failures_counted_during_a_password_check_are_kept(store, monkeypatch):
    """The failure count is updated in its own short transaction, so concurrent wrong guesses all count."""
    accounts.set_password(store, "correct horse")
    checking, release = threading.Event(), threading.Event()
    real_verify = accounts._verify

    def held_verify(digest: str, pw: str) -> bool:
        checking.set()
        release.wait()
        return real_verify(digest, pw)

    monkeypatch.setattr(accounts, "_verify", held_verify)
    slow = threading.Thread(
        target=accounts.verify_login, args=(store, "admin", "slow guess", DEVICE), kwargs={"now": 100.0}
    )
    slow.start()
    try:
        assert checking.wait(timeout=60)
        monkeypatch.setattr(accounts, "_verify", real_verify)
        for i in range(accounts.MAX_FAILED_LOGINS - 1):
            assert not accounts.verify_login(store, "admin", f"guess {i}", DEVICE, now=100.0)
    finally:
        release.set()
        slow.join()
    with pytest.raises(accounts.LockedOut):  # the slow guess was the fifth failure
        accounts.verify_login(store, "admin", "correct horse", DEVICE, now=101.0)


def test_tokens_are_stored_hashed_scoped_and_revocable(store):
    token, secret = accounts.create_token(store, "home-assistant", "read")
    with store.session() as s:
        stored = s.scalar(select(ApiToken))
    assert secret not in stored.token_sha256 and len(stored.token_sha256) == 64
    principal = accounts.authenticate_token(store, secret)
    assert principal is not None and not principal.can_write
    _, write_secret = accounts.create_token(store, "script", "write")
    assert accounts.authenticate_token(store, write_secret).can_write
    assert accounts.authenticate_token(store, secret + "x") is None
    accounts.revoke_token(store, token.id)
    assert accounts.authenticate_token(store, secret) is None
    assert [t.name for t in accounts.list_tokens(store)] == ["script"]
    with pytest.raises(accounts.TokenNotFound):
        accounts.revoke_token(store, token.id)
    with pytest.raises(ValueError):
        accounts.create_token(store, "x", "admin")


def _expire(store: Store, token_id: int) -> None:
    """Moves the token's expiry to a second ago: the state 30 days later, without waiting 30 days."""
    with store.transaction() as s:
        s.get(ApiToken, token_id).expires_at = time.time() - 1


def test_a_token_expires_after_the_days_chosen_and_is_then_refused_like_a_revoked_one(store):
    before = time.time()
    default, default_secret = accounts.create_token(store, "ha", "read")
    month, month_secret = accounts.create_token(store, "script", "write", 30)
    forever, forever_secret = accounts.create_token(store, "nas", "read", None)
    assert before + 90 * 86400 <= default.expires_at <= time.time() + 90 * 86400  # not never by default
    assert before + 30 * 86400 <= month.expires_at <= time.time() + 30 * 86400
    assert forever.expires_at is None
    assert accounts.authenticate_token(store, month_secret).can_write
    _expire(store, month.id)
    assert accounts.authenticate_token(store, month_secret) is None
    assert accounts.authenticate_token(store, default_secret) is not None
    assert accounts.authenticate_token(store, forever_secret) is not None
    # listed, and marked, until revoked: the owner sees which script stopped working and why
    listed = {t.name: accounts.is_expired(t) for t in accounts.list_tokens(store)}
    assert listed == {"ha": False, "script": True, "nas": False}
    accounts.revoke_token(store, month.id)
    assert [t.name for t in accounts.list_tokens(store)] == ["ha", "nas"]


@pytest.mark.parametrize("days", [0, 7, -30, 3650, True, 90.0, "90"])
def test_a_token_lifetime_other_than_the_choices_is_refused_and_nothing_is_stored(store, days):
    with pytest.raises(ValueError, match="expires after 30, 90 or 365 days, or never"):
        accounts.create_token(store, "ha", "read", days)
    assert accounts.list_tokens(store) == []


@contextmanager
def _at_revision(url: str, revision: str):  # noqa: ANN202
    """A connection to a new database brought only to ``revision``: the schema an older release left behind."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    from gateway.store import db as store_db
    from gateway.store.schema import ConfigBase

    old = Store(url, migrate=False)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(store_db.MIGRATIONS))
    try:
        with old.engine.begin() as conn:
            cfg.attributes["connection"], cfg.attributes["metadata"] = conn, ConfigBase.metadata
            command.upgrade(cfg, revision)
            yield conn
    finally:
        old.close()


def test_a_token_made_before_tokens_could_expire_keeps_working_after_the_migration(tmp_path):
    """A database at the schema before expiry (config_0004), holding a token made then: opening it with this code
    adds the column, and the token, promised never to expire, still works and is listed as never expiring."""
    url = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    with _at_revision(url, "config_0004_session_generation") as conn:
        assert "expires_at" not in {c["name"] for c in inspect(conn).get_columns("api_tokens")}
        secret = accounts.TOKEN_PREFIX + "made-by-the-old-code"
        conn.exec_driver_sql(
            "INSERT INTO api_tokens (name, token_sha256, scope, created_at) VALUES (?, ?, ?, ?)",
            ("old-script", accounts._sha256(secret), "write", 1.0),
        )
    store = Store(url)
    try:
        principal = accounts.authenticate_token(store, secret)
        assert principal is not None and principal.can_write
        [token] = accounts.list_tokens(store)
        assert token.expires_at is None and not accounts.is_expired(token)
    finally:
        store.close()


def test_an_account_locked_before_the_upgrade_is_not_locked_after_it(tmp_path):
    """A database at the schema with the account-wide lock (config_0005), the account locked: the lock cannot be
    given to an address, so the migration drops it rather than keep the owner out, and the per-address rule
    starts counting afresh."""
    url = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    with _at_revision(url, "config_0005_token_expiry") as conn:
        conn.exec_driver_sql(
            "INSERT INTO users (username, password_hash, password_changed_at, failed_logins, locked_until)"
            " VALUES (?, ?, ?, ?, ?)",
            ("admin", accounts._hasher.hash("correct horse"), 1.0, 0, time.time() + accounts.LOCKOUT_S),
        )
    store = Store(url)
    try:
        assert accounts.verify_login(store, "admin", "correct horse", OWNER)
        for _ in range(accounts.MAX_FAILED_LOGINS):
            assert not accounts.verify_login(store, "admin", "guess", DEVICE)
        with pytest.raises(accounts.LockedOut):
            accounts.verify_login(store, "admin", "correct horse", DEVICE)
    finally:
        store.close()


def test_an_address_that_logged_in_before_the_upgrade_is_exempt_from_nothing_after_it_and_locks_stay(tmp_path):
    """A database at the schema with address exemptions (config_0006): the address that only logged in is
    forgotten with the exemption, while an address locked out stays locked out."""
    url = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    now = time.time()
    with _at_revision(url, "config_0006_login_addresses") as conn:
        conn.exec_driver_sql(
            "INSERT INTO users (username, password_hash, password_changed_at, failures_since, recent_failures,"
            " new_addresses_locked_until) VALUES (?, ?, ?, ?, ?, ?)",
            ("admin", accounts._hasher.hash("correct horse"), 1.0, None, 0, now + accounts.LOCKOUT_S),
        )
        conn.exec_driver_sql(
            "INSERT INTO login_addresses (username, address, failures, last_failure_at, locked_until, logged_in_at)"
            " VALUES (?, ?, ?, ?, ?, ?), (?, ?, ?, ?, ?, ?)",
            ("admin", OWNER, 0, None, None, now - 86400, "admin", DEVICE, 0, now, now + accounts.LOCKOUT_S, None),
        )
    store = Store(url)
    try:
        with store.session() as s:
            assert [r.address for r in s.scalars(select(LoginAddress))] == [DEVICE]
        with pytest.raises(accounts.LockedOut) as locked:
            accounts.verify_login(store, "admin", "correct horse", OWNER)
        assert locked.value.cause == "account"
        with pytest.raises(accounts.LockedOut) as locked:
            accounts.verify_login(store, "admin", "correct horse", DEVICE)
        assert locked.value.cause == "address"
    finally:
        store.close()


@pytest.mark.parametrize("name", ["ha\tread", "two\nlines", "red\x1b[31mtext", "back\u202eward", "del\x7f"])
def test_token_names_with_control_characters_are_refused_and_nothing_is_stored(store, name):
    with pytest.raises(ValueError, match="may not contain control characters"):
        accounts.create_token(store, name, "read")
    assert accounts.list_tokens(store) == []


def _run(argv, monkeypatch, stdin=""):  # noqa: ANN001, ANN202
    parser = Parser()
    user_command.add_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return args.func(args)


def test_cli_sets_the_password_and_manages_tokens(tmp_path, monkeypatch, capsys):
    db = ["--db", f"sqlite:///{tmp_path / 'iotgw.sqlite'}"]
    assert _run(["user", "set-password", *db], monkeypatch, "short\n") == 1
    assert _run(["user", "set-password", *db], monkeypatch, "a long password\n") == 0
    assert _run(["user", "token", "create", "ha", "--scope", "write", *db], monkeypatch) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert secret.startswith(accounts.TOKEN_PREFIX)
    assert _run(["user", "token", "list", *db], monkeypatch) == 0
    assert "\twrite\tha\t" in capsys.readouterr().out
    assert _run(["user", "token", "create", "nas", "--expires", "never", *db], monkeypatch) == 0
    assert "never expires) created" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        _run(["user", "token", "create", "x", "--expires", "7", *db], monkeypatch)
    assert refused.value.code == 2
    assert "argument --expires: a token expires after 30, 90 or 365 days, or never" in capsys.readouterr().err
    assert _run(["user", "token", "list", *db], monkeypatch) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert "\texpires 20" in first and second.endswith("\tnever expires")
    assert _run(["user", "token", "revoke", "2", *db], monkeypatch) == 0
    assert _run(["user", "token", "create", "ha\x1b]0;x\x07", *db], monkeypatch) == 1
    assert "control characters" in capsys.readouterr().err
    assert _run(["user", "token", "revoke", "1", *db], monkeypatch) == 0
    assert _run(["user", "token", "revoke", "1", *db], monkeypatch) == 1
    # a name stored before such names were refused is listed as text, its controls written out
    store = Store(db[1])
    with store.transaction() as s:
        s.add(ApiToken(name="ha\x1b]0;x\x07\tread\u202e", token_sha256="0" * 64, scope="read", created_at=1.0))
    store.close()
    capsys.readouterr()
    assert _run(["user", "token", "list", *db], monkeypatch) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split("\t")[1:3] == ["read", "ha\\u001b]0;x\\u0007\\u0009read\\u202e"]
    store = Store(db[1])
    assert accounts.verify_login(store, "admin", "a long password", OWNER)
    assert accounts.authenticate_token(store, secret) is None
    store.close()


def _token_names(url: str) -> list[str]:
    store = Store(url)
    try:
        return [t.name for t in accounts.list_tokens(store)]
    finally:
        store.close()


def test_cli_user_takes_config_and_db_before_or_after_its_actions_alike(tmp_path, monkeypatch, capsys):
    # They went after the last ACTION only (before it: "unrecognized arguments") while `iotgw policy` took
    # them before: a user had to know which. Every place gives the same database.
    url = f"sqlite:///{tmp_path / 'placed.sqlite'}"
    for n, argv in enumerate((["user", "--db", url, "token", "create"], ["user", "token", "--db", url, "create"],
                              ["user", "token", "create", "--db", url])):
        assert _run([*argv, f"t{n}"], monkeypatch) == 0
    assert _token_names(url) == ["t0", "t1", "t2"]
    capsys.readouterr()
    for argv in (["user", "--db", url, "token", "list"], ["user", "token", "--db", url, "list"],
                 ["user", "token", "list", "--db", url]):
        assert _run(argv, monkeypatch) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[:3] == listed[3:6] == listed[6:] and len(listed) == 9
    assert _run(["user", "--db", url, "set-password"], monkeypatch, "a long password\n") == 0
    store = Store(url)
    assert accounts.verify_login(store, "admin", "a long password", OWNER)
    store.close()
    # --config names the state directory, whose SQLite database is the default
    config = tmp_path / "iotgw.toml"
    config.write_text(f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n')
    assert _run(["user", "--config", str(config), "token", "create", "from-config"], monkeypatch) == 0
    assert _token_names(f"sqlite:///{tmp_path / 'state' / 'iotgw.sqlite'}") == ["from-config"]


def test_cli_user_db_given_before_and_after_the_action_the_later_one_wins(tmp_path, monkeypatch):
    # as a flag given twice on one level does; and an ACTION's own parser must not put back the default
    first, later = (f"sqlite:///{tmp_path / name}.sqlite" for name in ("first", "later"))
    assert _run(["user", "--db", first, "token", "create", "ha", "--db", later], monkeypatch) == 0
    assert _run(["user", "--db", first, "token", "--db", later, "create", "nas"], monkeypatch) == 0
    assert _token_names(later) == ["ha", "nas"]
    assert not (tmp_path / "first.sqlite").exists()


def test_a_cli_write_while_another_process_holds_the_database_says_busy_and_changes_nothing(
        tmp_path, monkeypatch, capsys):
    """``iotgw user token create`` while another process held the write lock past the busy timeout ended in a
    SQLAlchemy traceback; it says the database is busy and to try again, and writes nothing."""
    import sqlite3

    from gateway import cli
    from gateway.store import db as store_db

    monkeypatch.setattr(store_db, "BUSY_TIMEOUT_S", 0.5)  # the real wait is 30 s; the lock below is real
    path = tmp_path / "iotgw.sqlite"
    Store(f"sqlite:///{path}").close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the daemon's flush, a backup, a sqlite3 shell left in a transaction
    try:
        code = cli.main(["user", "token", "create", "ha", "--db", f"sqlite:///{path}"])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = capsys.readouterr().err
    assert code == 1 and "database is busy" in err and "try again" in err and "Traceback" not in err
    store = Store(f"sqlite:///{path}")
    assert accounts.list_tokens(store) == []
    store.close()


def test_a_password_piped_in_that_is_not_utf8_is_refused_in_one_line_and_nothing_is_stored(tmp_path):
    """The bytes reach Python as lone surrogates; hashing them said only "'utf-8' codec can't encode characters"."""
    import subprocess
    from pathlib import Path

    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "user", "set-password", "--db", db],
                          input=b"caf\xe9 au lait\n", capture_output=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert (proc.returncode, proc.stdout) == (1, b"")
    assert proc.stderr == b"iotgw: the password is not UTF-8 text; nothing changed\n"
    assert not accounts.has_password(Store(db))


def test_a_token_lifetime_other_than_the_choices_is_a_usage_error_naming_the_flag(tmp_path):
    import subprocess
    from pathlib import Path

    db = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "user", "token", "create", "ha", "--expires", "7",
                           "--db", db], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "iotgw user token create: error: argument --expires: a token expires after 30, 90 or 365 days, or never"
    )
    assert not (tmp_path / "iotgw.sqlite").exists()
