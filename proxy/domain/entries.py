"""The prefix index: what a scope has cached, and the one failure every backend reports.

Backends (``memory`` for replay and tests, ``postgres`` as the source of truth, ``redis`` as
an accelerator) all speak in :class:`IndexEntry` and raise :class:`IndexUnavailable` for any
failure, so callers have exactly one rule to follow: no index, no discount.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple


class Scope(NamedTuple):
    """Entries are never shared across principals, models or tokenizers."""

    principal_id: str
    virtual_model: str
    tokenizer_version: str


@dataclass(frozen=True, slots=True)
class IndexEntry:
    prefix_hash: bytes
    cum_tokens: int
    tier: str
    created_at: datetime
    expires_at: datetime

    def live(self, now: datetime) -> bool:
        """Live strictly before expiry: a request exactly one TTL later misses."""
        return self.expires_at > now


class IndexUnavailable(Exception):
    """Any index failure (connection, timeout, pool exhaustion, bad state): bill list price."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
