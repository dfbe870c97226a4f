"""Tiny builders shared by the domain unit tests."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime

from promptcache.proxy.domain.classify import ChainBlock

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
