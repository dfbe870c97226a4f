"""Tiny builders shared by the domain and storage unit tests."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

from promptcache.proxy.domain.classify import ChainBlock, classify
from promptcache.proxy.domain.entries import Scope
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.domain.pricing import Tariff, reconcile
from promptcache.proxy.storage.ledger import RequestRecord

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def h(name: str | int) -> bytes:
    """A stand-in prefix hash for block ``name``."""
    return hashlib.sha256(f"block-{name}".encode()).digest()


def make_chain(spec: Sequence[tuple[int, str | None]], tag: str = "") -> list[ChainBlock]:
    """``[(cumulative tokens, tier or None), ...]`` as a chain; block i hashes to ``h(f"{tag}{i}")``."""
    return [ChainBlock(h(f"{tag}{i}"), tokens, "user", tier) for i, (tokens, tier) in enumerate(spec)]


def text_parts(*markers: object, prefix: str = "part") -> list[dict[str, object]]:
    """Text parts ``{prefix}{i}``; a marker of ``...`` means the part carries no cache_control key."""
    parts: list[dict[str, object]] = []
    for i, marker in enumerate(markers):
        part: dict[str, object] = {"type": "text", "text": f"{prefix}{i}"}
        if marker is not ...:
            part["cache_control"] = marker
        parts.append(part)
    return parts


def finished_request(tokens: int, at: datetime = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)) -> RequestRecord:
    """A billed request of a principal of its own that wrote one ``tokens``-token prefix; past 2**31-1 tokens a
    row Postgres refuses (integer columns)."""
    policy = CachePolicy(min_prefix_tokens=1)
    chain = [ChainBlock(secrets.token_bytes(32), tokens, "user", "5m")]
    result = classify(chain, {}, policy, at)
    return RequestRecord(
        request_id=f"req-{secrets.token_hex(6)}", started_at=at,
        scope=Scope(f"p-{secrets.token_hex(3)}", "m", "tok"), api="openai", status=200,
        split=reconcile(min(tokens, 2**31 - 1), 10, result if tokens < 2**31 else None),
        tariff=Tariff.for_policy("m", Decimal(3), Decimal(15), policy),
        chain=chain, classification=result, latency_ms=1.0,
    )
