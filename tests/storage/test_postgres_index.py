"""The Postgres storage against a real database: one-trip lookups, the episode rule, idempotent commits,
sweeping, tariffs, API keys, and every failure ending as IndexUnavailable with no partial state.

Requests go through the real pipeline (lookup → classify → reconcile → commit), so what is
stored is what the proxy would store; expected values are written out by hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import pytest

from promptcache.proxy.domain.classify import ChainBlock, Classification, Write, candidates, classify
from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.domain.policy import DEFAULT_WRITE_MULTIPLIERS, CachePolicy
from promptcache.proxy.domain.pricing import Tariff, reconcile
from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.index import PrefixIndex
from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.ledger import Ledger, RequestRecord
from promptcache.proxy.storage.memory import merge_write
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.retention import Retention
from promptcache.proxy.storage.schema import migrate
from promptcache.proxy.storage.tariffs import Tariffs

if TYPE_CHECKING:
    from asyncpg.transaction import Transaction

    from promptcache.proxy.storage.postgres import Conn as PoolConn

    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record]

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
POLICY = CachePolicy()
TARIFF = Tariff("model-a", Decimal("3"), Decimal("15"), DEFAULT_WRITE_MULTIPLIERS, Decimal("0.1"))
DEAD_DSN = "postgresql://postgres@127.0.0.1:1/postgres"
RETRY_LOG = "retrying once after a lost Postgres connection"


def hh(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def new_scope() -> Scope:
    """Every test caches under its own principal, so tests sharing the session database never meet."""
    return Scope(f"principal-{secrets.token_hex(4)}", "model-a", "cl100k_base@test")


def chain(*blocks: tuple[str, int, str | None]) -> list[ChainBlock]:
    return [ChainBlock(hh(name), tokens, "user", tier) for name, tokens, tier in blocks]


async def request(
    pg: Database,
    scope: Scope,
    now: datetime,
    blocks: Sequence[ChainBlock],
    *,
    completion: int = 100,
    status: int = 200,
    tariff: Tariff = TARIFF,
    request_id: str | None = None,
) -> RequestRecord:
    """What the proxy builds for a request: look up its candidates, classify, reconcile with usage."""
    found = await PrefixIndex(pg).lookup(scope, candidates(blocks, POLICY))
    classification = classify(blocks, found, POLICY, now)
    return RequestRecord(
        request_id=request_id or f"req-{secrets.token_hex(6)}",
        started_at=now,
        scope=scope,
        api="openai",
        status=status,
        split=reconcile(blocks[-1].tokens, completion, classification),
        tariff=tariff,
        chain=blocks,
        classification=classification,
        latency_ms=12.5,
    )


async def served(
    pg: Database, scope: Scope, now: datetime, blocks: Sequence[ChainBlock]
) -> RequestRecord:
    record = await request(pg, scope, now, blocks)
    assert await Ledger(pg).commit(record) is True
    return record


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Conn]:
    """A plain connection for inspecting what the index stored."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def entry(db: Conn, scope: Scope, name: str) -> IndexEntry | None:
    row = await db.fetchrow(
        "SELECT prefix_hash, cum_tokens, tier, created_at, expires_at, replica FROM cache_entries"
        " WHERE principal_id = $1 AND virtual_model = $2 AND tokenizer_version = $3 AND prefix_hash = $4",
        *scope,
        hh(name),
    )
    return None if row is None else IndexEntry(*row)


async def row_versions(db: Conn, scope: Scope) -> set[tuple[bytes, str]]:
    """Each entry's hash and xmin: a row rewritten by any later transaction gets a new xmin."""
    rows = await db.fetch(
        "SELECT prefix_hash, xmin::text FROM cache_entries WHERE principal_id = $1", scope[0]
    )
    return {(r["prefix_hash"], r["xmin"]) for r in rows}


async def ledger_rows(db: Conn, request_id: str) -> list[asyncpg.Record]:
    return await db.fetch("SELECT * FROM ledger WHERE request_id = $1", request_id)


# --- lookup -------------------------------------------------------------------------------------


async def test_lookup_of_twenty_candidates_is_one_query(pg_dsn: str) -> None:
    queries: list[tuple[str, tuple[object, ...]]] = []

    async def log_queries(conn: Conn) -> None:
        conn.add_query_logger(lambda q: queries.append((q.query, q.args)))

    pg = await Database.connect(pg_dsn, max_size=1, init=log_queries)
    try:
        scope = new_scope()
        blocks = chain(*((f"t20-{i}", 1024 + 100 * i, "5m" if i in (4, 9) else None) for i in range(19)))
        # Serving a first request also lets asyncpg introspect bytea[], which it does once per connection.
        await served(pg, scope, T0, blocks[:10])
        blocks.append(ChainBlock(hh("t20-last"), 4000, "user", "5m"))
        wanted = candidates(blocks, POLICY)
        assert len(wanted) == 20
        await asyncio.sleep(0)  # query loggers are called soon after a query, not inline
        queries.clear()

        found = await PrefixIndex(pg).lookup(scope, wanted)
        await asyncio.sleep(0)
    finally:
        await pg.close()

    [(query, args)] = queries
    assert "FROM cache_entries" in query and args[3] == wanted
    assert sorted(found) == sorted([hh("t20-4"), hh("t20-9")])
    assert found[hh("t20-9")] == IndexEntry(hh("t20-9"), 1924, "5m", T0, T0 + 5 * MIN)


async def test_lookup_returns_expired_entries_and_only_asked_hashes(pg: Database) -> None:
    scope = new_scope()
    await served(pg, scope, T0, chain(("x1", 2000, "5m"), ("x2", 3000, "5m")))

    found = await PrefixIndex(pg).lookup(scope, [hh("x2"), hh("unknown")])

    assert found == {hh("x2"): IndexEntry(hh("x2"), 3000, "5m", T0, T0 + 5 * MIN)}
    assert not found[hh("x2")].live(T0 + 5 * MIN)
    assert await PrefixIndex(pg).lookup(scope, []) == {}


async def test_scope_isolation(pg: Database) -> None:
    owner = new_scope()
    await served(pg, owner, T0, chain(("shared-prompt", 2000, "1h")))

    assert list(await PrefixIndex(pg).lookup(owner, [hh("shared-prompt")])) == [hh("shared-prompt")]
    for other in (
        owner._replace(principal_id="someone-else"),
        owner._replace(virtual_model="model-b"),
        owner._replace(tokenizer_version="o200k_base@test"),
    ):
        assert await PrefixIndex(pg).lookup(other, [hh("shared-prompt")]) == {}


# --- commit -------------------------------------------------------------------------------------


async def test_a_bill_made_without_knowing_its_tariff_version_names_the_one_in_force(pg: Database, db: Conn) -> None:
    """A proxy that priced from its config while Postgres was away (version 0) still gets a ledger row naming the
    stored version in force at the request's start with exactly those prices; other prices, or before any version
    was in force, stay NULL rather than name a tariff they were not billed at."""
    model = f"unversioned-{secrets.token_hex(4)}"
    priced = replace(TARIFF, model=model)
    stored = await Tariffs(pg).set(priced, T0)
    blocks = chain(("sys", 2048, "1h"), ("q", 2500, None))
    cases = [(T0 + MIN, priced, stored.version), (T0 - MIN, priced, None),
             (T0 + MIN, replace(priced, input_per_mtok=Decimal("4")), None),
             (T0 + MIN, replace(priced, read_multiplier=Decimal("0.2")), None)]
    for at, tariff, version in cases:
        scope = Scope(f"principal-{secrets.token_hex(4)}", model, "cl100k_base@test")
        record = await request(pg, scope, at, blocks, tariff=tariff)
        assert tariff.version == 0 and await Ledger(pg).commit(record) is True
        [row] = await ledger_rows(db, record.request_id)
        assert row["tariff_version"] == version, (at, tariff)


async def test_commit_bills_once_and_writes_once(pg: Database, db: Conn) -> None:
    scope = new_scope()
    tariff = await Tariffs(pg).set(replace(TARIFF, model=f"priced-{secrets.token_hex(4)}"), T0 - MIN)
    await served(pg, scope, T0, chain(("sys", 2048, "1h"), ("q1", 2500, None)))
    blocks = chain(("sys", 2048, "1h"), ("doc", 3548, "5m"), ("q2", 5000, None))
    record = await request(pg, scope, T0 + 10 * MIN, blocks, completion=200, tariff=tariff)

    assert await Ledger(pg).commit(record) is True
    versions = await row_versions(db, scope)
    assert await Ledger(pg).commit(record) is False

    [row] = await ledger_rows(db, record.request_id)
    # uncached 1452·3 + read 2048·3·0.1 + creation 1500·3·1.25 + completion 200·15, per million
    assert row["cost"] == Decimal("0.0135954")
    assert row["list_cost"] == Decimal("0.018")
    assert str(row["cost"]) == str(record.cost)
    assert (row["prompt_tokens"], row["completion_tokens"], row["uncached_tokens"]) == (5000, 200, 1452)
    assert (row["read_tokens"], row["creation_5m"], row["creation_1h"]) == (2048, 1500, 0)
    assert row["creation_24h"] == 0
    assert (row["tariff_version"], row["started_at"]) == (tariff.version, T0 + 10 * MIN)
    assert await entry(db, scope, "sys") == IndexEntry(hh("sys"), 2048, "1h", T0, T0 + 70 * MIN)
    assert await entry(db, scope, "doc") == IndexEntry(hh("doc"), 3548, "5m", T0 + 10 * MIN, T0 + 15 * MIN)
    assert await row_versions(db, scope) == versions  # the retry rewrote no entry
    assert await db.fetchval("SELECT count(*) FROM request_log WHERE request_id = $1", record.request_id) == 1


async def test_request_log_row(pg: Database, db: Conn) -> None:
    scope = new_scope()
    blocks = chain(("log-sys", 1500, "1h"), ("log-q", 1800, None))
    record = replace(await request(pg, scope, T0, blocks, completion=7), engine_cached_tokens=1499)
    await Ledger(pg).commit(record)

    row = await db.fetchrow("SELECT * FROM request_log WHERE request_id = $1", record.request_id)
    billed = await db.fetchval("SELECT engine_cached_tokens FROM ledger WHERE request_id = $1", record.request_id)
    assert billed == 1499

    assert row is not None
    expected = {
        "request_id": record.request_id,
        "ts": T0,
        "principal_id": scope.principal_id,
        "virtual_model": "model-a",
        "tokenizer_version": "cl100k_base@test",
        "api": "openai",
        "status": 200,
        "prompt_tokens": 1800,
        "completion_tokens": 7,
        "read_tokens": 0,
        "creation_5m": 0,
        "creation_1h": 1500,
        "creation_24h": 0,
        "input_per_mtok": Decimal("3"),
        "output_per_mtok": Decimal("15"),
        "billed_cost": Decimal("0.010005"),  # (300·3 + 1500·3·2.0 + 7·15) / 10⁶
        "list_cost": Decimal("0.005505"),
        "latency_ms": 12.5,
        "chain_hashes": [hh("log-sys")[:16], hh("log-q")[:16]],
        "chain_tokens": [1500, 1800],
        "chain_roles": ["user", "user"],
        "chain_tiers": ["1h", None],
        "engine_cached_tokens": 1499,
        "prompt_cache_key": None,
        "response_id": None,
    }
    assert dict(row) == expected


async def test_failed_request_is_logged_but_neither_billed_nor_cached(
    pg: Database, db: Conn
) -> None:
    scope = new_scope()
    record = await request(pg, scope, T0, chain(("err", 3000, "5m")), status=500)

    assert await Ledger(pg).commit(record) is True
    assert await Ledger(pg).commit(record) is False

    assert await ledger_rows(db, record.request_id) == []
    assert await entry(db, scope, "err") is None
    logged = await db.fetchrow(
        "SELECT status, billed_cost FROM request_log WHERE request_id = $1", record.request_id
    )
    assert tuple(logged or ()) == (500, Decimal(0))


async def test_corrupt_split_bills_list_price_and_writes_nothing(pg: Database, db: Conn) -> None:
    scope = new_scope()
    record = await request(pg, scope, T0, chain(("big", 3000, "5m")))
    # The upstream says the prompt was 1000 tokens; our split creates 3000.
    corrupt = replace(record, split=reconcile(1000, 100, record.classification))

    assert await Ledger(pg).commit(corrupt) is True

    [row] = await ledger_rows(db, record.request_id)
    assert (row["cost"], row["list_cost"], row["read_tokens"], row["creation_5m"]) == (
        Decimal("0.0045"),
        Decimal("0.0045"),
        0,
        0,
    )
    assert await entry(db, scope, "big") is None


WRITE_5M = Write(0, hh("ep"), 2000, "5m", T0 + 65 * MIN)


@pytest.mark.parametrize(
    ("existing", "write", "now", "expected"),
    [
        pytest.param(
            IndexEntry(hh("ep"), 1900, "1h", T0 - 2 * 60 * MIN, T0 - 60 * MIN),
            WRITE_5M,
            T0 + 60 * MIN,
            IndexEntry(hh("ep"), 2000, "5m", T0 + 60 * MIN, T0 + 65 * MIN),
            id="expired-new-episode",
        ),
        pytest.param(
            IndexEntry(hh("ep"), 2000, "5m", T0, T0 + 60 * MIN),
            WRITE_5M,
            T0 + 60 * MIN,
            IndexEntry(hh("ep"), 2000, "5m", T0 + 60 * MIN, T0 + 65 * MIN),
            id="expiring-exactly-now-new-episode",
        ),
        pytest.param(
            IndexEntry(hh("ep"), 2000, "5m", T0, T0 + 62 * MIN),
            WRITE_5M,
            T0 + 60 * MIN,
            IndexEntry(hh("ep"), 2000, "5m", T0, T0 + 65 * MIN),
            id="live-keeps-start-takes-later-expiry",
        ),
        pytest.param(
            IndexEntry(hh("ep"), 2000, "1h", T0, T0 + 90 * MIN),
            WRITE_5M,
            T0 + 60 * MIN,
            IndexEntry(hh("ep"), 2000, "1h", T0, T0 + 90 * MIN),
            id="live-with-later-expiry-unchanged",
        ),
    ],
)
async def test_write_follows_the_episode_rule(
    pg: Database,
    db: Conn,
    existing: IndexEntry,
    write: Write,
    now: datetime,
    expected: IndexEntry,
) -> None:
    scope = new_scope()
    await db.execute(
        "INSERT INTO cache_entries VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        *scope,
        existing.prefix_hash,
        existing.cum_tokens,
        existing.tier,
        existing.created_at,
        existing.expires_at,
    )
    classification = Classification(None, (write,), {"5m": write.tokens, "1h": 0, "24h": 0})
    record = RequestRecord(
        f"req-{secrets.token_hex(6)}",
        now,
        scope,
        "anthropic",
        200,
        reconcile(write.tokens, 10, classification),
        TARIFF,
        [ChainBlock(write.hash, write.tokens, "user", write.tier)],
        classification,
    )

    assert await Ledger(pg).commit(record) is True

    assert merge_write(existing, write, now) == expected
    assert await entry(db, scope, "ep") == expected


async def test_concurrent_writers_of_one_prefix_share_an_episode(pg: Database, db: Conn) -> None:
    scope = new_scope()
    first = await request(pg, scope, T0, chain(("conc", 2000, "5m")))
    second = await request(pg, scope, T0 + MIN, chain(("conc", 2000, "1h")))
    # Both were classified before either committed, so both write the same prefix.
    assert first.split.creation_tokens == second.split.creation_tokens == 2000

    assert await Ledger(pg).commit(first) is True
    assert await Ledger(pg).commit(second) is True

    assert await entry(db, scope, "conc") == IndexEntry(hh("conc"), 2000, "1h", T0, T0 + 61 * MIN)


async def test_read_slides_expiry_and_late_commits_never_shorten_it(
    pg: Database, db: Conn
) -> None:
    scope = new_scope()
    await served(pg, scope, T0, chain(("slide", 2000, "1h")))
    blocks = chain(("slide", 2000, "1h"), ("slide-q", 2100, None))
    early = await request(pg, scope, T0 + 10 * MIN, blocks)
    late = await request(pg, scope, T0 + 30 * MIN, blocks)
    assert early.split.read == late.split.read == 2000

    assert await Ledger(pg).commit(late) is True
    assert await entry(db, scope, "slide") == IndexEntry(hh("slide"), 2000, "1h", T0, T0 + 90 * MIN)
    assert await Ledger(pg).commit(early) is True
    assert await entry(db, scope, "slide") == IndexEntry(hh("slide"), 2000, "1h", T0, T0 + 90 * MIN)


async def test_write_behind_commit_leaves_the_read_to_refresh_many(pg: Database, db: Conn) -> None:
    scope, other = new_scope(), new_scope()
    await served(pg, scope, T0, chain(("wb", 2000, "5m")))
    await served(pg, other, T0, chain(("wb", 2000, "1h")))
    record = await request(pg, scope, T0 + MIN, chain(("wb", 2000, "5m"), ("wb-next", 2500, "5m")))

    assert await Ledger(pg).commit(record, refresh_read=False) is True
    assert await entry(db, scope, "wb") == IndexEntry(hh("wb"), 2000, "5m", T0, T0 + 5 * MIN)
    assert await entry(db, scope, "wb-next") == IndexEntry(hh("wb-next"), 2500, "5m", T0 + MIN, T0 + 6 * MIN)

    moved = await PrefixIndex(pg).refresh_many(
        [
            (scope, hh("wb"), T0 + 6 * MIN, "http://a"),
            (scope, hh("wb"), T0 + 8 * MIN, "http://b"),  # a later refresh of the same entry in the same batch wins
            (other, hh("wb"), T0 + 30 * MIN, "http://c"),  # earlier than its stored expiry: never shortened
            (scope, hh("never-stored"), T0 + 9 * MIN, None),
        ]
    )

    assert moved == 1
    assert await entry(db, scope, "wb") == IndexEntry(hh("wb"), 2000, "5m", T0, T0 + 8 * MIN, "http://b")
    assert await entry(db, other, "wb") == IndexEntry(hh("wb"), 2000, "1h", T0, T0 + 60 * MIN)
    assert await PrefixIndex(pg).refresh_many([]) == 0


# --- retention ----------------------------------------------------------------------------------


@pytest.fixture
async def lone_pg(empty_pg_dsn: str) -> AsyncIterator[tuple[Database, Conn]]:
    """An index on a database of its own, for tests that delete across all scopes."""
    await migrate(empty_pg_dsn)
    pg = await Database.connect(empty_pg_dsn)
    conn = await asyncpg.connect(empty_pg_dsn)
    try:
        yield pg, conn
    finally:
        await conn.close()
        await pg.close()


async def test_sweep_deletes_only_entries_expired_beyond_grace(
    lone_pg: tuple[Database, Conn],
) -> None:
    pg, conn = lone_pg
    grace = 10 * MIN
    expiries = {f"old-{i}": T0 - grace - (i + 1) * MIN for i in range(5)}
    expiries |= {"within-grace": T0 - grace + MIN, "at-cutoff": T0 - grace, "live": T0 + MIN}
    await conn.executemany(
        "INSERT INTO cache_entries VALUES ('p', 'm', 't', $1, 1024, '5m', $2, $3)",
        [(hh(name), expires - 5 * MIN, expires) for name, expires in expiries.items()],
    )

    assert await Retention(pg).sweep_expired(grace, batch=2, now=T0) == 5

    left = await conn.fetch("SELECT prefix_hash FROM cache_entries")
    assert sorted(r["prefix_hash"] for r in left) == sorted([hh("within-grace"), hh("at-cutoff"), hh("live")])
    assert await Retention(pg).sweep_expired(grace, batch=2, now=T0) == 0


async def test_request_log_purge_in_batches(lone_pg: tuple[Database, Conn]) -> None:
    pg, conn = lone_pg
    scope = new_scope()
    for minutes in range(-4, 2):
        record = await request(
            pg, scope, T0 + minutes * MIN, chain(("p", 10, None)), request_id=f"r{minutes}"
        )
        await Ledger(pg).commit(record)

    assert await Retention(pg).purge_request_log(T0, batch=3) == 4

    left = await conn.fetch("SELECT request_id FROM request_log ORDER BY ts")
    assert [r["request_id"] for r in left] == ["r0", "r1"]
    assert await conn.fetchval("SELECT count(*) FROM ledger") == 6


# --- API keys -----------------------------------------------------------------------------------


async def test_api_keys_are_stored_only_as_hashes(pg: Database, db: Conn) -> None:
    keys, principal = ApiKeys(pg), f"team-{secrets.token_hex(4)}"
    key_id, key = await keys.create(principal)

    stored = await db.fetchrow("SELECT k::text AS whole, k.* FROM api_keys k WHERE key_id = $1", key_id)
    assert stored is not None
    assert key.startswith("pc-") and len(key) == 46
    assert key not in stored["whole"] and key.encode() not in stored["key_hash"]
    assert stored["key_hash"] == hashlib.sha256(key.encode()).digest()
    assert key_id == stored["key_hash"].hex()[:12]
    assert (stored["principal_id"], stored["revoked_at"]) == (principal, None)

    assert await keys.principal_for(key) == principal
    assert await keys.principal_for(key + "x") is None
    assert await keys.revoke(key_id) is True
    assert await keys.principal_for(key) is None
    assert await keys.revoke(key_id) is False
    assert await keys.revoke("000000000000") is False


# --- tariffs ------------------------------------------------------------------------------------


async def test_tariffs_are_append_only(pg: Database) -> None:
    tariffs, model = Tariffs(pg), f"tariffed-{secrets.token_hex(4)}"
    exact = Decimal("0.123456789012345678901234567890")
    first = Tariff(model, exact, Decimal("15.000"), DEFAULT_WRITE_MULTIPLIERS, Decimal("0.10"))
    day = timedelta(days=1)

    v1 = await tariffs.set(first, T0)
    assert v1 == replace(first, version=v1.version, valid_from=T0)
    assert str(v1.input_per_mtok) == "0.123456789012345678901234567890"
    assert (str(v1.output_per_mtok), str(v1.write_multipliers["1h"])) == ("15.000", "2.0")
    assert await tariffs.set(replace(first, read_multiplier=Decimal("0.1")), T0 + day) == v1

    v2 = await tariffs.set(replace(first, input_per_mtok=Decimal("2.5")), T0 + 2 * day)
    closed = replace(v1, valid_until=T0 + 2 * day)
    assert v2.version > v1.version and (v2.valid_from, v2.valid_until) == (T0 + 2 * day, None)
    assert await tariffs.history(model) == [closed, v2]

    assert await tariffs.at(model, T0 - timedelta(microseconds=1)) is None
    assert await tariffs.at(model, T0) == closed
    assert await tariffs.at(model, T0 + 2 * day - timedelta(microseconds=1)) == closed
    assert await tariffs.at(model, T0 + 2 * day) == v2

    with pytest.raises(ValueError, match="precedes the active version"):
        await tariffs.set(first, T0 + day)

    await tariffs.close(model, T0 + 3 * day)
    assert await tariffs.at(model, T0 + 3 * day) is None
    assert await tariffs.history(model) == [closed, replace(v2, valid_until=T0 + 3 * day)]


async def test_concurrent_first_tariffs_both_land(pg: Database) -> None:
    tariffs, model = Tariffs(pg), f"raced-{secrets.token_hex(4)}"
    a = Tariff(model, Decimal(1), Decimal(2), DEFAULT_WRITE_MULTIPLIERS, Decimal("0.1"))

    await asyncio.gather(
        tariffs.set(a, T0), tariffs.set(replace(a, input_per_mtok=Decimal(9)), T0)
    )

    history = await tariffs.history(model)
    assert len(history) == 2 and [t.valid_until for t in history] == [T0, None]


# --- failures -----------------------------------------------------------------------------------


async def test_ping(pg: Database) -> None:
    await pg.ping()


async def test_dead_database_is_unavailable_at_connect() -> None:
    with pytest.raises(IndexUnavailable) as failure:
        await Database.connect(DEAD_DSN, connect_timeout=2.0)
    assert failure.value.reason == "connect"


async def test_pool_exhaustion_is_not_retried(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    pg = Database(pool, acquire_timeout=0.05)
    try:
        async with pool.acquire():
            with pytest.raises(IndexUnavailable) as failure:
                await PrefixIndex(pg).lookup(new_scope(), [hh("any")])
    finally:
        await pg.close()
    assert failure.value.reason == "pool_exhausted"
    assert RETRY_LOG not in caplog.text


async def test_a_commit_waits_longer_for_a_connection_than_a_lookup(pg_dsn: str, db: Conn) -> None:
    """A commit is off the response path: it outlasts a burst on the pool that makes a lookup give up."""
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    pg = Database(pool, acquire_timeout=0.05, commit_acquire_timeout=5.0)
    scope = new_scope()
    try:
        record = await request(pg, scope, T0, chain(("w1", 2000, "5m")))
        async with pool.acquire():
            with pytest.raises(IndexUnavailable) as failure:
                await PrefixIndex(pg).lookup(scope, [hh("w1")])
            commit = asyncio.ensure_future(Ledger(pg).commit(record))
            await asyncio.sleep(0.3)  # six lookup timeouts
            assert not commit.done()
        assert await commit is True
    finally:
        await pg.close()
    assert failure.value.reason == "pool_exhausted"
    assert len(await ledger_rows(db, record.request_id)) == 1
    assert await entry(db, scope, "w1") is not None


@pytest.fixture
async def admin(pg_dsn: str) -> AsyncIterator[Conn]:
    """Watches and terminates the index's backends (its own connection, so pg_stat_activity is fresh)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def blocked_backend(admin: Conn, app: str, *, besides: Sequence[int] = ()) -> int:
    """The pid of the index's backend waiting on a lock (polling: the commit runs in another task)."""
    for _ in range(500):
        pid = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
            " AND NOT pid = ANY($2::int[])",
            app,
            list(besides),
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.01)
    raise AssertionError(f"no backend of {app} blocked on a lock")


@dataclass
class LockedRead:
    """A request whose commit must refresh a cache entry that another session holds FOR UPDATE."""

    db: Conn
    scope: Scope
    record: RequestRecord
    before: IndexEntry | None
    locker: Conn
    lock: Transaction

    async def release(self) -> None:
        await self.lock.rollback()
        await self.locker.close()

    async def assert_untouched(self) -> None:
        request_id = self.record.request_id
        assert await ledger_rows(self.db, request_id) == []
        logged = await self.db.fetchval("SELECT count(*) FROM request_log WHERE request_id = $1", request_id)
        assert logged == 0
        assert await entry(self.db, self.scope, "after") is None
        assert await entry(self.db, self.scope, "held") == self.before


async def locked_read(pg: Database, db: Conn, pg_dsn: str) -> LockedRead:
    scope = new_scope()
    await served(pg, scope, T0, chain(("held", 2000, "5m")))
    before = await entry(db, scope, "held")
    blocks = chain(("held", 2000, "5m"), ("after", 2600, "5m"), ("tail", 2700, None))
    record = await request(pg, scope, T0 + MIN, blocks)
    assert record.classification is not None and record.classification.read is not None
    locker = await asyncpg.connect(pg_dsn)
    lock = locker.transaction()
    await lock.start()
    await locker.execute(
        "SELECT 1 FROM cache_entries WHERE principal_id = $1 AND prefix_hash = $2 FOR UPDATE",
        scope.principal_id,
        hh("held"),
    )
    return LockedRead(db, scope, record, before, locker, lock)


@asynccontextmanager
async def named_pool(pg_dsn: str, *, min_size: int = 1, max_size: int = 10) -> AsyncIterator[tuple[Database, str]]:
    """A pool of the test's own under an application_name of its own, so the test can find (and kill) its
    backends in pg_stat_activity; closed at the end."""
    app = f"pc-test-{secrets.token_hex(4)}"
    pg = await Database.connect(pg_dsn, application_name=app, min_size=min_size, max_size=max_size)
    try:
        yield pg, app
    finally:
        await pg.close()


async def test_backend_killed_mid_commit_twice_leaves_nothing_then_commit_succeeds(
    pg_dsn: str, db: Conn, admin: Conn
) -> None:
    async with named_pool(pg_dsn) as (pg, app):
        case = await locked_read(pg, db, pg_dsn)
        record = case.record
        try:
            commit = asyncio.create_task(Ledger(pg).commit(record))
            first = await blocked_backend(admin, app)
            await admin.execute("SELECT pg_terminate_backend($1)", first)
            second = await blocked_backend(admin, app, besides=[first])
            await admin.execute("SELECT pg_terminate_backend($1)", second)
            with pytest.raises(IndexUnavailable) as failure:
                await commit
            assert failure.value.reason == "connection_lost"
            await case.assert_untouched()
        finally:
            await case.release()

        assert await Ledger(pg).commit(record) is True
        assert len(await ledger_rows(db, record.request_id)) == 1
        assert await entry(db, case.scope, "held") == IndexEntry(hh("held"), 2000, "5m", T0, T0 + 6 * MIN)


async def test_one_kill_mid_commit_is_survived_by_the_retry(
    pg_dsn: str, db: Conn, admin: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    async with named_pool(pg_dsn) as (pg, app):
        case = await locked_read(pg, db, pg_dsn)
        record = case.record
        try:
            commit = asyncio.create_task(Ledger(pg).commit(record))
            first = await blocked_backend(admin, app)
            await admin.execute("SELECT pg_terminate_backend($1)", first)
            await blocked_backend(admin, app, besides=[first])
        finally:
            await case.release()
        assert await commit is True
    assert len(await ledger_rows(db, record.request_id)) == 1
    assert RETRY_LOG in caplog.text


async def test_statement_timeout_is_unavailable_and_rolled_back(
    pg_dsn: str, db: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    pg = await Database.connect(pg_dsn, command_timeout=0.2)
    try:
        case = await locked_read(pg, db, pg_dsn)
        record = case.record
        try:
            with pytest.raises(IndexUnavailable) as failure:
                await Ledger(pg).commit(record)
            assert failure.value.reason == "timeout"
            await case.assert_untouched()
        finally:
            await case.release()
    finally:
        await pg.close()
    assert RETRY_LOG not in caplog.text


async def test_idle_connection_killed_between_requests_is_survived(pg_dsn: str, admin: Conn) -> None:
    async with named_pool(pg_dsn, min_size=1, max_size=1) as (pg, app):
        scope = new_scope()
        await served(pg, scope, T0, chain(("idle", 2000, "1h")))
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1", app
        )
        assert killed == 1

        assert list(await PrefixIndex(pg).lookup(scope, [hh("idle")])) == [hh("idle")]


async def test_a_lost_deadlock_is_retried_once(pg: Database, pg_dsn: str) -> None:
    """Two transactions locking two rows in opposite orders (group commits from two processes can): Postgres aborts
    one, and Database.run runs it again, so both land."""
    table = f"deadlock_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"CREATE TABLE {table} (k int PRIMARY KEY, v int NOT NULL); "
                        f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
    attempts = {"ab": 0, "ba": 0}
    both_locked = asyncio.Barrier(2)

    async def transfer(name: str, first: int, second: int) -> None:
        async def work(conn: PoolConn) -> None:
            attempts[name] += 1
            async with conn.transaction():
                await conn.execute(f"UPDATE {table} SET v = v + 1 WHERE k = $1", first)
                if attempts[name] == 1:
                    await both_locked.wait()
                await conn.execute(f"UPDATE {table} SET v = v + 1 WHERE k = $1", second)

        await pg.run(work, commit=True)

    try:
        await asyncio.gather(transfer("ab", 1, 2), transfer("ba", 2, 1))
        assert sorted(attempts.values()) == [1, 2]
        assert [tuple(r) for r in await admin.fetch(f"SELECT k, v FROM {table} ORDER BY k")] == [(1, 2), (2, 2)]
    finally:
        await admin.execute(f"DROP TABLE {table}")
        await admin.close()
