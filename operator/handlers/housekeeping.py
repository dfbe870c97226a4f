"""The operator's timers (docs/design.md#reconciliation): sweep expired cache entries, enforce request-log retention,
purge sharded replays' orphaned sums.

Both delete in bounded batches, so a large backlog never holds long locks, and both are safe to
run from several operators at once (a row is deleted once; the others find nothing).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.retention import Retention

_log = logging.getLogger("promptcache.housekeeping")


@dataclass(frozen=True)
class Housekeeping:
    interval: timedelta = timedelta(minutes=5)
    grace: timedelta = timedelta(hours=1)
    """Expired entries are kept this long after expiry (the replay and debugging window)."""
    log_retention: timedelta = timedelta(days=30)
    shard_retention: timedelta = timedelta(days=1)
    """A sharded replay's sums are added up when its Job completes; any left this long were orphaned."""
    batch: int = 5000


async def run_once(pg: Database, settings: Housekeeping, now: datetime | None = None) -> tuple[int, int, int]:
    """(entries swept, log rows purged, orphaned replay shards purged)."""
    now = now or datetime.now(UTC)
    retention = Retention(pg)
    swept = await retention.sweep_expired(settings.grace, settings.batch, now)
    purged = await retention.purge_request_log(now - settings.log_retention, settings.batch)
    shards = await retention.purge_replay_shards(now - settings.shard_retention, settings.batch)
    return swept, purged, shards


async def loop(pg: Database, settings: Housekeeping) -> None:
    while True:
        try:
            swept, purged, shards = await run_once(pg, settings)
            if swept or purged or shards:
                _log.info("housekeeping: swept %d expired entries, purged %d request-log rows and %d orphaned "
                          "replay shards", swept, purged, shards)
        except IndexUnavailable as exc:
            _log.warning("housekeeping skipped, Postgres unavailable: %s", exc)
        await asyncio.sleep(settings.interval.total_seconds())
