"""Validate ``cache_control`` markers and place breakpoints (docs/design.md#breakpoints-markers-and-limits).

Every violation raises :class:`InvalidCacheControl` before anything is forwarded. The
policy's automatic placement is the operator's choice, not the client's, so it never
rejects a request: where it would break a rule it is simply not placed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from promptcache.proxy.domain.blocks import BREAKPOINT, NO_MARKER, Block
from promptcache.proxy.domain.errors import BadRequest, InvalidCacheControl
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.tiers import TIER_DURATIONS, TIERS

OPENAI_TTLS = {"30m": "1h", "12h": "24h"}
"""OpenAI's ttl values name a minimum lifetime: each maps to the shortest tier that lives at least that long
(docs/design.md#openais-caching-parameters). Our own tier names are accepted too."""
RETENTION = "prompt_cache_retention"
OPTIONS = "prompt_cache_options"
CACHE_KEY = "prompt_cache_key"
REQUEST_FIELDS = (RETENTION, OPTIONS)
"""OpenAI's request-level caching fields the proxy reads, and so does not forward (``prompt_cache_key`` is
forwarded: it is the engines' routing hint)."""
_OPTION_KEYS = frozenset({"mode", "ttl", "comparison_response_id", "prewarm"})
MAX_CACHE_KEY = 1024


def request_tier(body: dict[str, Any], policy: CachePolicy) -> str | None:
    """The tier OpenAI's request-level fields choose for breakpoints that name none (``prompt_cache_options.ttl``,
    or the older ``prompt_cache_retention``), or None: the policy's default."""
    tier = None
    retention = body.get(RETENTION)
    if retention is not None:
        if retention == "in_memory":
            tier = policy.default_ttl
        elif retention == "24h":
            tier = _enabled("24h", None, RETENTION, policy)
        else:
            raise InvalidCacheControl(None, RETENTION, "tier",
                                      f"unknown value {_short(retention)}; known: in_memory, 24h")
    options = body.get(OPTIONS)
    if options is None:
        return tier
    if not isinstance(options, dict):
        raise InvalidCacheControl(None, OPTIONS, "type", f"must be an object, got {_short(options)}")
    unknown = set(options) - _OPTION_KEYS
    if unknown:
        raise InvalidCacheControl(None, OPTIONS, "type", f"unknown keys {sorted(map(str, unknown))}")
    if options.get("mode", "implicit") not in ("implicit", "explicit"):
        raise InvalidCacheControl(None, f"{OPTIONS}.mode", "type",
                                  f"unknown mode {_short(options['mode'])}; known: implicit, explicit")
    if options.get("prewarm") not in (None, False):
        raise InvalidCacheControl(None, f"{OPTIONS}.prewarm", "type", "prewarming is not supported by this proxy")
    comparison = options.get("comparison_response_id")
    if comparison is not None and not isinstance(comparison, str):
        raise InvalidCacheControl(None, f"{OPTIONS}.comparison_response_id", "type", "must be a string")
    if options.get("ttl") is None:
        return tier
    ttl = _openai_ttl(options["ttl"], None, f"{OPTIONS}.ttl", policy)
    if tier is not None and retention is not None and ttl != tier:
        raise InvalidCacheControl(None, RETENTION, "tier",
                                  f"asks for {tier} but {OPTIONS}.ttl asks for {ttl}; send one of them")
    return ttl


CACHE_KEY_RULE = f"must be a string of at most {MAX_CACHE_KEY} characters without NUL"


def valid_cache_key(value: Any) -> bool:
    """What the request log can hold as a ``prompt_cache_key`` (Postgres text refuses NUL)."""
    return isinstance(value, str) and "\x00" not in value and len(value) <= MAX_CACHE_KEY


def cache_key(body: dict[str, Any]) -> str | None:
    """``prompt_cache_key`` as the request log records it."""
    key = body.get(CACHE_KEY)
    if key is None:
        return None
    if not valid_cache_key(key):
        raise BadRequest(f"{CACHE_KEY} {CACHE_KEY_RULE}")
    return str(key)


def place_breakpoints(
    marked: Sequence[Block], count: int, last: Block | None, top_level: Any, policy: CachePolicy,
    default: str | None = None,
) -> list[str | None]:
    """The breakpoints the client sent (explicit and top-level markers, ``default`` or the policy's default tier
    where they name none), validated: the tier of every block by position, or None. The request log records these,
    so replay can place a proposed policy's automatic breakpoint on top of them as the proxy would.

    Needs only the blocks that carry a marker, the block count and the last block of the chain
    (:func:`~promptcache.proxy.domain.blocks.scan_markers`), so it runs before forwarding at little cost.
    """
    tiers: list[str | None] = [None] * count
    explicit: list[Block] = []
    for block in marked:
        if block.marker_key == BREAKPOINT:
            tier = _breakpoint(block.marker, block.position, f"{block.path}.{BREAKPOINT}", policy, default)
        else:
            tier = _tier(block.marker, block.position, block.path, policy, default)
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

    auto_tier = _tier(top_level, None, "top-level cache_control", policy, default)
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


def _tier(marker: Any, position: int | None, path: str, policy: CachePolicy, default: str | None) -> str | None:
    if marker is NO_MARKER or marker is None:
        return None
    if not isinstance(marker, dict):
        raise InvalidCacheControl(position, path, "type", f"cache_control must be an object, got {_short(marker)}")
    if marker.get("type") != "ephemeral":
        raise InvalidCacheControl(
            position, path, "type", f"unknown cache_control type {_short(marker.get('type'))}; only 'ephemeral'"
        )
    unknown_keys = set(marker) - {"type", "ttl"}
    if unknown_keys:
        raise InvalidCacheControl(position, path, "type",
                                  f"unknown cache_control keys {sorted(map(str, unknown_keys))}")
    if "ttl" not in marker:
        return default or policy.default_ttl
    ttl = marker["ttl"]
    if ttl not in TIERS:
        raise InvalidCacheControl(position, path, "tier", f"unknown ttl {_short(ttl)}; known: {list(TIERS)}")
    return _enabled(str(ttl), position, path, policy)


def _breakpoint(marker: Any, position: int, path: str, policy: CachePolicy, default: str | None) -> str | None:
    """OpenAI's ``prompt_cache_breakpoint: {"mode": "explicit", "ttl"?}`` on a content part."""
    if marker is None:
        return None
    if not isinstance(marker, dict):
        raise InvalidCacheControl(position, path, "type", f"must be an object, got {_short(marker)}")
    unknown_keys = set(marker) - {"mode", "ttl"}
    if unknown_keys:
        raise InvalidCacheControl(position, path, "type", f"unknown keys {sorted(map(str, unknown_keys))}")
    if marker.get("mode") != "explicit":
        raise InvalidCacheControl(position, f"{path}.mode", "type",
                                  f"unknown mode {_short(marker.get('mode'))}; only 'explicit'")
    if marker.get("ttl") is None:
        return default or policy.default_ttl
    return _openai_ttl(marker["ttl"], position, f"{path}.ttl", policy)


def _openai_ttl(ttl: Any, position: int | None, path: str, policy: CachePolicy) -> str:
    tier = OPENAI_TTLS.get(ttl, ttl) if isinstance(ttl, str) else None
    if tier not in TIERS:
        raise InvalidCacheControl(position, path, "tier",
                                  f"unknown ttl {_short(ttl)}; known: {[*OPENAI_TTLS, *TIERS]}")
    return _enabled(str(tier), position, path, policy)


def _enabled(tier: str, position: int | None, path: str, policy: CachePolicy) -> str:
    if tier not in policy.enabled_ttls:
        raise InvalidCacheControl(
            position, path, "disabled_tier", f"tier {tier!r} is not enabled; enabled: {list(policy.enabled_ttls)}"
        )
    return tier


def _short(value: Any) -> str:
    """A client's value in an error message, cut short: a hostile value may be huge or deeply nested."""
    text = repr(value) if isinstance(value, str | int | float | bool | None) else f"a JSON {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


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
