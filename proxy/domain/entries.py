"""The prefix index: what a scope has cached.

Backends (``memory`` for replay and tests, Postgres as the source of truth, Redis as an
accelerator) all speak in :class:`IndexEntry`; how they fail is storage's business
(``storage.errors.IndexUnavailable``), not the domain's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

PRINCIPAL_RULE = "a principal is printable text, not empty, without leading or trailing spaces"


def valid_principal(name: str) -> bool:
    """Whether ``name`` can be a principal: what the ledger, the salt and every log can carry as it is (bytes that
    were not UTF-8 arrive from a header as unprintable surrogate escapes)."""
    return bool(name) and name == name.strip() and name.isprintable()


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
    replica: str | None = None
    """The upstream replica that last computed this prefix (docs/design.md#replica-routing): routing's hint."""

    def live(self, now: datetime) -> bool:
        """Live strictly before expiry: a request exactly one TTL later misses."""
        return self.expires_at > now
