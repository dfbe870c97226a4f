"""The migrations runner against real Postgres: concurrent, idempotent, and clear when it cannot connect."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from promptcache.proxy.storage.schema import MigrationError, available, migrate

TABLES = {"schema_migrations", "cache_entries", "tariffs", "api_keys", "ledger", "request_log", "proxy_secrets",
          "client_request_ids", "replay_shards", "budgets", "budget_spend"}


SHIPPED = [(1, "init"), (2, "engine_cached_tokens"), (3, "proxy_secrets"), (4, "prompt_cache_key"),
           (5, "client_request_ids"), (6, "response_id"), (7, "replay_shards"),
           (8, "usage_and_keys"), (9, "budgets"), (10, "entry_replica")]


def test_shipped_migrations_are_numbered_from_one() -> None:
    assert [(m.version, m.name) for m in available()] == SHIPPED


async def test_concurrent_migrators_apply_each_version_once(empty_pg_dsn: str) -> None:
    first, second = await asyncio.gather(migrate(empty_pg_dsn), migrate(empty_pg_dsn))

    assert sorted([first.applied, second.applied]) == [[], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert first.warnings == second.warnings == []
    conn = await asyncpg.connect(empty_pg_dsn)
    try:
        recorded = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    assert [tuple(r) for r in recorded] == SHIPPED
    assert {r["tablename"] for r in tables} == TABLES


async def test_rerun_applies_nothing(pg_dsn: str) -> None:
    assert (await migrate(pg_dsn)).applied == []


async def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(MigrationError, match=r"^cannot connect to Postgres: "):
        await migrate("postgresql://postgres@127.0.0.1:1/postgres", connect_timeout=2.0)
