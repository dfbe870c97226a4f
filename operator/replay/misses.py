"""docs/design.md#miss-reasons: why a replayed request read nothing, under the recorded outcome and the proposal.

A request that reads nothing is counted under the first reason that holds, in :data:`REASONS` order:
the proxy would reject it (more markers than ``maxBreakpoints``, a longer TTL after a shorter one); it
marks nothing; every marker is below ``minPrefixTokens``; an entry for one of its prefixes expired; an
entry for one of its prefixes is live but out of the lookup's reach (``lookbackBlocks``); a chain
beginning with its first block wrote an entry, so the prefix changed before the breakpoint; or
nothing like it was written. What a scope cached explains a miss up to :data:`HORIZON` past its expiry,
as a bare expiry per prefix hash once the entry itself is swept; only facts that recent decide, so the
counts do not depend on when memory was swept, nor on how the scopes were split into shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.tiers import TIERS, duration

REASONS = ("rejected", "unmarked", "below_minimum", "expired", "beyond_lookback", "prefix_changed",
           "never_written")
REJECTED, UNMARKED, BELOW_MINIMUM, EXPIRED, BEYOND_LOOKBACK, PREFIX_CHANGED, NEVER_WRITTEN = range(len(REASONS))
DURATIONS = {tier: duration(tier) for tier in TIERS}
HORIZON = max(DURATIONS.values())
"""How long past its expiry an entry (or a chain's start) still explains a miss: the longest tier."""

Memory = Callable[[bytes], Iterable[datetime]]
"""What a scope cached of a prefix hash: the expiry of each entry it remembers of it."""
Starts = dict[str, dict[bytes, datetime]]
"""Per tier, the last time a chain beginning with a block (by its hash) wrote an entry of that tier."""


def new_starts() -> Starts:
    return {tier: {} for tier in TIERS}


def from_history(chain: Sequence[ChainBlock], memory: Memory, starts: Starts, now: datetime) -> int:
    """The reason a chain with cacheable markers read nothing, from what its scope cached: ``memory`` of each
    prefix hash, and the ``starts`` of the chains that wrote."""
    live = False
    for block in chain:
        for expires in memory(block.hash):
            if expires > now:
                live = True
            elif now - expires <= HORIZON:
                return EXPIRED
    if live:
        return BEYOND_LOOKBACK
    first = chain[0].hash
    for tier, written in starts.items():
        at = written.get(first)
        if at is not None and now - (at + DURATIONS[tier]) <= HORIZON:
            return PREFIX_CHANGED
    return NEVER_WRITTEN


def forget(now: datetime, *tables: Starts) -> None:
    """Drop, per tier, the times that no longer explain anything at ``now`` (the log only moves forward)."""
    for table in tables:
        for tier, written in table.items():
            gone = now - HORIZON - DURATIONS[tier]
            for key in [key for key, at in written.items() if at < gone]:
                del written[key]


class Recorded:
    """One scope's cache as the recorded splits show it: the proxy's policy is not in the log, so what it wrote
    is inferred (the markers past the read, up to the read plus the creation tokens) and its reads refreshed.
    Kept as the last write or read of each prefix per tier: the log is in order, so a write is an assignment."""

    def __init__(self) -> None:
        self.touched: Starts = new_starts()
        self.starts: Starts = new_starts()

    def memory(self, prefix_hash: bytes) -> list[datetime]:
        return [at + DURATIONS[tier] for tier, held in self.touched.items()
                if (at := held.get(prefix_hash)) is not None]

    def forget(self, now: datetime) -> None:
        forget(now, self.touched, self.starts)

    def reason(self, chain: Sequence[ChainBlock], marked: Sequence[int], read: int, created: int,
               now: datetime) -> int | None:
        """Why the recorded request read nothing (None: it read), then its writes and read recorded."""
        reason: int | None = None
        if read == 0:
            if not marked:
                return UNMARKED
            if created == 0:
                return BELOW_MINIMUM  # and it wrote nothing
            reason = from_history(chain, self.memory, self.starts, now)
        touched, top = self.touched, read + created
        for i in reversed(marked):  # deepest first: positions, so tokens, only fall from here
            block = chain[i]
            tokens = block.tokens
            if tokens > top:
                continue
            if tokens < read or not tokens:  # neither written nor read, nor any before it
                break
            touched[block.tier][block.hash] = now  # type: ignore[index]  # marked: it has a tier
            if tokens > read:
                self.starts[block.tier][chain[0].hash] = now  # type: ignore[index]
        return reason
