"""The Redis accelerator's entry values (docs/design.md#redis-accelerator) on a real Redis, under a prefix of the
test's own: what a proxy writes it reads back, replica included, and a value an older proxy wrote still reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.storage.redis import RedisAccelerator, _scope_id

from support.proxy import redis_prefix

SCOPE = Scope("alice", "chat", "tok@1")


def entry(name: bytes, replica: str | None, now: datetime) -> IndexEntry:
    return IndexEntry(name, 1200, "5m", now - timedelta(seconds=30), now + timedelta(minutes=4), replica)


async def test_entries_come_back_with_their_replica(redis_url: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)  # at the test's time: Redis expires keys by it
    async with redis_prefix(redis_url, "redisentries") as prefix:
        redis = RedisAccelerator.from_url(redis_url, prefix, timeout=1.0)
        try:
            written = [entry(b"a" * 16, "http://10.0.0.7:8000/v1", now), entry(b"b" * 16, None, now),
                       entry(b"c" * 16, "http://host/v1?x=a|b", now)]  # a | inside the URL stays in it
            await redis.put(SCOPE, written, now)
            found = await redis.get(SCOPE, [b"a" * 16, b"b" * 16, b"c" * 16, b"d" * 16], now)
            assert found == {e.prefix_hash: e for e in written}
            micros = [int(at.timestamp() * 1_000_000) for at in (now - timedelta(seconds=30),
                                                                 now + timedelta(minutes=4))]
            old = f"{prefix}entry:{_scope_id(SCOPE)}:{(b'e' * 16).hex()}"
            await redis.client.set(old, f"900|1h|{micros[0]}|{micros[1]}")  # as a proxy before routing wrote it
            assert await redis.get(SCOPE, [b"e" * 16], now) == {
                b"e" * 16: IndexEntry(b"e" * 16, 900, "1h", now - timedelta(seconds=30), now + timedelta(minutes=4))}
        finally:
            await redis.close()
