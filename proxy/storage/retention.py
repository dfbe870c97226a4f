"""Retention: delete cache entries long expired, request-log rows past their keeping time, and sharded replays'
sums left behind.

Deletes run in short bounded batches rather than one long statement, so the proxy's commits
never queue behind a large backlog, and several operators may run them at once (a row is
deleted once; the others find nothing).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from promptcache.proxy.storage.postgres import Database

# ctid batches keep each DELETE short; a row refreshed meanwhile has a new ctid and survives.
_SWEEP = """
DELETE FROM cache_entries WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM cache_entries WHERE expires_at < $1 LIMIT $2
))
"""
_PURGE_LOG = """
DELETE FROM request_log WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM request_log WHERE ts < $1 LIMIT $2
))
"""
_PURGE_SHARDS = """
DELETE FROM replay_shards WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM replay_shards WHERE written_at < $1 LIMIT $2
))
"""


class Retention:
    """The housekeeping deletes, over a shared :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def sweep_expired(self, grace: timedelta, batch: int = 1000, now: datetime | None = None) -> int:
        """Delete entries expired for longer than ``grace``, ``batch`` rows per statement; returns the count.

        The grace period keeps an entry a commit in flight may still refresh or re-write.
        """
        cutoff = (now or datetime.now(UTC)) - grace
        return await self._delete_in_batches(_SWEEP, cutoff, batch)

    async def purge_request_log(self, older_than: datetime, batch: int = 1000) -> int:
        """Request log retention: delete rows logged before ``older_than`` in bounded batches."""
        return await self._delete_in_batches(_PURGE_LOG, older_than, batch)

    async def purge_replay_shards(self, older_than: datetime, batch: int = 1000) -> int:
        """Sharded replays' sums nobody added up (their PlanReplay was deleted or changed while they ran)."""
        return await self._delete_in_batches(_PURGE_SHARDS, older_than, batch)

    async def _delete_in_batches(self, query: str, cutoff: datetime, batch: int) -> int:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        total = 0
        while True:
            status = await self._db.run(lambda conn: conn.execute(query, cutoff, batch))
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < batch:
                return total
