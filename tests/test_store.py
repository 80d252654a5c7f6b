"""The store: migrations build exactly the schema the models declare, and the query log stays bounded."""

from __future__ import annotations

import time

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from gateway.events import DnsQuery
from gateway.store.db import Store, querylog_url
from gateway.store.querylog import QueryLogWriter, recent
from gateway.store.schema import ConfigBase, Query, QueryLogBase


def test_migrations_match_the_models(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    for engine, metadata in ((store.engine, ConfigBase.metadata), (store.querylog_engine, QueryLogBase.metadata)):
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == [], f"a model changed without a migration: {diff}"


def test_querylog_lives_apart_and_migrating_twice_is_harmless(tmp_path):
    url = f"sqlite:///{tmp_path / 'iotgw.sqlite'}"
    assert querylog_url(url).endswith("iotgw-querylog.sqlite")
    Store(url).migrate()
    assert (tmp_path / "iotgw-querylog.sqlite").exists()


def test_querylog_batches_and_prunes_by_age_and_size(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    writer = QueryLogWriter(store, days=1, max_rows=50)
    now = time.time()
    for i in range(80):
        ts = now - 3 * 86400 if i < 10 else now - i
        writer.add(DnsQuery(ts, "10.0.0.2", "02:00:00:00:00:01", f"n{i}.example.com", 1, "example.com"))
    assert writer.flush() == 80
    writer.prune(now)
    with store.querylog_session() as s:
        assert s.scalar(select(func.count()).select_from(Query)) == 50
        assert s.scalar(select(func.min(Query.ts))) > now - 86400
    assert recent(store, limit=1)[0].qname == "n79.example.com"


def test_revision_counter_increments(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'iotgw.sqlite'}")
    assert [store.bump_revision("x") for _ in range(3)] == [1, 2, 3]
