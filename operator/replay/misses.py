"""docs/design.md#miss-reasons: why a replayed request read nothing, under the recorded outcome and the proposal.

A request that reads nothing is counted under the first reason that holds, in :data:`REASONS` order:
the proxy would reject it (more markers than ``maxBreakpoints``, a longer TTL after a shorter one); it
marks nothing; every marker is below ``minPrefixTokens``; an entry for one of its prefixes expired; an
entry for one of its prefixes is live but out of the lookup's reach (``lookbackBlocks``); a chain
beginning with its first block wrote an entry, so the prefix changed before the breakpoint; or
nothing like it was ever written. What a scope cached is remembered for :data:`HORIZON` past its expiry
(the longest tier), and only facts that recent decide, so the counts do not depend on when memory was
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
HORIZON = max(DURATIONS.values())
"""How long past its expiry an entry (and past its last write a chain's start) still explains a miss."""


def from_history(chain: Sequence[ChainBlock], expiry: Callable[[bytes], datetime | None],
                 starts: Mapping[bytes, datetime], now: datetime) -> int:
    """The reason a chain with cacheable markers read nothing, from what its scope cached: ``expiry`` of a
    prefix hash (None: no entry), ``starts`` the last write of a chain by its first block's hash."""
    live = False
    for block in chain:
        expires = expiry(block.hash)
        if expires is None:
            continue
        if expires > now:
            live = True
        elif now - expires <= HORIZON:
            return EXPIRED
    if live:
        return BEYOND_LOOKBACK
    started = starts.get(chain[0].hash)
    return PREFIX_CHANGED if started is not None and now - started <= HORIZON else NEVER_WRITTEN


def forget(now: datetime, *tables: MutableMapping[bytes, datetime]) -> None:
    """Drop what no longer explains anything at ``now`` (the log only moves forward)."""
    for table in tables:
        for key in [key for key, at in table.items() if now - at > HORIZON]:
            del table[key]


class Recorded:
    """One scope's cache as the recorded splits show it: the proxy's policy is not in the log, so what it wrote
    is inferred (the markers past the read, up to the read plus the creation tokens) and its reads refreshed."""

    def __init__(self) -> None:
        self.expiry: dict[bytes, datetime] = {}
        self.starts: dict[bytes, datetime] = {}

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
                reason = from_history(chain, self.expiry.get, self.starts, now)
        expiry, top, wrote = self.expiry, read + created, False
        for i in marked:
            block = chain[i]
            tokens = block.tokens
            if read < tokens <= top:
                wrote = True
            elif tokens != read or not read:
                continue
            expires = now + DURATIONS[block.tier]  # type: ignore[index]  # marked: it has a tier
            current = expiry.get(block.hash)
            if current is None or expires > current:
                expiry[block.hash] = expires
        if wrote:
            self.starts[chain[0].hash] = now
        return reason
