"""Cache-miss diagnostics (docs/design.md#cache-miss-diagnostics): why a request did not read the prefix that the
previous request it names wrote, worked out from the two requests' chains alone, never from their text.

Pure, like classification: the proxy fetches the previous request's logged chain (its caller's own) and passes it
in with this request's chain and what it read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.markers import automatic_target, place_automatic
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.tiers import duration

REASONS = ("tools_changed", "system_changed", "messages_changed", "expired", "below_min_prefix",
           "previous_request_not_found", "model_changed", "unavailable")


@dataclass(frozen=True)
class Previous:
    """The request a client compares with, as the request log holds it."""

    model: str
    ts: datetime
    status: int
    hashes: Sequence[bytes]
    """The first bytes of each block's prefix hash."""
    tokens: Sequence[int]
    roles: Sequence[str]
    tiers: Sequence[str | None]
    """The breakpoints as the client sent them; the policy's automatic one is placed again."""


@dataclass(frozen=True)
class _Role:
    role: str


@dataclass(frozen=True)
class Diagnosis:
    reason: str | None
    """One of :data:`REASONS`; None: this request read all the previous one wrote (or it wrote nothing)."""
    missed_tokens: int = 0
    """Tokens of the previous request's longest written prefix that this request did not read."""
    reusable_tokens: int = 0
    """Tokens of the prefix the two chains share."""
    block: int | None = None
    """For ``messages_changed``: the first block (chain index) that differs."""


def diagnose(chain: Sequence[ChainBlock], read_tokens: int | None, model: str, previous: Previous | None,
             policy: CachePolicy, now: datetime) -> Diagnosis:
    """``read_tokens`` None: this request was billed at list price (the index failed), so nothing can be said."""
    if previous is None:
        return Diagnosis("previous_request_not_found")
    tiers = list(previous.tiers)
    place_automatic(tiers, automatic_target([_Role(r) for r in previous.roles], policy.automatic_mode), policy)
    written = [i for i, tier in enumerate(tiers) if tier is not None]
    shared = _shared(chain, previous.hashes)
    reusable = chain[shared - 1].tokens if shared else 0
    if not written:
        return Diagnosis(None, 0, reusable)
    last = written[-1]
    expected = previous.tokens[last]
    if previous.model != model:
        return Diagnosis("model_changed", expected, 0)
    if read_tokens is None:
        return Diagnosis("unavailable", expected, reusable)
    if read_tokens >= expected:
        return Diagnosis(None, 0, reusable)
    missed = expected - read_tokens
    if shared <= last:
        roles = {previous.roles[shared]} | ({chain[shared].role} if shared < len(chain) else set())
        if "tool_definition" in roles:
            return Diagnosis("tools_changed", missed, reusable)
        if "system" in roles:
            return Diagnosis("system_changed", missed, reusable)
        return Diagnosis("messages_changed", missed, reusable, shared)
    if expected < policy.min_prefix_tokens:
        return Diagnosis("below_min_prefix", missed, reusable)
    tier = tiers[last]
    if 200 <= previous.status < 300 and tier is not None and now >= previous.ts + duration(tier):
        return Diagnosis("expired", missed, reusable)
    return Diagnosis("unavailable", missed, reusable)


def _shared(chain: Sequence[ChainBlock], hashes: Sequence[bytes]) -> int:
    """How many leading blocks the chains share (prefix hashes are cumulative: the first difference ends it)."""
    for i, logged in enumerate(hashes[:len(chain)]):
        if chain[i].hash[:len(logged)] != logged:
            return i
    return min(len(chain), len(hashes))
