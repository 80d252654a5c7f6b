"""The durable alert outbox and the recent-alerts history, both in the configuration database.

An alert is written here before it is published and deleted when the broker acknowledges it, so a broker
outage or a daemon restart loses nothing and keeps the order (the row id). The outbox is bounded: past
``max_rows`` the oldest alerts not yet handed to the MQTT client are dropped, the drop is counted (setting
``alerts_dropped_total``) and one ``alerts_dropped`` alert, kept up to date while the overflow lasts, says how
many and from when to when.
Any process may enqueue (the federation command too); the daemon's publisher polls the table. Only the
publisher's process drops: another cannot know which rows the publisher has handed to the MQTT client, so its
alerts may exceed the bound until the daemon's next alert trims it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from sqlalchemy import Connection, bindparam, delete, func, insert, select, text

from gateway.events import Alert
from gateway.store.db import Store
from gateway.store.schema import AlertRecord, OutboxMessage, Setting

DROPPED_TOTAL = "alerts_dropped_total"
HISTORY_KEEP = 2000  # alerts kept for the web UI's list


_INSERT_ALERT = insert(AlertRecord.__table__)
_PRUNE_ALERTS = delete(AlertRecord.__table__).where(AlertRecord.__table__.c.id <= bindparam("below"))
_INSERT_OUTBOX = insert(OutboxMessage.__table__)
_COUNT_OUTBOX = select(func.count()).select_from(OutboxMessage.__table__)
# PostgreSQL hands out ids when a row is inserted, not when it commits: writers in two processes (the daemon,
# the web UI) could commit id 2 before id 1, and the publisher, whose cursor had passed 2, would never send 1.
# One transaction-scoped advisory lock per insert makes commit order the id order. SQLite's single writer
# already does.
_OUTBOX_ORDER = text("SELECT pg_advisory_xact_lock(7306381101)")  # any constant, the same in every process


def lock_order(conn: Connection) -> None:
    """Within the caller's transaction, wait until no other outbox insert is uncommitted (PostgreSQL)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_OUTBOX_ORDER)


def record(conn: Connection, alert: Alert, *, publish: bool, history_keep: int = HISTORY_KEEP) -> None:
    """Write ``alert`` to the history and (``publish``: MQTT is on) the outbox within the caller's transaction,
    so that an alert about a change is written if and only if the change is. Never trims the outbox (only the
    publisher's process may: see the module's docstring)."""
    row = {"ts": alert.ts, "kind": alert.kind, "mac": alert.mac, "data": alert.data}
    # Table-level statements on the connection: this runs once per alert, and the ORM's session machinery costs
    # several times the SQL itself.
    (record_id,) = conn.execute(_INSERT_ALERT, row).inserted_primary_key
    conn.execute(_PRUNE_ALERTS, {"below": record_id - history_keep})
    if publish:
        lock_order(conn)
        conn.execute(_INSERT_OUTBOX, row)


class Outbox:
    """The outbox of one store. ``put`` is thread-safe; ``pending``/``remove`` are the publisher's."""

    def __init__(self, store: Store, *, max_rows: int = 10_000, history_keep: int = HISTORY_KEEP,
                 trims: bool = True) -> None:
        if max_rows < 2:
            raise ValueError("outbox_max must be at least 2")
        self.store = store
        self.max_rows = max_rows
        self.history_keep = history_keep
        self.trims = trims  # False outside the publisher's process: see the module's docstring
        # Rows up to this id are with the MQTT client already: a drop notice among them is not updated in
        # place (the client holds its old payload), a new one is written instead.
        self.handed_over = 0
        self._lock = threading.Lock()

    def put(self, alert: Alert, *, publish: bool = True) -> int:
        """Store ``alert`` in the history and (``publish``: MQTT is on) the outbox, in one transaction.
        Returns how many old alerts were dropped to make room."""
        with self._lock:
            with self.store.engine.begin() as conn:
                record(conn, alert, publish=publish, history_keep=self.history_keep)
                if not publish:
                    return 0
                full = self.trims and conn.execute(_COUNT_OUTBOX).scalar_one() > self.max_rows
            if not full:
                return 0
            with self.store.transaction() as s:
                return self._drop_oldest(s)

    def _drop_oldest(self, s) -> int:  # noqa: ANN001 - a Session
        # Counted again inside this transaction: another process (the web UI) may have trimmed meanwhile.
        excess = (s.scalar(select(func.count()).select_from(OutboxMessage)) or 0) - self.max_rows
        if excess <= 0:
            return 0
        # Rows handed to the MQTT client are delivered once the broker answers, deleted or not: dropping them
        # would count delivered alerts as lost. They stay, so the bound is exceeded by at most max_inflight.
        victims = s.execute(
            select(OutboxMessage.id, OutboxMessage.ts)
            .where(OutboxMessage.kind != "alerts_dropped", OutboxMessage.id > self.handed_over)
            .order_by(OutboxMessage.id)
            .limit(excess + 1)  # one more: the drop notice itself may need a row
        ).all()
        notice = s.scalar(
            select(OutboxMessage)
            .where(OutboxMessage.kind == "alerts_dropped", OutboxMessage.id > self.handed_over)
            .order_by(OutboxMessage.id.desc())
            .limit(1)
        )
        victims = victims[: excess if notice else excess + 1]
        if not victims:
            return 0
        s.execute(delete(OutboxMessage).where(OutboxMessage.id.in_([v.id for v in victims])))
        n, oldest, newest = len(victims), victims[0].ts, victims[-1].ts
        if notice:
            data = dict(notice.data)
            notice.data = {
                "dropped": data["dropped"] + n,
                "oldest_ts": data["oldest_ts"],
                "newest_ts": newest,
            }
        else:
            data = {"dropped": n, "oldest_ts": oldest, "newest_ts": newest}
            lock_order(s.connection())
            s.add(OutboxMessage(ts=newest, kind="alerts_dropped", mac=None, data=data))
            s.add(AlertRecord(ts=newest, kind="alerts_dropped", mac=None, data=data))
        total = s.get(Setting, DROPPED_TOTAL)
        if total is None:
            s.add(Setting(key=DROPPED_TOTAL, value=str(n)))
        else:
            total.value = str(int(total.value) + n)
        return n

    def pending(self, after_id: int, limit: int) -> list[OutboxMessage]:
        """The oldest ``limit`` rows after ``after_id``, in delivery order."""
        with self.store.session() as s:
            return list(
                s.scalars(
                    select(OutboxMessage)
                    .where(OutboxMessage.id > after_id)
                    .order_by(OutboxMessage.id)
                    .limit(limit)
                )
            )

    def remove(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        if ids:
            with self._lock, self.store.transaction() as s:
                s.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(ids)))

    def count(self) -> int:
        with self.store.session() as s:
            return s.scalar(select(func.count()).select_from(OutboxMessage)) or 0

    def dropped_total(self) -> int:
        return int(self.store.get_setting(DROPPED_TOTAL, "0") or 0)


def recent_alerts(
    store: Store,
    limit: int = 100,
    *,
    mac: str | None = None,
    kind: str | None = None,
    before_id: int | None = None,
) -> list[AlertRecord]:
    """The newest alerts first, for the web UI; ``before_id`` pages backwards."""
    stmt = select(AlertRecord).order_by(AlertRecord.id.desc()).limit(max(1, min(limit, 1000)))
    if mac:
        stmt = stmt.where(AlertRecord.mac == mac.lower())
    if kind:
        stmt = stmt.where(AlertRecord.kind == kind)
    if before_id:
        stmt = stmt.where(AlertRecord.id < before_id)
    with store.session() as s:
        return list(s.scalars(stmt))
