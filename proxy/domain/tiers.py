"""Cache tiers: the TTL names a ``cache_control`` marker may carry and how long each lives."""

from datetime import timedelta
from typing import Final

TIER_DURATIONS: Final[dict[str, timedelta]] = {
    "5m": timedelta(minutes=5),
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
}
TIERS: Final[tuple[str, ...]] = ("5m", "1h", "24h")
"""Shortest first; a breakpoint may not follow a shorter one."""


def duration(tier: str) -> timedelta:
    return TIER_DURATIONS[tier]
