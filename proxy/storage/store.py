"""The proxy's storage: Redis in front of Postgres, a commit queue behind, and one failure rule.

Lookups ask Redis first and Postgres only for candidates deeper than Redis's deepest live hit,
so a warm conversation costs one MGET. Commits go to Postgres first (the ledger is the truth)
and then through to Redis. Read refreshes are debounced and flushed to Postgres in batches
while Redis is up; with Redis down they ride in the commit transaction. Postgres being down
means no discount, and the commit waits in a bounded in-memory queue that is retried; a
commit that overflows the queue is counted and logged in full at ERROR, never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime

from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.metrics import Metrics
from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.index import PrefixIndex
from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.ledger import Ledger, RequestRecord
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.redis import RedisAccelerator

_log = logging.getLogger("promptcache.store")
REFUSED = "refused"
"""The IndexUnavailable reason for a row Postgres rejects (bad data, a broken constraint): retrying cannot help."""


def _loggable(value: object) -> object:
    """JSON for a dropped commit's log line. Not ``asdict``: it deep-copies, and cannot copy the
    read-only mappings (``MappingProxyType``) a split and a tariff carry."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


class Store:
    def __init__(
        self,
        pg: Database | None,
        redis: RedisAccelerator | None,
        metrics: Metrics,
        *,
        queue_limit: int = 10_000,
        flush_interval: float = 1.0,
        retry_interval: float = 2.0,
        key_cache_seconds: float = 60.0,
    ) -> None:
        self.pg = pg
        """The pool itself, for readiness and shutdown; the proxy's statements go through the three below."""
        self.index = PrefixIndex(pg) if pg is not None else None
        self.ledger = Ledger(pg) if pg is not None else None
        self.api_keys = ApiKeys(pg) if pg is not None else None
        self.redis = redis
        self.metrics = metrics
        self.queue: deque[RequestRecord] = deque()
        self.queue_limit = queue_limit
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self.key_cache_seconds = key_cache_seconds
        self._refreshes: dict[tuple[Scope, bytes], IndexEntry] = {}
        self._inflight: dict[Scope, set[asyncio.Task[None]]] = {}
        self._keys: dict[bytes, tuple[str, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._retry_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush_refreshes()
        await self.retry_queued()

    def submit(self, record: RequestRecord) -> asyncio.Task[None]:
        """Commit in the background. A commit that writes entries holds back its scope's next lookup,
        so an agent's next turn reads what its previous turn wrote even when it arrives a millisecond
        after the response; commits that only bill and refresh hold back nothing."""
        task = asyncio.create_task(self.commit(record))
        if record.classification is None or not record.classification.writes:
            return task
        inflight = self._inflight.setdefault(record.scope, set())
        inflight.add(task)

        def done(t: asyncio.Task[None]) -> None:
            inflight.discard(t)
            if not inflight and self._inflight.get(record.scope) is inflight:
                del self._inflight[record.scope]

        task.add_done_callback(done)
        return task

    async def lookup(self, scope: Scope, hashes: Sequence[bytes], now: datetime) -> dict[bytes, IndexEntry]:
        """Live and stored entries among ``hashes`` (ordered shallow to deep)."""
        inflight = self._inflight.get(scope)
        if inflight:
            await asyncio.wait(list(inflight))
        found: dict[bytes, IndexEntry] = {}
        remaining = list(hashes)
        redis = self.redis if self.redis is not None and self.redis.available else None
        if redis is not None:
            try:
                found = await redis.get(scope, remaining, now)
            except IndexUnavailable:
                self.metrics.index_fallbacks.labels("redis_unavailable").inc()
                redis = None
            if found:
                deepest = max(i for i, h in enumerate(remaining) if h in found)
                remaining = remaining[deepest + 1:]
        if not remaining:
            return found
        if self.index is None:
            raise IndexUnavailable("postgres", "not configured")
        rows = await self.index.lookup(scope, remaining)
        found.update(rows)
        if redis is not None and rows:
            with contextlib.suppress(IndexUnavailable):
                await redis.put(scope, rows.values(), now)
        return found

    async def commit(self, record: RequestRecord) -> None:
        """Commit off the response path; never raises."""
        start = time.perf_counter()
        try:
            await self._commit(record)
        finally:
            self.metrics.commit_seconds.observe(time.perf_counter() - start)

    async def _commit(self, record: RequestRecord) -> None:
        result = record.classification
        applies = record.billable and result is not None and record.split.cache_valid
        write_behind = applies and self.redis is not None and self.redis.available and result is not None \
            and result.read is not None
        try:
            if self.ledger is None:
                raise IndexUnavailable("postgres", "not configured")
            committed = await self.ledger.commit(record, refresh_read=not write_behind)
        except IndexUnavailable as exc:
            self._enqueue(record, exc)
            return
        if not committed or not applies or result is None:
            return
        if write_behind and result.read is not None:
            r = result.read
            self._refresh(record.scope, IndexEntry(r.hash, r.tokens, r.tier, record.started_at, r.expires_at))
        if result.writes and self.redis is not None and self.redis.available:
            entries = [IndexEntry(w.hash, w.tokens, w.tier, record.started_at, w.expires_at) for w in result.writes]
            try:
                await self.redis.put(record.scope, entries, datetime.now(UTC))
            except IndexUnavailable:
                self.metrics.index_fallbacks.labels("redis_unavailable").inc()

    def _enqueue(self, record: RequestRecord, exc: IndexUnavailable) -> None:
        self.metrics.index_fallbacks.labels("commit_" + exc.reason).inc()
        if exc.reason == REFUSED:
            self._set_aside(record, exc)
            return
        if len(self.queue) >= self.queue_limit:
            self.metrics.ledger_dropped.inc()
            _log.error("commit queue full, dropping commit %s: %s", record.request_id,
                       json.dumps(record, default=_loggable))
            return
        self.queue.append(record)
        self.metrics.ledger_queued.set(len(self.queue))
        _log.warning("queued commit %s: %s", record.request_id, exc)

    def _set_aside(self, record: RequestRecord, exc: IndexUnavailable) -> None:
        """A row Postgres refuses (not an outage) would fail forever and block the queue behind it:
        count it and log it in full, so it can be recovered by hand."""
        self.metrics.ledger_dropped.inc()
        _log.error("Postgres refused commit %s (%s), set aside: %s", record.request_id, exc,
                   json.dumps(record, default=_loggable))

    async def retry_queued(self) -> int:
        """Commit queued records oldest first, stopping at the first failure; returns how many landed."""
        done = 0
        while self.queue and self.ledger is not None:
            try:
                await self.ledger.commit(self.queue[0], refresh_read=True)
            except IndexUnavailable as exc:
                if exc.reason != REFUSED:
                    break
                self._set_aside(self.queue[0], exc)
            self.queue.popleft()
            done += 1
        self.metrics.ledger_queued.set(len(self.queue))
        return done

    def _refresh(self, scope: Scope, entry: IndexEntry) -> None:
        key = (scope, entry.prefix_hash)
        current = self._refreshes.get(key)
        if current is None or entry.expires_at > current.expires_at:
            self._refreshes[key] = entry

    async def flush_refreshes(self) -> None:
        """Slide the expiry of every entry read since the last flush: Postgres in one statement,
        then Redis, so a prefix read a thousand times a second costs one refresh per flush."""
        if not self._refreshes or self.index is None:
            return
        batch, self._refreshes = self._refreshes, {}
        try:
            await self.index.refresh_many([(scope, h, e.expires_at) for (scope, h), e in batch.items()])
        except IndexUnavailable:
            for (scope, _), entry in batch.items():
                self._refresh(scope, entry)
            return
        if self.redis is None or not self.redis.available:
            return
        by_scope: dict[Scope, list[IndexEntry]] = {}
        for (scope, _), entry in batch.items():
            by_scope.setdefault(scope, []).append(entry)
        now = datetime.now(UTC)
        try:
            for scope, entries in by_scope.items():
                await self.redis.put(scope, entries, now)
        except IndexUnavailable:
            self.metrics.index_fallbacks.labels("redis_unavailable").inc()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush_refreshes()

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            if self.queue:
                await self.retry_queued()

    def cached_principal(self, digest: bytes) -> str | None:
        """The principal of a key hash known a moment ago, without asking Postgres."""
        cached = self._keys.get(digest)
        return cached[0] if cached is not None and cached[1] > time.monotonic() else None

    async def principal_for_key(self, key: str) -> str | None:
        """The key's principal; known keys are cached briefly so a Postgres outage does not lock clients out."""
        digest = hashlib.sha256(key.encode()).digest()
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        if self.api_keys is None:
            raise IndexUnavailable("postgres", "not configured")
        try:
            principal = await self.api_keys.principal_for(key)
        except IndexUnavailable:
            if cached is not None:
                return cached[0]
            raise
        if principal is None:
            self._keys.pop(digest, None)
        else:
            self._keys[digest] = (principal, time.monotonic() + self.key_cache_seconds)
        return principal
