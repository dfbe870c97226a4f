"""An in-memory index: replay's simulator state, and a reference for the Postgres backend."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from promptcache.proxy.domain.classify import Classification, Write
from promptcache.proxy.domain.entries import IndexEntry, Scope


def merge_write(existing: IndexEntry | None, write: Write, now: datetime) -> IndexEntry:
    """Upsert rule: an expired (or absent) entry starts a new episode; a live one keeps its start."""
    if existing is None or not existing.live(now):
        return IndexEntry(write.hash, write.tokens, write.tier, now, write.expires_at)
    if write.expires_at > existing.expires_at:
        return IndexEntry(write.hash, write.tokens, write.tier, existing.created_at, write.expires_at)
    return existing


class MemoryIndex:
    def __init__(self) -> None:
        self._scopes: dict[Scope, dict[bytes, IndexEntry]] = {}

    def lookup(self, scope: Scope, hashes: Iterable[bytes]) -> dict[bytes, IndexEntry]:
        entries = self._scopes.get(scope, {})
        return {h: entries[h] for h in hashes if h in entries}

    def apply(self, scope: Scope, result: Classification, now: datetime) -> None:
        """Record a committed request: slide the read's expiry, upsert the writes."""
        entries = self._scopes.setdefault(scope, {})
        if result.read is not None:
            current = entries.get(result.read.hash)
            if current is not None and result.read.expires_at > current.expires_at:
                entries[result.read.hash] = IndexEntry(
                    current.prefix_hash, current.cum_tokens, current.tier, current.created_at, result.read.expires_at
                )
        for write in result.writes:
            entries[write.hash] = merge_write(entries.get(write.hash), write, now)

    def entry(self, scope: Scope, prefix_hash: bytes) -> IndexEntry | None:
        return self._scopes.get(scope, {}).get(prefix_hash)
