"""What one finished request commits: its bill (ledger row), its cache changes and its log row."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import cached_property

from promptcache.proxy.domain.classify import ChainBlock, Classification
from promptcache.proxy.domain.entries import Scope
from promptcache.proxy.domain.pricing import Split, Tariff, cost, list_cost

CHAIN_HASH_BYTES = 16
"""The request log keeps the first 16 bytes of each prefix hash: enough to replay, nothing to read."""


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    started_at: datetime
    scope: Scope
    api: str
    status: int
    split: Split
    tariff: Tariff
    chain: Sequence[ChainBlock]
    classification: Classification | None
    """Cache changes to apply; None when the request must not touch the index."""
    latency_ms: float = 0.0
    sent_tiers: Sequence[str | None] | None = None
    """The markers as the client sent them, per chain block, for the request log (default: the chain's)."""

    @property
    def billable(self) -> bool:
        """Only a 2xx response with usage is billed and may write to the index."""
        return 200 <= self.status < 300

    @cached_property
    def cost(self) -> Decimal:
        return cost(self.split, self.tariff)

    @cached_property
    def list_cost(self) -> Decimal:
        return list_cost(self.split, self.tariff)
