"""docs/design.md#storage, #reconciliation: apply the Postgres schema, once, however many operators, hooks and CLIs
race.

The SQL files ship as package data of ``promptcache.proxy.storage.migrations``; the proxy never
changes the schema itself: this runner (the operator, the chart's hook, ``promptcache migrate``) does, as the
owner of the tables, and then gives the proxies' role its grants (``roles``, docs/design.md#database-roles).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from promptcache.proxy.storage import roles

MIGRATIONS_PACKAGE = "promptcache.proxy.storage.migrations"
LOCK_KEY = int.from_bytes(b"pcmigrat", "big")
"""Session advisory lock key ("pcmigrat" as a big-endian bigint) shared by every migrator."""

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(Exception):
    """The schema could not be brought up to date; the message is meant for an operator's eyes."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class Migrated:
    applied: list[int]
    """The versions this run applied; empty when the schema was up to date."""
    warnings: list[str]
    """Why the proxy role is not (yet) least privilege, with what to run: the run itself succeeded."""


def available() -> list[Migration]:
    """The shipped ``NNNN_name.sql`` files in version order; a duplicate version is a packaging bug."""
    folder = resources.files(MIGRATIONS_PACKAGE)
    found: dict[int, Migration] = {}
    for item in folder.iterdir():
        match = _FILE.match(item.name)
        if match is None:
            continue
        version = int(match.group(1))
        if version in found:
            raise MigrationError(
                f"two migrations share version {version}: {found[version].name}, {match.group(2)}"
            )
        found[version] = Migration(version, match.group(2), item.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def migrate(dsn: str, *, proxy_role: str = roles.DEFAULT_PROXY_ROLE,
                  connect_timeout: float = 10.0) -> Migrated:
    """Apply every pending migration, then converge ``proxy_role``'s grants (:func:`roles.converge`).

    One dedicated connection holds a session advisory lock for the whole run, so concurrent
    migrators queue up and each finds the work already done. Each migration runs in its own
    transaction together with its ``schema_migrations`` row: it is applied entirely or not at all.
    Closing the connection releases the lock even when a migration fails.
    """
    roles.check_role_name(proxy_role)
    migrations = available()
    try:
        conn = await asyncpg.connect(dsn, timeout=connect_timeout)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as exc:
        raise MigrationError(f"cannot connect to Postgres: {exc}") from exc
    applied_now: list[int] = []
    step = "setting up schema_migrations"
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        await conn.execute(_CREATE_TABLE)
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in migrations:
            if migration.version in done:
                continue
            step = f"applying {migration.version:04d}_{migration.name}"
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied_now.append(migration.version)
        step = f"granting the proxy role {proxy_role}"
        warnings = await roles.converge(conn, proxy_role)
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    except roles.RoleError as exc:
        raise MigrationError(str(exc)) from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise MigrationError(f"migration failed while {step}: {exc}") from exc
    finally:
        await conn.close()
    return Migrated(applied_now, warnings)
