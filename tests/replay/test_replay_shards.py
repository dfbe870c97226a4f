"""docs/design.md#sharded-planreplay: a log in Postgres summed shard by shard, through the bytes a shard pod writes,
adds up to the single run's result, byte for byte; the shards hold every request once, each principal whole."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import msgspec
import pytest
from replay.test_replay import proposal, synthetic_log
from replay.test_replay_input import POLICIES, UNITS, digest

from promptcache.operator.replay import wire
from promptcache.operator.replay.engine import Partial, accumulate, finish, report
from promptcache.proxy.storage.requestlog import LoggedRequest, export_rows, import_rows
from promptcache.proxy.storage.schema import migrate

from support.database import scratch_database

LOG = synthetic_log(principals=30, seed=11)


@pytest.fixture(scope="module")
async def log_dsn() -> AsyncIterator[str]:
    """A database of this module's own holding LOG."""
    async with scratch_database() as dsn:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            assert await import_rows(conn, LOG) == len(LOG)
        finally:
            await conn.close()
        yield dsn


async def shard_rows(dsn: str, shard: int, shards: int) -> list[LoggedRequest]:
    conn = await asyncpg.connect(dsn)
    try:
        return [row async for row in export_rows(conn, shard=(shard, shards))]
    finally:
        await conn.close()


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
async def test_shards_partition_the_log_by_principal(log_dsn: str, shards: int) -> None:
    parts = [await shard_rows(log_dsn, k, shards) for k in range(shards)]
    assert sorted(r.id for part in parts for r in part) == sorted(r.id for r in LOG)
    for k, part in enumerate(parts):
        assert part == sorted(part, key=lambda r: (r.ts, r.id)), "each shard in (ts, id) order"
        # The test's own reckoning of SHARD_OF: the first 32 bits of the principal's MD5, modulo the shards.
        assert {int(hashlib.md5(r.principal.encode()).hexdigest()[:8], 16) % shards for r in part} <= {k}
    if shards > 1:
        assert sum(1 for part in parts if part) > 1, "the log's 30 principals spread over the shards"


@pytest.mark.parametrize("policy", range(len(POLICIES)))
@pytest.mark.parametrize("unit", UNITS)
async def test_shards_sums_through_their_bytes_add_up_to_the_single_run(log_dsn: str, policy: int,
                                                                        unit: str) -> None:
    p = proposal(*POLICIES[policy])
    expected = digest(LOG, policy, unit)
    for shards in (2, 3):
        total = Partial()
        for k in range(shards):
            total.add(wire.decode(wire.encode(accumulate(await shard_rows(log_dsn, k, shards), p, unit))))
        result = report(finish(total, p), p, seed=4, iterations=300, unit=unit).result
        assert result["digest"] == expected, (shards, unit)


def test_sums_keep_integers_beyond_64_bits_and_exact_decimals() -> None:
    group = ("m", Decimal("3.000001"), Decimal("15"))
    partial = Partial(cells={("p", group): [Decimal("1.50E-7"), 2**90 + 1, 3**60, 1, 2, 1, 1, Decimal("0.1")]},
                      creation={group: {"5m": 2**70, "1h": 0, "24h": 5}}, misses={group: list(range(14))},
                      skipped_status=1, without_chain=2,
                      over_limit=3, order_violations=4)
    back = wire.decode(wire.encode(partial))
    assert back == partial
    assert str(back.cells["p", group][0]) == "1.50E-7"


@pytest.mark.parametrize("data", [
    b"", b"not zlib", zlib.compress(b"{}"), zlib.compress(b"[" * 100_000),
    zlib.compress(msgspec.json.encode([["p"], [["m", "1", "1"]], [{"5m": 1}], [[0] * 14],
                                       [[0, 5, "1", 1, 1, 1, 1, 1, 1, "1"]], [0, 0, 0, 0]])),
    zlib.compress(msgspec.json.encode([["p"], [["m", "1", "1"]], [{"5m": 1}], [[0] * 14],
                                       [[-1, 0, "1", 1, 1, 1, 1, 1, 1, "1"]], [0, 0, 0, 0]])),
    zlib.compress(msgspec.json.encode([[], [], [{"7d": 1}], [], [], [0, 0, 0, 0]])),
    zlib.compress(msgspec.json.encode([[], [["m", "1", "1"]], [{"5m": 1}], [[0] * 13], [], [0, 0, 0, 0]])),
    zlib.compress(msgspec.json.encode([[], [], [], [], [], [0, 0, 0, 0], "extra"])),
], ids=["empty", "not-zlib", "object", "deep", "unknown-group", "negative-index", "unknown-tier", "short-misses",
        "extra-field"])
def test_bytes_that_are_not_sums_are_an_error(data: bytes) -> None:
    with pytest.raises(wire.WireError, match=r"^not a replay shard.s sums: "):
        wire.decode(data)
