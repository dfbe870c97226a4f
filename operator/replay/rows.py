"""The request log as one stream of :class:`LoggedRequest` for the engine, from JSON Lines or Postgres.

The engine is synchronous and pulls requests one at a time, in (ts, id) order; a file is read lazily
and Postgres through a cursor, so memory does not grow with the log either way. The same window
selects the same requests from both: ``promptcache replay`` gives one result whichever it reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import TypeVar

import asyncpg

from promptcache.proxy.storage.requestlog import LoggedRequest, Shard, export_rows

_T = TypeVar("_T")
CHUNK = 1000
"""Rows taken from the cursor per turn of the event loop."""


class LogError(Exception):
    """The log cannot be read to its end; the message says where and why, in one line."""


async def from_postgres(conn: asyncpg.Connection[asyncpg.Record], since: datetime | None, until: datetime | None,
                        models: Sequence[str] | None, consume: Callable[[Iterator[LoggedRequest]], _T],
                        shard: Shard | None = None) -> _T:
    """``consume(requests)`` in a worker thread, the requests pulled from the cursor through this event loop
    a chunk at a time: the loop stays free between chunks (the operator keeps serving), and a cancelled
    caller ends the stream, so the thread finishes instead of reading on. ``shard``: only its principals."""
    loop = asyncio.get_running_loop()
    rows = export_rows(conn, since, until, models, shard)
    lock = asyncio.Lock()
    stopped = False

    async def chunk() -> list[LoggedRequest]:
        out: list[LoggedRequest] = []
        async with lock:
            if not stopped:
                async for row in rows:
                    out.append(row)
                    if len(out) == CHUNK:
                        break
        return out

    def feed() -> Iterator[LoggedRequest]:
        while batch := asyncio.run_coroutine_threadsafe(chunk(), loop).result():
            yield from batch

    try:
        return await asyncio.to_thread(consume, feed())
    finally:
        stopped = True
        async with lock:
            await rows.aclose()  # type: ignore[attr-defined]
