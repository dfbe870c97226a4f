"""Keeping invalid API keys cheap (docs/design.md#authentication).

Each unknown key used to cost a Postgres query, so a client spraying random keys could exhaust the pool that
lookups and commits share. Two bounds, both in memory per process: an unknown key's hash is remembered briefly
(a key created meanwhile works after at most ``unknown_seconds``), and a client address with too many failed keys
in a window is answered 429 with ``Retry-After`` for keys it has not used successfully, without a lookup.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class AuthGuard:
    unknown_seconds: float = 5.0
    failures_per_window: int = 20
    window_seconds: float = 10.0
    max_tracked: int = 100_000
    """Unknown hashes and addresses remembered at most (the oldest are forgotten first)."""
    _unknown: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def known_unknown(self, digest: bytes) -> bool:
        """Whether this key hash was looked up and not found a moment ago."""
        until = self._unknown.get(digest)
        if until is None:
            return False
        if until <= time.monotonic():
            del self._unknown[digest]
            return False
        return True

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try unknown keys again, or None when it may now."""
        recent = self._recent(address, time.monotonic())
        if recent is None or len(recent) < self.failures_per_window:
            return None
        return max(1, math.ceil(recent[0] + self.window_seconds - time.monotonic()))

    def failed(self, address: str, digest: bytes) -> None:
        now = time.monotonic()
        self._unknown[digest] = now + self.unknown_seconds
        self._unknown.move_to_end(digest)
        recent = self._recent(address, now)
        if recent is None:
            recent = self._failures[address] = deque()
        recent.append(now)
        self._failures.move_to_end(address)
        for table in (self._unknown, self._failures):
            while len(table) > self.max_tracked:
                table.popitem(last=False)

    def _recent(self, address: str, now: float) -> deque[float] | None:
        recent = self._failures.get(address)
        if recent is not None:
            while recent and recent[0] <= now - self.window_seconds:
                recent.popleft()
        return recent
