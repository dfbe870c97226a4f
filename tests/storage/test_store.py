"""The proxy's store: a row Postgres refuses is set aside in full, never retried forever."""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest

from promptcache.proxy.domain.classify import ChainBlock, classify
from promptcache.proxy.domain.entries import Scope
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.pricing import Tariff, reconcile
from promptcache.proxy.metrics import Metrics
from promptcache.proxy.storage.ledger import RequestRecord
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.store import Store

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def record(tokens: int) -> RequestRecord:
    policy = CachePolicy(min_prefix_tokens=1)
    chain = [ChainBlock(secrets.token_bytes(32), tokens, "user", "5m")]
    result = classify(chain, {}, policy, NOW)
    return RequestRecord(
        request_id=f"req-{secrets.token_hex(6)}", started_at=NOW,
        scope=Scope(f"p-{secrets.token_hex(3)}", "m", "tok"), api="openai", status=200,
        split=reconcile(min(tokens, 2**31 - 1), 10, result if tokens < 2**31 else None),
        tariff=Tariff.for_policy("m", Decimal(3), Decimal(15), policy),
        chain=chain, classification=result, latency_ms=1.0,
    )


async def test_refused_row_is_set_aside_and_logged_and_the_queue_moves_on(
    pg: Database, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    store = Store(pg, None, metrics)
    bad = record(2**40)  # a cumulative count beyond Postgres integer: a row the database refuses
    with caplog.at_level(logging.ERROR, logger="promptcache.store"):
        await store.commit(bad)
    assert len(store.queue) == 0
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
