"""Cache tiers: the TTL names a ``cache_control`` marker may carry and how long each lives."""

from datetime import timedelta
from typing import Final, Literal, get_args

Tier = Literal["5m", "1h", "24h"]

TIER_DURATIONS: Final[dict[str, timedelta]] = {
    "5m": timedelta(minutes=5),
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
}
TIERS: Final[tuple[str, ...]] = get_args(Tier)
"""Shortest first; a breakpoint may not follow a shorter one."""


def duration(tier: str) -> timedelta:
    return TIER_DURATIONS[tier]
