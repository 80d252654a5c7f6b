"""The query log: written in batches by one thread, bounded by age and by row count, and read back for the
CLI and the web UI."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from operator import attrgetter

from sqlalchemy import Integer, delete, func, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from gateway.events import DnsQuery
from gateway.store.db import Store
from gateway.store.schema import Query

log = logging.getLogger(__name__)
_COLUMNS = DnsQuery.__slots__  # the same names, in the same order, as the columns of ``queries``
_row = attrgetter(*_COLUMNS)  # one C call per query gives its row as a tuple
# The text columns a query's content can overflow (dnslib spells an unprintable byte as \ddd, so a legal 228-byte
# name is 770 characters), as (position in the row, column length). PostgreSQL refuses an over-long value.
_BOUNDED = tuple((i, Query.__table__.c[name].type.length) for i, name in enumerate(_COLUMNS)
                 if name in ("qname", "sld", "rule", "rule_words"))


def _fit(row: tuple) -> tuple:
    """The row with its names cut to their columns' sizes (PostgreSQL refuses a longer one; SQLite keeps it)."""
    if all(row[i] is None or len(row[i]) <= n for i, n in _BOUNDED):
        return row
    cells = list(row)
    for i, n in _BOUNDED:
        if cells[i] is not None:
            cells[i] = cells[i][:n]
    return tuple(cells)


class QueryLogWriter:
    """Buffers queries and writes them every ``flush_interval_s`` in one transaction, sooner when
    ``batch_rows`` are waiting.

    A batch of 1,000 rows costs about what 25 single commits do (REFERENCE.md), and the SD card sees one write
    per interval. Rows are plain tuples handed to the driver's executemany: the ORM's bulk insert cost more
    per row than answering the query did. At most ``max_buffer`` rows wait in memory (about 200 bytes each);
    beyond that new rows are dropped and counted (``dropped``), which only a flood far beyond what the writer
    keeps up with (>50k rows/s), or a full disk, ever reaches. When the disk is full the batch is kept within
    that bound and the error is logged once; writing resumes when space returns. A row the database refuses
    (PostgreSQL and a NUL character) is logged and dropped alone, counted in ``rejected``; the rest of its batch
    is written. A crash loses at most one interval.
    """

    def __init__(self, store: Store, *, flush_interval_s: float = 2.0, days: int = 90, max_rows: int = 2_000_000,
                 max_buffer: int = 50_000, batch_rows: int = 5_000) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.days = days
        self.max_rows = max_rows
        self.max_buffer = max_buffer
        self.batch_rows = batch_rows
        self._buffer: list[tuple] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._due = threading.Event()  # batch_rows are waiting: write now rather than at the interval
        self._insert = _insert_sql(store.querylog_engine.dialect.paramstyle)
        self._thread: threading.Thread | None = None
        self._failing = False
        self._last_prune = 0.0
        self.written = 0
        self.dropped = 0
        self.rejected = 0

    def add(self, queries: Iterable[DnsQuery]) -> int:
        """Queue queries for the next write; returns how many were dropped because the buffer is full.
        Thread-safe, one lock round per call: pass many at once."""
        rows = list(map(_row, queries))
        dropped = 0
        with self._lock:
            room = max(0, self.max_buffer - len(self._buffer))
            if len(rows) > room:
                dropped = len(rows) - room
                self.dropped += dropped
                rows = rows[:room]
            self._buffer += rows
            due = len(self._buffer) >= self.batch_rows
        if due:
            self._due.set()
        return dropped

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="querylog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._due.set()
        if self._thread:
            self._thread.join(timeout=10)
        self.flush()

    def flush(self) -> int:
        """Write what is waiting; returns how many rows were written."""
        with self._lock:
            batch, self._buffer = self._buffer, []
        if not batch:
            return 0
        try:
            self._write(batch)
        except OperationalError as exc:
            self._keep(batch, exc)
            return 0
        except SQLAlchemyError:
            written = self._write_without_refused_rows(batch)
        else:
            written = len(batch)
        if self._failing and written:
            log.info("query log: writing again")
            self._failing = False
        self.written += written
        return written

    def _write(self, rows: list[tuple]) -> None:
        with self.store.querylog_engine.begin() as conn:
            conn.exec_driver_sql(self._insert, rows)

    def _keep(self, rows: list[tuple], exc: OperationalError) -> None:
        """The database cannot be written (a full disk, a lost server): keep the rows for the next try."""
        with self._lock:  # oldest first, within the bound
            self._buffer = (rows + self._buffer)[-self.max_buffer :]
        if not self._failing:
            log.error("query log: cannot write (%s); DNS keeps answering, rows are kept in memory", exc.orig)
            self._failing = True

    def _write_without_refused_rows(self, batch: list[tuple]) -> int:
        """Write a batch the database refused: its names cut to their columns' sizes, then in halves, so that
        only the rows it refuses on their own are dropped; returns how many were written. A rare path (a refused
        batch costs about log2(n) transactions per bad row), so the common one pays for neither."""
        written = 0
        chunks = [list(map(_fit, batch))]  # a stack, the oldest rows last, so they are written first
        while chunks:
            chunk = chunks.pop()
            try:
                self._write(chunk)
            except OperationalError as exc:
                self._keep([row for c in (chunk, *reversed(chunks)) for row in c], exc)
                break
            except SQLAlchemyError as exc:
                if len(chunk) > 1:
                    half = len(chunk) // 2
                    chunks += (chunk[half:], chunk[:half])
                    continue
                self.rejected += 1
                log.error("query log: the database refused a query's row, dropped (%s): %.300r",
                          getattr(exc, "orig", exc), chunk[0])
            else:
                written += len(chunk)
        return written

    def prune(self, now: float | None = None) -> int:
        """Delete rows older than ``days`` and the oldest beyond ``max_rows``."""
        now = time.time() if now is None else now
        with self.store.querylog_session.begin() as s:
            removed = s.execute(delete(Query).where(Query.ts < now - self.days * 86400)).rowcount
            count = s.scalar(select(func.count()).select_from(Query)) or 0
            if count > self.max_rows:
                cutoff = s.scalar(select(Query.id).order_by(Query.id.desc()).offset(self.max_rows).limit(1))
                removed += s.execute(delete(Query).where(Query.id <= cutoff)).rowcount
        return removed

    def _run(self) -> None:
        while True:
            self._due.wait(self.flush_interval_s)
            self._due.clear()
            if self._stop.is_set():
                return  # stop() writes what is left
            try:
                self.flush()
            except Exception:  # the thread must outlive any one batch, or the log stops for good
                log.exception("query log: a batch could not be written")
            if time.monotonic() - self._last_prune > 3600:
                self._last_prune = time.monotonic()
                try:
                    self.prune()
                except SQLAlchemyError as exc:
                    log.warning("query log: prune failed: %s", getattr(exc, "orig", exc))


def _insert_sql(paramstyle: str) -> str:
    """The INSERT for one row as the driver spells it (SQLite's ``?``, psycopg's ``%s``)."""
    marks = {"qmark": "?", "format": "%s", "pyformat": "%s"}
    if paramstyle not in marks:
        raise ValueError(f"query log: unsupported database driver parameter style {paramstyle!r}")
    columns = ", ".join(_COLUMNS)
    values = ", ".join([marks[paramstyle]] * len(_COLUMNS))
    return f"INSERT INTO {Query.__tablename__} ({columns}) VALUES ({values})"  # noqa: S608 - fixed names; values bound


def recent(store: Store, *, mac: str | None = None, search: str | None = None, verdict: str | None = None,
           limit: int = 100, before_id: int | None = None) -> list[Query]:
    """Newest first; ``before_id`` pages backwards (stable while new rows arrive)."""
    # Clamped at both ends: SQLite reads a negative LIMIT as no limit at all.
    stmt = select(Query).order_by(Query.id.desc()).limit(max(1, min(limit, 1000)))
    if mac:
        stmt = stmt.where(Query.mac == mac)
    if search:
        stmt = stmt.where(Query.qname.contains(search.lower(), autoescape=True))
    if verdict:
        stmt = stmt.where(Query.verdict == verdict)
    if before_id:
        stmt = stmt.where(Query.id < before_id)
    with store.querylog_session() as s:
        return list(s.scalars(stmt))


def counts_since(store: Store, since: float) -> dict[str, tuple[int, int]]:
    """Per device: (queries, blocked) since ``since``: the 'today' counters of the UI and Home Assistant."""
    blocked = func.sum((Query.verdict == "blocked").cast(Integer))
    stmt = select(Query.mac, func.count(), blocked).where(Query.ts >= since).group_by(Query.mac)
    with store.querylog_session() as s:
        return {mac: (int(n), int(b or 0)) for mac, n, b in s.execute(stmt) if mac}
