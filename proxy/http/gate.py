"""docs/design.md#overload: classifications take turns, so a saturated proxy still classifies.

Hashing and counting a prompt is CPU work on the event loop, done in steps that yield. Left to run all
at once, 500 classifications share the loop and each finishes late, so every one misses its deadline
and bills list price. Through the gate at most ``slots`` run at a time, in arrival order; the deadline
counts from a classification's turn, not from its wait. The wait overlaps the upstream's own latency.
When more than ``queue_limit`` wait, new requests are shed (429 + ``Retry-After``) before anything is
forwarded: a bounded delay instead of an unbounded one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from promptcache.proxy.metrics import Metrics


class ClassifyGate:
    def __init__(self, slots: int, queue_limit: int, metrics: Metrics) -> None:
        self.slots, self.queue_limit = slots, queue_limit
        self._semaphore = asyncio.Semaphore(slots) if slots else None
        self._metrics = metrics
        self.waiting = 0

    @property
    def full(self) -> bool:
        """Too many waiting: a new request would wait longer than the queue is meant to hold."""
        return self._semaphore is not None and self.waiting >= self.queue_limit

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for a slot (none with ``slots`` 0: no gate), hold it for the block."""
        if self._semaphore is None:
            yield
            return
        self.waiting += 1
        self._metrics.classify_queue.inc()
        start = time.perf_counter()
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
            self._metrics.classify_queue.dec()
        self._metrics.classify_wait_seconds.observe(time.perf_counter() - start)
        try:
            yield
        finally:
            self._semaphore.release()
