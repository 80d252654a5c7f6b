"""Accounts: argon2 passwords, lockout after five failures, hashed API tokens, and ``iotgw user``."""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time

import pytest
from sqlalchemy import inspect, select

from gateway import accounts
from gateway.commands import user as user_command
from gateway.store.db import Store
from gateway.store.schema import ApiToken, User


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
    assert accounts.verify_login(store, "admin", "correct horse")
    assert not accounts.verify_login(store, "admin", "wrong horse")
    assert not accounts.verify_login(store, "nobody", "correct horse")


def test_short_password_is_refused(store):
    with pytest.raises(ValueError, match="at least 8"):
        accounts.set_password(store, "short")
    assert not accounts.has_password(store)


def test_initial_password_cannot_replace_an_existing_one(store):
    assert accounts.set_initial_password(store, "first password")
    assert not accounts.set_initial_password(store, "second password")
    assert accounts.verify_login(store, "admin", "first password")


def test_five_failures_lock_for_fifteen_minutes_even_with_the_right_password(store):
    accounts.set_password(store, "correct horse")
    t0 = 1_000_000.0
    for i in range(accounts.MAX_FAILED_LOGINS):
        assert not accounts.verify_login(store, "admin", f"guess {i}", now=t0 + i)
    with pytest.raises(accounts.LockedOut) as locked:
        accounts.verify_login(store, "admin", "correct horse", now=t0 + 10)
    assert locked.value.until == pytest.approx(t0 + 4 + accounts.LOCKOUT_S)
    with pytest.raises(accounts.LockedOut):
        accounts.verify_login(store, "admin", "correct horse", now=t0 + 4 + accounts.LOCKOUT_S - 1)
    assert accounts.verify_login(store, "admin", "correct horse", now=t0 + 4 + accounts.LOCKOUT_S + 1)


def test_a_success_resets_the_failure_count(store):
    accounts.set_password(store, "correct horse")
    for _ in range(accounts.MAX_FAILED_LOGINS - 1):
        accounts.verify_login(store, "admin", "nope", now=100.0)
    assert accounts.verify_login(store, "admin", "correct horse", now=101.0)
    for _ in range(accounts.MAX_FAILED_LOGINS - 1):
        accounts.verify_login(store, "admin", "nope", now=102.0)
    assert accounts.verify_login(store, "admin", "correct horse", now=103.0)  # not locked: count restarted


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
    login = threading.Thread(target=lambda: results.append(accounts.verify_login(store, username, password)))
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
    slow = threading.Thread(target=accounts.verify_login, args=(store, "admin", "slow guess"), kwargs={"now": 100.0})
    slow.start()
    try:
        assert checking.wait(timeout=60)
        monkeypatch.setattr(accounts, "_verify", real_verify)
        for i in range(accounts.MAX_FAILED_LOGINS - 1):
            assert not accounts.verify_login(store, "admin", f"guess {i}", now=100.0)
    finally:
        release.set()
        slow.join()
    with pytest.raises(accounts.LockedOut):  # the slow guess was the fifth failure
        accounts.verify_login(store, "admin", "correct horse", now=101.0)


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


def test_a_token_made_before_tokens_could_expire_keeps_working_after_the_migration(tmp_path):
    """A database at the schema before expiry (config_0004), holding a token made then: opening it with this code
    adds the column, and the token, promised never to expire, still works and is listed as never expiring."""
    from alembic import command
    from alembic.config import Config as AlembicConfig

    from gateway.store import db as store_db
    from gateway.store.schema import ConfigBase

    url = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    old = Store(url, migrate=False)
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(store_db.MIGRATIONS))
    with old.engine.begin() as conn:
        cfg.attributes["connection"], cfg.attributes["metadata"] = conn, ConfigBase.metadata
        command.upgrade(cfg, "config_0004_session_generation")
        assert "expires_at" not in {c["name"] for c in inspect(conn).get_columns("api_tokens")}
        secret = accounts.TOKEN_PREFIX + "made-by-the-old-code"
        conn.exec_driver_sql(
            "INSERT INTO api_tokens (name, token_sha256, scope, created_at) VALUES (?, ?, ?, ?)",
            ("old-script", accounts._sha256(secret), "write", 1.0),
        )
    old.close()
    store = Store(url)
    try:
        principal = accounts.authenticate_token(store, secret)
        assert principal is not None and principal.can_write
        [token] = accounts.list_tokens(store)
        assert token.expires_at is None and not accounts.is_expired(token)
    finally:
        store.close()


@pytest.mark.parametrize("name", ["ha\tread", "two\nlines", "red\x1b[31mtext", "back\u202eward", "del\x7f"])
def test_token_names_with_control_characters_are_refused_and_nothing_is_stored(store, name):
    with pytest.raises(ValueError, match="may not contain control characters"):
        accounts.create_token(store, name, "read")
    assert accounts.list_tokens(store) == []


def _run(argv, monkeypatch, stdin=""):  # noqa: ANN001, ANN202
    parser = argparse.ArgumentParser()
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
    assert _run(["user", "token", "create", "x", "--expires", "7", *db], monkeypatch) == 1
    assert "expires after 30, 90 or 365 days, or never" in capsys.readouterr().err
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
    assert accounts.verify_login(store, "admin", "a long password")
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
    assert accounts.verify_login(store, "admin", "a long password")
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
