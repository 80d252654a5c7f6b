"""The query log: written in batches by one thread, bounded by age and by row count, and read back for the
CLI and the web UI."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from sqlalchemy import Integer, delete, func, insert, select
from sqlalchemy.exc import OperationalError

from gateway.events import DnsQuery
from gateway.store.db import Store
from gateway.store.schema import Query

log = logging.getLogger(__name__)
_COLUMNS = DnsQuery.__slots__


class QueryLogWriter:
    """Buffers queries and writes them every ``flush_interval_s`` in one transaction.

    A batch of 1,000 rows costs about what 25 single commits do (REFERENCE.md), and the SD card sees one write
    per interval. When the disk is full the batch is kept (up to ``max_buffer`` rows) and the error is logged
    once; writing resumes when space returns. A crash loses at most one interval.
    """

    def __init__(self, store: Store, *, flush_interval_s: float = 2.0, days: int = 90, max_rows: int = 2_000_000,
                 max_buffer: int = 200_000) -> None:
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.days = days
        self.max_rows = max_rows
        self.max_buffer = max_buffer
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._last_prune = 0.0
        self.written = 0
        self.dropped = 0

    def add(self, query: DnsQuery) -> None:
        row = {name: getattr(query, name) for name in _COLUMNS}  # dataclasses.asdict deep-copies: too slow here
        with self._lock:
            if len(self._buffer) >= self.max_buffer:
                self._buffer.pop(0)
                self.dropped += 1
            self._buffer.append(row)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="querylog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        self.flush()

    def flush(self) -> int:
        with self._lock:
            batch, self._buffer = self._buffer, []
        if not batch:
            return 0
        try:
            with self.store.querylog_session.begin() as s:
                s.execute(insert(Query), batch)
        except OperationalError as exc:
            with self._lock:  # keep the rows for the next try, oldest first, within the bound
                self._buffer = (batch + self._buffer)[-self.max_buffer :]
            if not self._failing:
                log.error("query log: cannot write (%s); DNS keeps answering, rows are kept in memory", exc.orig)
                self._failing = True
            return 0
        if self._failing:
            log.info("query log: writing again")
            self._failing = False
        self.written += len(batch)
        return len(batch)

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
        while not self._stop.wait(self.flush_interval_s):
            self.flush()
            if time.monotonic() - self._last_prune > 3600:
                self._last_prune = time.monotonic()
                try:
                    self.prune()
                except OperationalError as exc:
                    log.warning("query log: prune failed: %s", exc.orig)


def recent(store: Store, *, mac: str | None = None, search: str | None = None, verdict: str | None = None,
           limit: int = 100, before_id: int | None = None) -> list[Query]:
    """Newest first; ``before_id`` pages backwards (stable while new rows arrive)."""
    stmt = select(Query).order_by(Query.id.desc()).limit(min(limit, 1000))
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
