"""docs/design.md#budgets: per-principal monthly spend limits, kept in Postgres so every proxy replica, and every
restart, enforces the same count.

The commit that bills a request adds its cost to the principal's spend for the month (UTC) the request started
in, in the same transaction as the ledger row (:mod:`.ledger`), so the count is the ledger's own. Setting a budget
seeds the month with what the ledger already holds. Proxies load every budget once per refresh period in the
background (:class:`BudgetCache`); the request that crosses the limit is answered and billed in full, those after it
get 429 until the month turns or the budget is raised.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from promptcache.proxy.domain.errors import clipped
from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.postgres import Database

if TYPE_CHECKING:
    from promptcache.proxy.storage.postgres import Conn

_log = logging.getLogger("promptcache.budgets")
_MONEY = re.compile(r"[0-9]{1,12}(\.[0-9]{1,12})?")
MONEY_RULE = 'a non-negative amount of US dollars such as "100" or "2500.50" (at most 12 digits each side)'

_MONTH = "date_trunc('month', now(), 'UTC')"
_STATE = f"""SELECT b.monthly_usd, COALESCE(s.spent, 0) AS spent, {_MONTH} AS month FROM budgets b
LEFT JOIN budget_spend s ON s.principal_id = b.principal_id AND s.month = {_MONTH}
WHERE b.principal_id = $1"""
_LIST = f"""SELECT b.principal_id, b.monthly_usd, COALESCE(s.spent, 0) AS spent, {_MONTH} AS month FROM budgets b
LEFT JOIN budget_spend s ON s.principal_id = b.principal_id AND s.month = {_MONTH}
ORDER BY b.principal_id"""
_SET = """INSERT INTO budgets (principal_id, monthly_usd) VALUES ($1, $2)
ON CONFLICT (principal_id) DO UPDATE SET monthly_usd = EXCLUDED.monthly_usd, updated_at = now()
RETURNING (xmax = 0) AS created"""
_SEED = f"""INSERT INTO budget_spend (principal_id, month, spent)
SELECT $1, {_MONTH}, COALESCE(sum(cost), 0) FROM ledger WHERE principal_id = $1 AND started_at >= {_MONTH}
ON CONFLICT (principal_id, month) DO NOTHING"""
_CLEAR = "DELETE FROM budgets WHERE principal_id = $1 RETURNING 1"


def parse_money(text: str) -> Decimal:
    """A budget amount; ValueError naming the rule otherwise."""
    if not _MONEY.fullmatch(text):
        raise ValueError(f"must be {MONEY_RULE}, got {clipped(text)!r}")
    return Decimal(text)


@dataclass(frozen=True)
class Budget:
    principal: str
    monthly: Decimal
    spent: Decimal
    """Spent in ``month`` so far (exact, from billed costs)."""
    month: datetime

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.monthly


class Budgets:
    """Set, clear, list and read budgets, over a shared :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def set(self, principal: str, monthly: Decimal) -> bool:
        """Set (or change) a principal's monthly budget; True when it is new. A new budget's month starts from the
        ledger's spend so far."""
        async def setting(conn: Conn) -> bool:
            async with conn.transaction():
                created: bool = await conn.fetchval(_SET, principal, monthly)
                await conn.execute(_SEED, principal)
                return created

        return await self._db.run(setting)

    async def clear(self, principal: str) -> bool:
        return await self._db.run(lambda conn: conn.fetchval(_CLEAR, principal)) is not None

    async def get(self, principal: str) -> Budget | None:
        row = await self._db.run(lambda conn: conn.fetchrow(_STATE, principal))
        return None if row is None else Budget(principal, row["monthly_usd"], row["spent"], row["month"])

    async def list(self) -> list[Budget]:
        rows = await self._db.run(lambda conn: conn.fetch(_LIST))
        return [Budget(r["principal_id"], r["monthly_usd"], r["spent"], r["month"]) for r in rows]


class BudgetCache:
    """A proxy's view of budgets: all of them, with this month's spend, loaded in the background every ``refresh``
    seconds (one query, however much traffic), so admission never waits for Postgres.

    A load that fails leaves the last state in force (a principal over budget stays refused); before the first
    load succeeds, :meth:`over` raises :class:`IndexUnavailable` and the caller admits and counts a fallback.
    """

    def __init__(self, budgets: Budgets, refresh: float = 1.0) -> None:
        self.budgets = budgets
        self.refresh = refresh
        self._over: dict[str, Budget] | None = None

    async def load(self) -> None:
        """Read every budget now; IndexUnavailable when Postgres cannot say (the last state stays)."""
        self._over = {b.principal: b for b in await self.budgets.list() if b.exhausted}

    async def run(self) -> None:
        """Load every ``refresh`` seconds until cancelled."""
        while True:
            try:
                await self.load()
            except IndexUnavailable as exc:
                _log.warning("budgets not refreshed: %s", exc)
            await asyncio.sleep(self.refresh)

    def over(self, principal: str) -> Budget | None:
        """The principal's budget when it is used up; None when it is not, or there is none."""
        if self._over is None:
            raise IndexUnavailable("budgets", "not loaded yet")
        return self._over.get(principal)
