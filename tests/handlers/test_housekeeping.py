"""The operator's timers against real Postgres: sweep past the grace period, purge old log rows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from promptcache.operator.handlers.housekeeping import Housekeeping, run_once
from promptcache.proxy.domain.classify import ChainBlock, Classification, Write
from promptcache.proxy.domain.entries import Scope
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.pricing import Split, Tariff
from promptcache.proxy.storage.ledger import Ledger, RequestRecord
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.schema import migrate

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SCOPE = Scope("tenant", "model", "tok")


def record(rid: str, at: datetime, writes: tuple[Write, ...] = ()) -> RequestRecord:
    return RequestRecord(
        request_id=rid, started_at=at, scope=SCOPE, api="openai", status=200, split=Split(100, 10),
        tariff=Tariff.for_policy("model", Decimal(3), Decimal(15), CachePolicy()),
        chain=[ChainBlock(b"h" * 32, 100, "user", None)], classification=Classification(None, writes),
    )


@pytest.fixture
async def lone_pg(empty_pg_dsn: str) -> AsyncIterator[Database]:
    await migrate(empty_pg_dsn)
    pg = await Database.connect(empty_pg_dsn)
    yield pg
    await pg.close()


async def test_run_once_sweeps_beyond_grace_and_purges_beyond_retention(lone_pg: Database,
                                                                        empty_pg_dsn: str) -> None:
    expiries = {  # relative to NOW; grace is 1 h
        b"a": -timedelta(hours=3), b"b": -timedelta(hours=1, seconds=1), b"c": -timedelta(minutes=59),
        b"d": timedelta(minutes=5),
    }
    writes = tuple(Write(i, h * 32, 100 * (i + 1), "5m", NOW + d) for i, (h, d) in enumerate(expiries.items()))
    await Ledger(lone_pg).commit(record("writer", NOW - timedelta(days=40), writes))
    await Ledger(lone_pg).commit(record("recent", NOW - timedelta(days=29)))
    await Ledger(lone_pg).commit(record("old", NOW - timedelta(days=31)))
    conn = await asyncpg.connect(empty_pg_dsn)
    try:
        for shard, written in enumerate((NOW - timedelta(days=2), NOW - timedelta(hours=1))):
            await conn.execute("INSERT INTO replay_shards (replay_uid, generation, shard, shards, requests, sums, "
                               "written_at) VALUES ('uid', 1, $1, 2, 0, '', $2)", shard, written)
    finally:
        await conn.close()
    swept, purged, shards = await run_once(lone_pg, Housekeeping(batch=1), NOW)
    assert (swept, purged, shards) == (2, 2, 1)  # entries a and b; log rows writer and old; the 2-day-old shard
    conn = await asyncpg.connect(empty_pg_dsn)
    try:
        assert [r["shard"] for r in await conn.fetch("SELECT shard FROM replay_shards")] == [1]
        left = sorted(bytes(r["prefix_hash"][:1]) for r in await conn.fetch("SELECT prefix_hash FROM cache_entries"))
        logs = sorted(r["request_id"] for r in await conn.fetch("SELECT request_id FROM request_log"))
        ledger = await conn.fetchval("SELECT count(*) FROM ledger")
    finally:
        await conn.close()
    assert left == [b"c", b"d"]
    assert logs == ["recent"]
    assert ledger == 3  # the ledger is money: retention never touches it
    assert await run_once(lone_pg, Housekeeping(batch=1), NOW) == (0, 0, 0)
