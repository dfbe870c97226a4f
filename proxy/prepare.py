"""One request, ready to classify: blocks, breakpoints, token counts and the forwarded body.

The hash CLI, the proxy and the tests all go through :func:`prepare`, so what
``promptcache hash`` prints is exactly what the proxy bills on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from promptcache.proxy.blocks import MARKER, NO_MARKER, Api, Block, hash_blocks, parse_blocks, strip_markers
from promptcache.proxy.classify import ChainBlock
from promptcache.proxy.markers import place_breakpoints, with_automatic
from promptcache.proxy.policy import CachePolicy
from promptcache.proxy.tokens import BlockCounter


@dataclass(frozen=True)
class Prepared:
    blocks: list[Block]
    """Every block in SPEC order, including ignored ones."""
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
        return self._chain(self.tokens)

    def count(self, counter: BlockCounter) -> list[ChainBlock]:
        """Hash (when it was deferred) and count: the chain the classifier reads."""
        if self.hashed and not self.hashed[0].hash:
            hash_blocks(self.blocks)
        return self._chain(counter.cumulative(self.hashed))

    def _chain(self, tokens: list[int]) -> list[ChainBlock]:
        return [ChainBlock(b.hash, t, b.role, tier) for b, t, tier in zip(self.hashed, tokens, self.tiers, strict=True)]


def prepare(
    body: Any,
    api: Api,
    policy: CachePolicy,
    counter: BlockCounter | None = None,
    forward_markers: bool = False,
    defer_hashing: bool = False,
) -> Prepared:
    """Parse, validate markers (400 before anything is forwarded), hash, count and strip.

    With ``defer_hashing`` the blocks are left unhashed for :meth:`Prepared.count`: the proxy
    forwards first and hashes while the upstream works.
    """
    blocks = parse_blocks(body, api, policy.ignore_prefixes)
    if not defer_hashing:
        hash_blocks(blocks)
    sent_by_position = place_breakpoints(blocks, body.get(MARKER, NO_MARKER), policy)
    by_position = with_automatic(blocks, sent_by_position, policy)
    hashed = [b for b in blocks if not b.ignored]
    tiers = [by_position[b.position] for b in hashed]
    sent = [sent_by_position[b.position] for b in hashed]
    tokens = counter.cumulative(hashed) if counter is not None else None
    forward = body if forward_markers else strip_markers(body, api)
    return Prepared(blocks, hashed, tiers, sent, tokens, forward)
