"""Redis accelerator (docs/design.md#storage): a read-through copy of live entries in front of Postgres.

Each live entry is one key whose Redis expiry is the entry's own, so Redis forgets exactly
what has expired. Redis is never the source of truth: any error marks it down for a short
back-off and the proxy carries on with Postgres alone.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.storage.errors import IndexUnavailable


def _scope_id(scope: Scope) -> str:
    return hashlib.sha256("\x1f".join(scope).encode()).hexdigest()[:24]


def _micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def _at(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, UTC)


class RedisAccelerator:
    def __init__(self, client: aioredis.Redis, prefix: str = "promptcache:", backoff: float = 1.0) -> None:
        self.client = client
        self.prefix = prefix
        self.backoff = backoff
        self._down_until = 0.0

    @classmethod
    def from_url(cls, url: str, prefix: str = "promptcache:", timeout: float = 0.05) -> RedisAccelerator:
        client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False,
        )
        return cls(client, prefix)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _key(self, scope_id: str, prefix_hash: bytes) -> str:
        return f"{self.prefix}entry:{scope_id}:{prefix_hash.hex()}"

    def _failed(self, exc: BaseException) -> IndexUnavailable:
        self._down_until = time.monotonic() + self.backoff
        return IndexUnavailable("redis", str(exc) or type(exc).__name__)

    async def get(self, scope: Scope, hashes: Sequence[bytes], now: datetime) -> dict[bytes, IndexEntry]:
        """Live entries among ``hashes``, in one MGET."""
        if not hashes:
            return {}
        sid = _scope_id(scope)
        try:
            values = await self.client.mget([self._key(sid, h) for h in hashes])
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from None
        found: dict[bytes, IndexEntry] = {}
        for h, value in zip(hashes, values, strict=True):
            if value is None:
                continue
            text = value.decode() if isinstance(value, bytes) else value
            tokens, tier, created, expires, *replica = text.split("|", 4)  # no replica: written by an older proxy
            entry = IndexEntry(h, int(tokens), tier, _at(int(created)), _at(int(expires)), replica[0] or None
                               if replica else None)
            if entry.live(now):
                found[h] = entry
        return found

    async def put(self, scope: Scope, entries: Iterable[IndexEntry], now: datetime) -> None:
        """Write live entries through, each expiring with the entry (SET … PXAT)."""
        sid = _scope_id(scope)
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                queued = False
                for e in entries:
                    if not e.live(now):
                        continue
                    value = f"{e.cum_tokens}|{e.tier}|{_micros(e.created_at)}|{_micros(e.expires_at)}|{e.replica or ''}"
                    pipe.set(self._key(sid, e.prefix_hash), value, pxat=_micros(e.expires_at) // 1000)
                    queued = True
                if queued:
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise self._failed(exc) from None

    async def close(self) -> None:
        await self.client.aclose()
