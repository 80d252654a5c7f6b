"""Opening the databases, migrating them, and handing out sessions."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, Integer, MetaData, Text, cast, create_engine, event, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError, DataError, IntegrityError, InternalError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from gateway.config import redact_url
from gateway.statedir import create_private
from gateway.store.schema import ConfigBase, QueryLogBase, Setting

MIGRATIONS = Path(__file__).with_name("migrations")
# Integers SQLite and PostgreSQL's BIGINT can hold are below this (signed 64-bit); the drivers refuse larger ones.
INT64_LIMIT = 2**63
# How long a write waits for another process's write lock on SQLite (the daemon's flush, a CLI command, the web UI)
# before it is refused with "database is locked".
BUSY_TIMEOUT_S = 30.0


class DatabaseUnavailable(Exception):
    """The database cannot be opened: a SQLite path that is a directory or holds no database, a server that is
    not reachable or refuses the login. Its message is one line: the URL (password hidden) and why."""


def database_busy(exc: BaseException) -> bool:
    """``exc`` is SQLite's "database is locked": another process held the write lock for all of BUSY_TIMEOUT_S.
    Nothing was written; trying again later is the cure, so the web UI and the CLI say so instead of failing."""
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


def querylog_url(url: str) -> str:
    """The query log's database: a sibling file for SQLite (its writes and pruning then never block the
    configuration database), the same database for a server URL."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:"):
        db = Path(u.database)
        return str(u.set(database=str(db.with_name(db.stem + "-querylog" + db.suffix))))
    return url


def missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file ``url`` names when it does not exist (else None): a command that only reads opening it
    would create an empty database, and with it any missing directory, at a mistyped or stale path."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    path = Path(u.database)
    return None if path.exists() else path


class Store:
    """Both databases of one gateway. ``Store(url)`` opens and migrates them."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine = _engine(url)
        self.querylog_engine = _engine(querylog_url(url)) if querylog_url(url) != url else self.engine
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self.querylog_session = sessionmaker(self.querylog_engine, expire_on_commit=False)
        if migrate:
            try:
                self.migrate()
            except DatabaseError as exc:
                # Not the ones a migration's own statements raise on the data or the schema: those are bugs to see
                # with their traceback, not a database that does not open.
                if database_busy(exc) or isinstance(exc, (DataError, IntegrityError, InternalError, ProgrammingError)):
                    raise
                self.close()
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                raise DatabaseUnavailable(f"{redact_url(url)}: {reason}") from exc

    def migrate(self) -> None:
        """Bring both databases to the newest schema (idempotent)."""
        for engine, metadata, branch in (
            (self.engine, ConfigBase.metadata, "config"),
            (self.querylog_engine, QueryLogBase.metadata, "querylog"),
        ):
            _upgrade(engine, metadata, branch)

    @contextmanager
    def transaction(self, *, wait: bool = True) -> Iterator[Session]:
        """A write transaction. On SQLite it starts with BEGIN IMMEDIATE: a deferred transaction that reads
        and then writes fails at once with "database is locked" when another process wrote in between (WAL
        cannot upgrade a stale snapshot), while an immediate one waits its turn under busy_timeout.

        ``wait=False`` is for a write that may be skipped: on SQLite it fails at once ("database is locked",
        ``database_busy``) instead of waiting for another process's write lock."""
        with self.session() as session:
            # begins the transaction
            session.connection(execution_options={"immediate": True, "wait": wait})
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def get_setting(self, key: str, default: str | None = None) -> str | None:
        with self.session() as s:
            row = s.get(Setting, key)
            return row.value if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self.transaction() as s:
            s.merge(Setting(key=key, value=value))

    def bump_revision(self, key: str) -> int:
        """Increment a revision counter (policy, devices) that the daemon polls to notice outside changes."""
        with self.transaction() as s:
            # One UPDATE, so two writers (web UI and CLI) can never both read n and write n + 1.
            bumped = s.execute(
                update(Setting).where(Setting.key == key).values(value=cast(cast(Setting.value, Integer) + 1, Text))
            )
            if bumped.rowcount == 0:
                s.add(Setting(key=key, value="1"))
            return int(s.get(Setting, key).value)

    def close(self) -> None:
        self.engine.dispose()
        self.querylog_engine.dispose()


def _create_private(path: Path) -> None:
    """Create the database file if missing, readable by its owner only: password hashes, token digests and
    the household's query log. SQLite gives the -wal and -shm files the database file's mode and owner.

    Created by root (``sudo iotgw user set-password`` before the service first ran), it is handed to the
    state directory's owner, or the service user could not open its own database.
    """
    try:
        fd = create_private(path)
    except FileExistsError:
        return
    os.close(fd)


def _engine(url: str) -> Engine:
    u = make_url(url)
    if u.drivername == "postgresql":  # the driver the `postgres` extra installs, not SQLAlchemy's psycopg2
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True)
    if u.database not in (None, "", ":memory:"):
        if Path(u.database).is_dir():  # checked before the query log's file is made beside it
            raise DatabaseUnavailable(f"{redact_url(url)}: {u.database} is a directory, not a database file")
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        _create_private(Path(u.database))
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API connection
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below), not the driver
        cur = dbapi_conn.cursor()
        # WAL: readers (the web UI) never block the daemon's writer; NORMAL sync is safe in WAL and spares
        # the SD card a flush per commit.
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:  # noqa: ANN001 - Connection
        options = conn.get_execution_options()
        wanted = int(BUSY_TIMEOUT_S * 1000) if options.get("wait", True) else 0
        kept = conn.connection.info  # lives as long as the pooled SQLite connection: a 0 never outlasts its use
        if kept.get("busy_timeout_ms", int(BUSY_TIMEOUT_S * 1000)) != wanted:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={wanted}")
            kept["busy_timeout_ms"] = wanted
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("immediate") else "BEGIN")

    return engine


def _upgrade(engine: Engine, metadata: MetaData, branch: str) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        cfg.attributes["metadata"] = metadata
        command.upgrade(cfg, f"{branch}@head")


def known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of this version's migrations: a database from a newer iotgw is not, and
    migrating it would fail in alembic's words ("Can't locate revision")."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    try:
        return ScriptDirectory.from_config(cfg).get_revision(revision) is not None
    except CommandError:  # "Can't locate revision identified by ..."
        return False
