"""docs/design.md#classification: which prefix a request reads, which breakpoints it writes, and the token split.

One pure function for the proxy (index = Postgres/Redis) and replay (index = memory), so a
projection and a bill cannot drift apart. Callers look up :func:`candidates` in one round
trip and pass what they found to :func:`classify`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from promptcache.proxy.domain.entries import IndexEntry
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.tiers import TIERS, duration


class ChainBlock(msgspec.Struct, frozen=True, gc=False):
    """One block of a prefix chain: its cumulative hash and token count. A struct, not a dataclass: the proxy builds
    one per block of every request, about seven times faster; holding no cycles, it is not tracked by the garbage
    collector."""

    hash: bytes
    tokens: int
    role: str
    tier: str | None


@dataclass(frozen=True, slots=True)
class Read:
    block: int
    hash: bytes
    tokens: int
    tier: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Write:
    block: int
    hash: bytes
    tokens: int
    tier: str
    expires_at: datetime


@dataclass(frozen=True)
class Classification:
    read: Read | None
    writes: tuple[Write, ...]
    creation: Mapping[str, int] = field(default_factory=dict)

    @property
    def read_tokens(self) -> int:
        return self.read.tokens if self.read else 0

    @property
    def creation_tokens(self) -> int:
        return sum(self.creation.values())


NO_CACHE = Classification(None, (), {tier: 0 for tier in TIERS})


def _breakpoints(chain: Sequence[ChainBlock], policy: CachePolicy) -> list[tuple[int, str]]:
    """Breakpoints long enough to be cached, as (position, tier); shorter ones are neither written nor looked up."""
    return [(i, b.tier) for i, b in enumerate(chain) if b.tier is not None and b.tokens >= policy.min_prefix_tokens]


def candidates(chain: Sequence[ChainBlock], policy: CachePolicy) -> list[bytes]:
    """Hashes to look up: each breakpoint and the ``lookbackBlocks - 1`` blocks before it."""
    positions: set[int] = set()
    for b, _ in _breakpoints(chain, policy):
        positions.update(range(max(0, b - policy.lookback_blocks + 1), b + 1))
    return [chain[i].hash for i in sorted(positions)]


def classify(
    chain: Sequence[ChainBlock],
    found: Mapping[bytes, IndexEntry] | Iterable[IndexEntry],
    policy: CachePolicy,
    now: datetime,
) -> Classification:
    """The read (deepest live hit among the candidates), the writes, and creation tokens per tier."""
    return _classify(chain, _breakpoints(chain, policy), found, policy, now)


def classify_marked(
    chain: Sequence[ChainBlock],
    marked: Sequence[tuple[int, str]],
    found: Mapping[bytes, IndexEntry] | Iterable[IndexEntry],
    policy: CachePolicy,
    now: datetime,
) -> Classification:
    """:func:`classify` with the markers given apart from the chain, as (position, tier) in order.

    Replay finds them in its own pass over a recorded chain and maps them onto a proposed policy
    (a tier override, an automatic breakpoint), so it classifies with projected markers without
    copying the chain; :func:`classify` is this function with the chain's own markers.
    """
    minimum = policy.min_prefix_tokens
    return _classify(chain, [(i, tier) for i, tier in marked if chain[i].tokens >= minimum], found, policy, now)


def reads_only(result: Classification) -> Classification:
    """The read alone, for a lookup that could not see past Redis (Postgres down): what Redis holds is backed by
    the tenant's own committed writes and is discounted, but whether the deeper breakpoints are cached is
    unknown, so they are billed uncached at list price, never a write premium that could charge twice for one
    entry, and nothing is written."""
    return Classification(result.read, (), dict.fromkeys(TIERS, 0))


def _classify(
    chain: Sequence[ChainBlock],
    breakpoints: list[tuple[int, str]],
    found: Mapping[bytes, IndexEntry] | Iterable[IndexEntry],
    policy: CachePolicy,
    now: datetime,
) -> Classification:
    entries = found if isinstance(found, (dict, Mapping)) else {e.prefix_hash: e for e in found}
    if not breakpoints:
        return Classification(None, (), dict.fromkeys(TIERS, 0))
    # Candidate positions (as in candidates()), marked in a mask: the deepest live entry is usually
    # found at one, and the set of candidate hashes is built only if the search goes past one that is not.
    size = len(chain)
    candidate = bytearray(size)
    covered = -1
    for b, _ in breakpoints:
        start = max(b - policy.lookback_blocks + 1, covered + 1, 0)
        candidate[start:b + 1] = b"\x01" * (b + 1 - start)
        covered = b

    read: Read | None = None
    wanted: set[bytes] | None = None
    for i in range(size - 1, -1, -1):
        h = chain[i].hash
        if not candidate[i]:
            # Not a candidate position, but its hash can still be a candidate's (a repeated hash).
            if wanted is None:
                wanted = {chain[j].hash for j in range(size) if candidate[j]}
            if h not in wanted:
                continue
        entry = entries.get(h)
        if entry is not None and entry.live(now):
            read = Read(i, h, entry.cum_tokens, entry.tier, now + duration(entry.tier))
            break

    creation = dict.fromkeys(TIERS, 0)
    writes: list[Write] = []
    boundary = read.tokens if read else 0
    for b, tier in breakpoints:
        if read is not None and b <= read.block:
            continue
        block = chain[b]
        creation[tier] += block.tokens - boundary
        writes.append(Write(b, block.hash, block.tokens, tier, now + duration(tier)))
        boundary = block.tokens
    return Classification(read, tuple(writes), creation)
