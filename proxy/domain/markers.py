"""Validate ``cache_control`` markers and place breakpoints (docs/design.md#breakpoints-markers-and-limits).

Every violation raises :class:`InvalidCacheControl` before anything is forwarded. The
policy's automatic placement is the operator's choice, not the client's, so it never
rejects a request: where it would break a rule it is simply not placed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from promptcache.proxy.domain.blocks import NO_MARKER, Block
from promptcache.proxy.domain.errors import InvalidCacheControl
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.tiers import TIER_DURATIONS, TIERS


def place_breakpoints(
    marked: Sequence[Block], count: int, last: Block | None, top_level: Any, policy: CachePolicy
) -> list[str | None]:
    """The breakpoints the client sent (explicit and top-level markers, defaults applied), validated:
    the tier of every block by position, or None. The request log records these, so replay can
    place a proposed policy's automatic breakpoint on top of them as the proxy would.

    Needs only the blocks that carry a marker, the block count and the last block of the chain
    (:func:`~promptcache.proxy.domain.blocks.scan_markers`), so it runs before forwarding at little cost.
    """
    tiers: list[str | None] = [None] * count
    explicit: list[Block] = []
    for block in marked:
        tier = _tier(block.marker, block.position, block.path, policy)
        if tier is not None and not block.ignored:
            tiers[block.position] = tier
            explicit.append(block)

    if len(explicit) > policy.max_breakpoints:
        over = explicit[policy.max_breakpoints]
        raise InvalidCacheControl(
            over.position, over.path, "too_many_breakpoints",
            f"at most {policy.max_breakpoints} breakpoints are allowed, this is breakpoint "
            f"{policy.max_breakpoints + 1}",
        )

    auto_tier = _tier(top_level, None, "top-level cache_control", policy)
    if auto_tier is not None:
        if last is None:
            raise InvalidCacheControl(
                None, "top-level cache_control", "automatic_conflict", "the request has no block to mark"
            )
        current = tiers[last.position]
        if current is not None and current != auto_tier:
            raise InvalidCacheControl(
                last.position, last.path, "automatic_conflict",
                f"top-level cache_control asks for {auto_tier} but the last block is already marked {current}",
            )
        if current is None:
            if len(explicit) >= policy.max_breakpoints:
                raise InvalidCacheControl(
                    last.position, last.path, "automatic_conflict",
                    f"top-level cache_control needs a slot but all {policy.max_breakpoints} "
                    "are taken by explicit markers",
                )
            tiers[last.position] = auto_tier
            explicit.append(last)

    _check_order(explicit, tiers)
    return tiers


def with_automatic(blocks: Sequence[Block], sent: Sequence[str | None], policy: CachePolicy) -> list[str | None]:
    """The breakpoints the proxy classifies with: the client's, plus the policy's automatic one."""
    tiers = list(sent)
    target = automatic_target(blocks, policy.automatic_mode, [b.ignored for b in blocks])
    place_automatic(tiers, target, policy)
    return tiers


def _tier(marker: Any, position: int | None, path: str, policy: CachePolicy) -> str | None:
    if marker is NO_MARKER or marker is None:
        return None
    if not isinstance(marker, dict):
        raise InvalidCacheControl(position, path, "type", f"cache_control must be an object, got {marker!r}")
    if marker.get("type") != "ephemeral":
        raise InvalidCacheControl(
            position, path, "type", f"unknown cache_control type {marker.get('type')!r}; only 'ephemeral'"
        )
    unknown_keys = set(marker) - {"type", "ttl"}
    if unknown_keys:
        raise InvalidCacheControl(position, path, "type", f"unknown cache_control keys {sorted(unknown_keys)}")
    ttl = marker.get("ttl", policy.default_ttl)
    if ttl not in TIERS:
        raise InvalidCacheControl(position, path, "tier", f"unknown ttl {ttl!r}; known: {list(TIERS)}")
    if ttl not in policy.enabled_ttls:
        raise InvalidCacheControl(
            position, path, "disabled_tier", f"ttl {ttl!r} is not enabled; enabled: {list(policy.enabled_ttls)}"
        )
    return str(ttl)


def outlives(later: str, earlier: str) -> bool:
    """Whether a breakpoint of tier ``later`` after one of tier ``earlier`` breaks the TTL order rule
    (docs/design.md#the-ttl-order-rule): its entry would outlive the shorter-lived prefix it extends.
    The proxy rejects such markers, automatic placement skips them and replay counts them."""
    return TIER_DURATIONS[later] > TIER_DURATIONS[earlier]


def out_of_order(tiers: Sequence[str | None]) -> int | None:
    """The index of the first breakpoint that outlives the breakpoint before it, or None; ``tiers`` are in block
    order, None for a block without one."""
    previous = None
    for i, tier in enumerate(tiers):
        if tier is not None:
            if previous is not None and outlives(tier, previous):
                return i
            previous = tier
    return None


def _check_order(points: Sequence[Block], tiers: list[str | None]) -> None:
    """``points`` are the breakpoint blocks, each with a tier; the first out of order is rejected."""
    points = sorted(points, key=lambda b: b.position)
    i = out_of_order([tiers[b.position] for b in points])
    if i is not None:
        block, previous = points[i], points[i - 1]
        raise InvalidCacheControl(
            block.position, block.path, "ttl_order",
            f"a {tiers[block.position]} breakpoint may not follow the shorter {tiers[previous.position]} "
            f"breakpoint at block {previous.position}",
        )


class _Role(Protocol):
    @property
    def role(self) -> str: ...


def automatic_target(blocks: Sequence[_Role], mode: str, ignored: Sequence[bool] = ()) -> int | None:
    """Where the policy's automatic breakpoint goes: the last block, or the last block of the last
    user message (which is the last user-role block: a message's blocks are contiguous).

    ``blocks`` are a request's or a recorded chain's; only the last few are looked at.
    """
    if mode == "off":
        return None
    for i in range(len(blocks) - 1, -1, -1):
        if not (ignored and ignored[i]) and (mode == "lastBlock" or blocks[i].role == "user"):
            return i
    return None


def place_automatic(tiers: list[str | None], target: int | None, policy: CachePolicy) -> None:
    """Add the policy's automatic breakpoint at ``target`` unless that would break a rule.

    Shared by the proxy (on blocks) and replay (on recorded chains), so both place it alike.
    """
    tier = policy.automatic_ttl
    if tier is None or target is None or tiers[target] is not None:
        return
    if sum(t is not None for t in tiers) >= policy.max_breakpoints:
        return
    before = [t for t in tiers[:target] if t is not None]
    after = [t for t in tiers[target + 1:] if t is not None]
    if any(outlives(tier, t) for t in before) or any(outlives(t, tier) for t in after):
        return
    tiers[target] = tier
