"""The proxy's storage: Redis in front of Postgres, a spool behind, and one failure rule.

Lookups ask Redis first and Postgres only for candidates deeper than Redis's deepest live hit,
so a warm conversation costs one MGET. Commits go to Postgres first (the ledger is the truth),
grouped (one committer sends everything waiting in one round trip), and then through to Redis.
Read refreshes are debounced and flushed to Postgres in batches while Redis is up; with Redis
down they ride in the commit. Postgres being down means no discount, and the commit goes to the
ledger spool (on disk with ``--spool-dir``), drained oldest first when Postgres is back; a commit
the spool cannot hold is counted and logged in full at ERROR, never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from promptcache.proxy.domain.diagnose import Previous
from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.metrics import Metrics
from promptcache.proxy.storage.budgets import Budget, BudgetCache, Budgets
from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.index import PrefixIndex
from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.ledger import CommitRow, Ledger, RequestRecord, commit_row
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.redis import RedisAccelerator
from promptcache.proxy.storage.requestids import RequestIds
from promptcache.proxy.storage.requestlog import previous_request
from promptcache.proxy.storage.spool import MemorySpool, Spool

_log = logging.getLogger("promptcache.store")
REFUSED = "refused"
"""The IndexUnavailable reason for a row Postgres rejects (bad data, a broken constraint): retrying cannot help."""
DEFAULT_SPOOL_BYTES = 1 << 30
"""The spool's default bound (``--spool-max-mb``): about half a million commits of a typical request."""



@dataclass(frozen=True, slots=True)
class Found:
    """What a lookup found. ``complete`` is False when Redis answered but Postgres could not be asked for the
    deeper candidates (Postgres down, Redis up): the design doc's "Postgres down, Redis up"."""

    entries: dict[bytes, IndexEntry]
    complete: bool = True


@dataclass(eq=False)
class _Pending:
    record: RequestRecord
    row: CommitRow
    write_behind: bool
    """The read's expiry slides through the debounced refresh, not in the commit (Redis is up)."""
    done: asyncio.Future[None]


class Store:
    def __init__(
        self,
        pg: Database | None,
        redis: RedisAccelerator | None,
        metrics: Metrics,
        *,
        spool: Spool | None = None,
        batch_limit: int = 256,
        flush_interval: float = 1.0,
        retry_interval: float = 2.0,
        key_cache_seconds: float = 60.0,
    ) -> None:
        self.pg = pg
        """The pool itself, for readiness and shutdown; the proxy's statements go through the three below."""
        self.index = PrefixIndex(pg) if pg is not None else None
        self.ledger = Ledger(pg) if pg is not None else None
        self.api_keys = ApiKeys(pg) if pg is not None else None
        self.request_ids = RequestIds(pg) if pg is not None else None
        self.budgets = BudgetCache(Budgets(pg)) if pg is not None else None
        self.redis = redis
        self.metrics = metrics
        self.spool = spool if spool is not None else MemorySpool(DEFAULT_SPOOL_BYTES)
        self.batch_limit = batch_limit
        self.flush_interval = flush_interval
        self.retry_interval = retry_interval
        self.key_cache_seconds = key_cache_seconds
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._committing = asyncio.Lock()
        self._down: str | None = None
        """The reason the last commit failed, until a drain lands: commits go straight to the spool meanwhile."""
        self._refreshes: dict[tuple[Scope, bytes], IndexEntry] = {}
        self._inflight: dict[Scope, set[asyncio.Future[None]]] = {}
        self._keys: dict[bytes, tuple[str, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._publish_spool()

    def start(self) -> None:
        """The committer, the refresh flush and the spool drain (first right away: start-up replays the spool)."""
        self._tasks = [asyncio.create_task(self._commit_loop()), asyncio.create_task(self._flush_loop()),
                       asyncio.create_task(self._drain_loop())]
        if self.budgets is not None:
            self._tasks.append(asyncio.create_task(self.budgets.run()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.commit_pending()
        await self.flush_refreshes()
        await self.drain_spool()
        if self.spool.count and not self.spool.durable:
            _log.error("stopping with %d commits in the memory spool, lost: run with --spool-dir", self.spool.count)

    def submit(self, record: RequestRecord) -> asyncio.Future[None]:
        """Commit in the background, with whatever else is waiting (a group commit); the future is done when the
        row landed or was spooled. A commit that writes entries holds back its scope's next lookup, so an
        agent's next turn reads what its previous turn wrote even when it arrives a millisecond after the
        response; commits that only bill and refresh hold back nothing."""
        result = record.classification
        applies = record.billable and result is not None and record.split.cache_valid
        write_behind = bool(applies and self.redis is not None and self.redis.available
                            and result is not None and result.read is not None)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(record, commit_row(record, refresh_read=not write_behind), write_behind, done))
        self._wake.set()
        if result is None or not result.writes:
            return done
        inflight = self._inflight.setdefault(record.scope, set())
        inflight.add(done)

        def finished(f: asyncio.Future[None]) -> None:
            inflight.discard(f)
            if not inflight and self._inflight.get(record.scope) is inflight:
                del self._inflight[record.scope]

        done.add_done_callback(finished)
        return done

    async def lookup(self, scope: Scope, hashes: Sequence[bytes], now: datetime) -> Found:
        """Live and stored entries among ``hashes`` (ordered shallow to deep). Raises when nothing could be asked;
        a Postgres failure after a Redis hit is an incomplete :class:`Found` (counted by its reason)."""
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
            return Found(found)
        try:
            if self.index is None:
                raise IndexUnavailable("postgres", "not configured")
            rows = await self.index.lookup(scope, remaining)
        except IndexUnavailable as exc:
            if not found:
                raise
            self.metrics.index_fallbacks.labels(exc.reason).inc()
            return Found(found, complete=False)
        found.update(rows)
        if redis is not None and rows:
            with contextlib.suppress(IndexUnavailable):
                await redis.put(scope, rows.values(), now)
        return Found(found)

    async def commit(self, record: RequestRecord) -> None:
        """Commit one record now, with whatever else is waiting; never raises."""
        done = self.submit(record)
        await self.commit_pending()
        await done

    async def commit_pending(self) -> None:
        """Commit everything submitted, ``batch_limit`` rows per round trip; one committer at a time, so a
        burst becomes a few large groups instead of many transactions racing for the pool."""
        async with self._committing:
            while self._pending:
                batch, self._pending = self._pending[:self.batch_limit], self._pending[self.batch_limit:]
                start = time.perf_counter()
                try:
                    await self._commit_batch(batch)
                except asyncio.CancelledError:
                    # Stopping, mid-round-trip: whether the group landed is unknown, so it goes back to be
                    # committed (again, harmlessly) by whoever commits next, the stop itself at the latest.
                    self._pending[:0] = batch
                    raise
                except Exception:
                    _log.exception("group commit failed unexpectedly; spooling it")
                    await self._spool(batch, "unexpected")
                self.metrics.commit_seconds.observe(time.perf_counter() - start)
                self.metrics.commit_batch.observe(len(batch))
                for p in batch:
                    if not p.done.done():
                        p.done.set_result(None)

    async def _commit_batch(self, batch: list[_Pending]) -> None:
        if self._down is not None or self.ledger is None:
            await self._spool(batch, self._down or "postgres")
            return
        try:
            results = await self.ledger.commit_many([p.row for p in batch])
        except IndexUnavailable as exc:
            if exc.reason == REFUSED:
                await self._commit_singly(batch)
                return
            self._down = exc.reason
            _log.warning("Postgres cannot take commits, spooling until it can: %s", exc)
            await self._spool(batch, exc.reason)
            return
        for p, committed in zip(batch, results, strict=True):
            await self._committed(p, committed)

    async def _commit_singly(self, batch: list[_Pending]) -> None:
        """A group with a row Postgres refuses: find it by committing one at a time, and set only it aside."""
        assert self.ledger is not None
        for p in batch:
            try:
                (committed,) = await self.ledger.commit_many([p.row])
            except IndexUnavailable as exc:
                if exc.reason == REFUSED:
                    self._set_aside(p.row, exc)
                else:
                    await self._spool([p], exc.reason)
                continue
            await self._committed(p, committed)

    async def _committed(self, p: _Pending, committed: bool) -> None:
        """Write through to Redis what this commit wrote (a retried commit wrote nothing)."""
        record, result = p.record, p.record.classification
        if not committed or result is None or not record.billable or not record.split.cache_valid:
            return
        if p.write_behind and result.read is not None:
            r = result.read
            self._refresh(record.scope, IndexEntry(r.hash, r.tokens, r.tier, record.started_at, r.expires_at,
                                                   record.replica))
        if result.writes and self.redis is not None and self.redis.available:
            entries = [IndexEntry(w.hash, w.tokens, w.tier, record.started_at, w.expires_at, record.replica)
                       for w in result.writes]
            try:
                await self.redis.put(record.scope, entries, datetime.now(UTC))
            except IndexUnavailable:
                self.metrics.index_fallbacks.labels("redis_unavailable").inc()

    async def _spool(self, batch: list[_Pending], reason: str) -> None:
        self.metrics.index_fallbacks.labels("commit_" + reason).inc(len(batch))
        for row in await self.spool.append([p.row for p in batch]):
            self.metrics.ledger_dropped.inc()
            _log.error("ledger spool full (%d bytes), dropping commit %s: %s", self.spool.max_bytes, row.request_id,
                       msgspec.json.encode(row).decode())
        self._publish_spool()

    def _set_aside(self, row: CommitRow, exc: IndexUnavailable) -> None:
        """A row Postgres refuses (not an outage) would fail forever and block the spool behind it:
        count it and log it in full, so it can be recovered by hand."""
        self.metrics.ledger_dropped.inc()
        _log.error("Postgres refused commit %s (%s), set aside: %s", row.request_id, exc,
                   msgspec.json.encode(row).decode())

    def _publish_spool(self) -> None:
        self.metrics.ledger_queued.set(self.spool.count)
        self.metrics.ledger_spool_bytes.set(self.spool.size)

    async def drain_spool(self) -> int:
        """Commit spooled rows oldest first, a segment at a time, stopping at the first failure; returns how many
        landed. Rows of a segment a crash interrupted are committed again, and find their ledger rows."""
        landed = 0
        try:
            while self.ledger is not None and (segment := await self.spool.oldest()) is not None:
                number, rows = segment
                for i in range(0, len(rows), self.batch_limit):
                    landed += await self._drain_group(rows[i:i + self.batch_limit])
                await self.spool.release(number)
            self._down = None
        except IndexUnavailable as exc:
            self._down = exc.reason
        finally:
            self._publish_spool()
        return landed

    async def _drain_group(self, rows: list[CommitRow]) -> int:
        """Commit spooled rows (no Redis write-through: lookups fill Redis from Postgres); raises when Postgres
        cannot take them, sets aside only rows it refuses."""
        assert self.ledger is not None
        try:
            await self.ledger.commit_many(rows)
            return len(rows)
        except IndexUnavailable as exc:
            if exc.reason != REFUSED:
                raise
        landed = 0
        for row in rows:
            try:
                await self.ledger.commit_many([row])
                landed += 1
            except IndexUnavailable as exc:
                if exc.reason != REFUSED:
                    raise
                self._set_aside(row, exc)
        return landed

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
            await self.index.refresh_many([(scope, h, e.expires_at, e.replica) for (scope, h), e in batch.items()])
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

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.commit_pending()

    async def _drain_loop(self) -> None:
        while True:
            if self.spool.count or self._down is not None:
                await self.drain_spool()
            await asyncio.sleep(self.retry_interval)

    def cached_principal(self, digest: bytes) -> str | None:
        """The principal of a key hash known a moment ago, without asking Postgres."""
        cached = self._keys.get(digest)
        return cached[0] if cached is not None and cached[1] > time.monotonic() else None

    async def previous_request(self, principal: str, ident: str) -> Previous | None:
        """The principal's logged request ``ident`` names, for cache-miss diagnostics; IndexUnavailable when
        Postgres cannot say."""
        if self.pg is None:
            raise IndexUnavailable("postgres", "not configured")
        return await previous_request(self.pg, principal, ident)

    async def reserve_request_id(self, request_id: str, principal: str) -> bool:
        """Whether a client's request id was free and is now this request's; IndexUnavailable when unknown."""
        if self.request_ids is None:
            raise IndexUnavailable("postgres", "not configured")
        return await self.request_ids.reserve(request_id, principal)

    def over_budget(self, principal: str) -> Budget | None:
        """The principal's monthly budget when it is used up (as last loaded); IndexUnavailable when unknown."""
        if self.budgets is None:
            raise IndexUnavailable("postgres", "not configured")
        return self.budgets.over(principal)

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
