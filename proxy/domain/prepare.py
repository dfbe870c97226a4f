"""One request, ready to classify: blocks, breakpoints, token counts and the forwarded body.

Two steps, so the proxy forwards as early as it may: :func:`admit` does what must hold before
anything goes upstream (the body's structure and its markers, docs/design.md#breakpoints-markers-and-limits) and
builds the body to
forward; :meth:`Admission.prepare` builds, hashes and counts the blocks, which the proxy runs
while the upstream works. The hash CLI, the proxy and the tests all go through both, so what
``promptcache hash`` prints is exactly what the proxy bills on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from promptcache.proxy.domain.blocks import (
    MARKER,
    NO_MARKER,
    Api,
    Block,
    hashing,
    parse_blocks,
    scan_markers,
    strip_markers,
)
from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.markers import REQUEST_FIELDS, cache_key, place_breakpoints, request_tier, with_automatic
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.steps import Steps, run
from promptcache.proxy.domain.tokens import BlockCounter


@dataclass(frozen=True)
class Prepared:
    blocks: list[Block]
    """Every block in the order the model sees them (docs/design.md#block-order), including ignored ones."""
    hashed: list[Block]
    """The blocks that make up the prefix chain."""
    tiers: list[str | None]
    """Breakpoint tier per hashed block, the policy's automatic one included: what is classified."""
    sent: list[str | None]
    """Breakpoint tier per hashed block as the client sent it: what the request log records."""
    tokens: list[int] | None
    """Cumulative token count per hashed block; None without a tokenizer."""
    forward: dict[str, Any]

    @property
    def chain(self) -> list[ChainBlock] | None:
        if self.tokens is None:
            return None
        return [ChainBlock(b.hash, t, b.role, tier)
                for b, t, tier in zip(self.hashed, self.tokens, self.tiers, strict=True)]


@dataclass(frozen=True)
class Admission:
    """A request whose structure and markers are valid, and the body to forward."""

    body: dict[str, Any]
    api: Api
    policy: CachePolicy
    sent: list[str | None]
    """Breakpoint tier per block position, as the client sent it."""
    forward: dict[str, Any]
    cache_key: str | None = None
    """OpenAI's ``prompt_cache_key``: forwarded, and recorded in the request log."""

    def prepare(self, counter: BlockCounter | None = None) -> Prepared:
        """Build, hash and count the blocks, and add the policy's automatic breakpoint."""
        return run(self.preparing(counter))

    def preparing(self, counter: BlockCounter | None = None) -> Steps[Prepared]:
        """:meth:`prepare` in steps, for the proxy to run while the upstream call is in flight."""
        blocks = parse_blocks(self.body, self.api, self.policy.ignore_prefixes)
        yield from hashing(blocks)
        by_position = with_automatic(blocks, self.sent, self.policy)
        hashed = [b for b in blocks if not b.ignored]
        tiers = [by_position[b.position] for b in hashed]
        sent = [self.sent[b.position] for b in hashed]
        tokens = (yield from counter.counting(hashed)) if counter is not None else None
        return Prepared(blocks, hashed, tiers, sent, tokens, self.forward)


def admit(body: Any, api: Api, policy: CachePolicy, forward_markers: bool = False) -> Admission:
    """Validate the body's structure and markers (400 before anything is forwarded) and build the
    body to forward, without building every block."""
    marked, count, last = scan_markers(body, api, policy.ignore_prefixes)
    openai = api != "anthropic"
    default = request_tier(body, policy) if openai else None
    sent = place_breakpoints(marked, count, last, body.get(MARKER, NO_MARKER), policy, default)
    request_keys = (MARKER, *REQUEST_FIELDS) if openai else (MARKER,)
    forward = body if forward_markers else strip_markers(body, marked, request_keys)
    return Admission(body, api, policy, sent, forward, cache_key(body) if openai else None)


def prepare(
    body: Any, api: Api, policy: CachePolicy, counter: BlockCounter | None = None, forward_markers: bool = False
) -> Prepared:
    """:func:`admit`, then :meth:`Admission.prepare`: the whole request at once."""
    return admit(body, api, policy, forward_markers).prepare(counter)


def input_tokens(body: Any, api: Api, counter: BlockCounter) -> Steps[int]:
    """The tokens of every block, ignored ones included (the model reads them): what token counting answers. A chat
    template adds a few tokens per message that counting the blocks cannot see (docs/design.md#token-counting)."""
    blocks = parse_blocks(body, api)
    yield from hashing(blocks)
    tokens = yield from counter.counting(blocks)
    return tokens[-1] if tokens else 0
