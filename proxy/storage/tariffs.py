"""Tariffs in Postgres: the append-only price history each request is billed from.

A request is billed at the version in force when it started, and a ledger row names that
version, so versions are never edited: a change closes the active row and opens a new one.
"""

from __future__ import annotations

from datetime import datetime
from types import MappingProxyType
from typing import TYPE_CHECKING

import asyncpg

from promptcache.proxy.domain.pricing import Tariff
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.postgres import Database

if TYPE_CHECKING:
    from promptcache.proxy.storage.postgres import Conn

_LOCK_CLASS = int.from_bytes(b"tarf", "big")
"""First key of the two-key advisory lock that serialises tariff changes per model."""

_COLUMNS = """
version, model, input_per_mtok, output_per_mtok, write_multiplier_5m, write_multiplier_1h,
write_multiplier_24h, read_multiplier, valid_from, valid_until
"""
_ACTIVE = f"SELECT {_COLUMNS} FROM tariffs WHERE model = $1 AND valid_until IS NULL FOR UPDATE"
_INSERT = f"""
INSERT INTO tariffs (
    model, input_per_mtok, output_per_mtok, write_multiplier_5m, write_multiplier_1h, write_multiplier_24h,
    read_multiplier, valid_from
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING {_COLUMNS}
"""
_CLOSE = "UPDATE tariffs SET valid_until = $2 WHERE model = $1 AND valid_until IS NULL"
_LOCK = "SELECT pg_advisory_xact_lock($1, hashtext($2))"
_HISTORY = f"SELECT {_COLUMNS} FROM tariffs WHERE model = $1 ORDER BY version"
_AT = f"""
SELECT {_COLUMNS} FROM tariffs
WHERE model = $1 AND valid_from <= $2 AND (valid_until IS NULL OR $2 < valid_until)
ORDER BY valid_from DESC, version DESC
LIMIT 1
"""


class Tariffs:
    """Each model's tariff versions, over a shared :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def set(self, tariff: Tariff, at: datetime) -> Tariff:
        """Make ``tariff`` the active version from ``at``; unchanged prices keep the active version.

        History is append-only: a change closes the active row at ``at`` and opens a new one.
        The per-model advisory lock also serialises the very first version, which has no row to lock.
        """

        async def run(conn: Conn) -> Tariff:
            async with conn.transaction():
                await conn.execute(_LOCK, _LOCK_CLASS, tariff.model)
                row = await conn.fetchrow(_ACTIVE, tariff.model)
                if row is not None:
                    active = _tariff(row)
                    if active.same_prices(tariff):
                        return active
                    assert active.valid_from is not None
                    if at < active.valid_from:
                        raise ValueError(
                            f"tariff change for {tariff.model} at {at.isoformat()} precedes the active"
                            f" version {active.version} (valid from {active.valid_from.isoformat()})"
                        )
                    await conn.execute(_CLOSE, tariff.model, at)
                new = await conn.fetchrow(
                    _INSERT,
                    tariff.model,
                    tariff.input_per_mtok,
                    tariff.output_per_mtok,
                    *(tariff.write_multipliers[tier] for tier in TIERS),
                    tariff.read_multiplier,
                    at,
                )
                assert new is not None
                return _tariff(new)

        return await self._db.run(run)

    async def close(self, model: str, at: datetime) -> None:
        """End the active version (the model is no longer served); history stays."""

        async def run(conn: Conn) -> None:
            async with conn.transaction():
                await conn.execute(_LOCK, _LOCK_CLASS, model)
                await conn.execute(_CLOSE, model, at)

        await self._db.run(run)

    async def history(self, model: str) -> list[Tariff]:
        """Every version of a model's tariff, oldest first."""
        return [_tariff(row) for row in await self._db.run(lambda conn: conn.fetch(_HISTORY, model))]

    async def at(self, model: str, at: datetime) -> Tariff | None:
        """The version in force at ``at``: a request is billed at the tariff active when it started."""
        row = await self._db.run(lambda conn: conn.fetchrow(_AT, model, at))
        return None if row is None else _tariff(row)


def _tariff(row: asyncpg.Record) -> Tariff:
    return Tariff(
        model=row["model"],
        input_per_mtok=row["input_per_mtok"],
        output_per_mtok=row["output_per_mtok"],
        write_multipliers=MappingProxyType({tier: row[f"write_multiplier_{tier}"] for tier in TIERS}),
        read_multiplier=row["read_multiplier"],
        version=row["version"],
        valid_from=row["valid_from"],
        valid_until=row["valid_until"],
    )
