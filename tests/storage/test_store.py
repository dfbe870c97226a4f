"""The proxy's store: a row Postgres refuses is set aside in full, never retried forever."""

from __future__ import annotations

import logging

import asyncpg
import pytest

from promptcache.proxy.metrics import Metrics
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.store import Store

from support.builders import finished_request as record


async def test_refused_row_is_set_aside_and_logged_and_the_queue_moves_on(
    pg: Database, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    store = Store(pg, None, metrics)
    bad = record(2**40)  # a cumulative count beyond Postgres integer: a row the database refuses
    with caplog.at_level(logging.ERROR, logger="promptcache.store"):
        await store.commit(bad)
    assert store.spool.count == 0
    assert metrics.registry.get_sample_value("promptcache_ledger_dropped_total") == 1.0
    assert any(bad.request_id in r.getMessage() and "set aside" in r.getMessage() for r in caplog.records)
    good = record(2000)
    await store.commit(good)
    conn = await asyncpg.connect(pg_dsn)
    try:
        ids = {r["request_id"] for r in await conn.fetch(
            "SELECT request_id FROM ledger WHERE request_id = ANY($1::text[])", [bad.request_id, good.request_id])}
    finally:
        await conn.close()
    assert ids == {good.request_id}
