"""docs/design.md#miss-reasons: why a replayed request read nothing, under the recorded outcome and the proposal.

A request that reads nothing is counted under the first reason that holds, in :data:`REASONS` order:
the proxy would reject it (more markers than ``maxBreakpoints``, a longer TTL after a shorter one); it
marks nothing; every marker is below ``minPrefixTokens``; an entry for one of its prefixes expired; an
entry for one of its prefixes is live but out of the lookup's reach (``lookbackBlocks``); a chain
beginning with its first block wrote an entry, so the prefix changed before the breakpoint; or
nothing like it was written. An entry is remembered for one more TTL past its expiry (a 5m entry
5 minutes, a 1h one an hour), a chain's start as long as its latest entry; only facts that recent
decide, so memory stays about twice the live cache, and the counts do not depend on when memory was
swept, nor on how the scopes were split into shards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from datetime import datetime

from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.tiers import TIERS, duration

REASONS = ("rejected", "unmarked", "below_minimum", "expired", "beyond_lookback", "prefix_changed",
           "never_written")
REJECTED, UNMARKED, BELOW_MINIMUM, EXPIRED, BEYOND_LOOKBACK, PREFIX_CHANGED, NEVER_WRITTEN = range(len(REASONS))
DURATIONS = {tier: duration(tier) for tier in TIERS}

Memory = tuple[datetime, datetime]
"""An entry as a miss sees it: when it expires, and until when it explains a miss (one more TTL)."""


def remembered(expires: datetime, tier: str) -> Memory:
    return expires, expires + DURATIONS[tier]


def from_history(chain: Sequence[ChainBlock], memory: Callable[[bytes], Memory | None],
                 starts: Mapping[bytes, datetime], now: datetime) -> int:
    """The reason a chain with cacheable markers read nothing, from what its scope cached: ``memory`` of a
    prefix hash (None: no entry, or none recent), ``starts`` until when a chain's first block explains a miss."""
    live = False
    for block in chain:
        known = memory(block.hash)
        if known is None:
            continue
        expires, until = known
        if expires > now:
            live = True
        elif now < until:
            return EXPIRED
    if live:
        return BEYOND_LOOKBACK
    started = starts.get(chain[0].hash)
    return PREFIX_CHANGED if started is not None and now < started else NEVER_WRITTEN


def forget(now: datetime, starts: MutableMapping[bytes, datetime]) -> None:
    """Drop the starts that no longer explain anything at ``now`` (the log only moves forward)."""
    for key in [key for key, until in starts.items() if until <= now]:
        del starts[key]


class Recorded:
    """One scope's cache as the recorded splits show it: the proxy's policy is not in the log, so what it wrote
    is inferred (the markers past the read, up to the read plus the creation tokens) and its reads refreshed."""

    def __init__(self) -> None:
        self.memory: dict[bytes, Memory] = {}
        self.starts: dict[bytes, datetime] = {}

    def forget(self, now: datetime) -> None:
        for key in [key for key, (_, until) in self.memory.items() if until <= now]:
            del self.memory[key]
        forget(now, self.starts)

    def reason(self, chain: Sequence[ChainBlock], marked: Sequence[int], read: int, created: int,
               now: datetime) -> int | None:
        """Why the recorded request read nothing (None: it read), then its writes and read recorded."""
        reason: int | None = None
        if read == 0:
            if not marked:
                reason = UNMARKED
            elif created == 0:
                reason = BELOW_MINIMUM
            else:
                reason = from_history(chain, self.memory.get, self.starts, now)
        memory, top, latest = self.memory, read + created, None
        for i in marked:
            block = chain[i]
            tokens = block.tokens
            if not (read < tokens <= top or (read and tokens == read)):
                continue
            known = remembered(now + DURATIONS[block.tier], block.tier)  # type: ignore[index,arg-type]
            current = memory.get(block.hash)
            if current is None or known[0] > current[0]:
                memory[block.hash] = known
            if tokens > read and (latest is None or known[1] > latest):
                latest = known[1]
        if latest is not None:
            started(self.starts, chain[0].hash, latest)
        return reason


def started(starts: MutableMapping[bytes, datetime], first: bytes, until: datetime) -> None:
    """A chain beginning with ``first`` wrote an entry that explains misses until ``until``."""
    current = starts.get(first)
    if current is None or until > current:
        starts[first] = until
