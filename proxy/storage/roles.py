"""docs/design.md#database-roles: the proxies' own Postgres role, holding only the DML their statements run.

Whoever runs the migrations (the operator, the chart's hook Job, ``promptcache migrate``) owns every table and
keeps DDL. Proxies, and the replay Jobs that read the same Secret, log in as a member of a NOLOGIN group role
(``promptcache_proxy`` by default) whose privileges are exactly :data:`PROXY_GRANTS`: no DDL, no TRUNCATE, and
the ledger only appended to, so a proxy can add a bill but never read back, change or delete one.

The runner converges these grants after every run rather than once in a migration: a role a superuser creates
later gets them on the next run, a grant widened by hand is taken back, and a table a later migration adds joins
the map (``tests/storage/test_proxy_role.py`` fails until it does).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

    Connection = asyncpg.Connection[asyncpg.Record]

DEFAULT_PROXY_ROLE = "promptcache_proxy"
ROLE_ENV = "PROMPTCACHE_PROXY_ROLE"

PROXY_GRANTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "schema_migrations": (),
    # Lookups; the commit's upsert of written entries and its refresh of the read; the write-behind refresh.
    # Expired entries are deleted by the operator's sweep, not by proxies.
    "cache_entries": ("SELECT", "INSERT", "UPDATE"),
    # The version in force, which each ledger row names. Only the operator writes tariffs (proxies in a cluster
    # run --no-manage-tariffs), so the role needs no USAGE on tariffs_version_seq.
    "tariffs": ("SELECT",),
    # Authentication, and when a key was last looked up (that column only). Keys are created, revoked and rotated
    # with the owner role (promptcache keys, the operator's key requests).
    "api_keys": ("SELECT", "UPDATE (last_used_at)"),
    # Appended to only. ON CONFLICT (request_id) reads the key column, and that is all it may read.
    "ledger": ("INSERT", "SELECT (request_id)"),
    # The commit's row; SELECT for replay Jobs, which read the request log with the proxy Secret of their
    # namespace. Retention deletes rows with the owner role.
    "request_log": ("INSERT", "SELECT"),
    # The cache-salt key, made by the first proxy that needs it and read by the others.
    "proxy_secrets": ("SELECT", "INSERT"),
    # Reserved once, like the ledger row the id keys: ON CONFLICT (request_id) reads the key column only.
    "client_request_ids": ("INSERT", "SELECT (request_id)"),
    # Budgets are set with the owner role (promptcache budgets); a proxy reads them to refuse a principal over its
    # budget, and its commit adds each billed cost to the month's spend. A proxy could lower a count, but it can
    # already skip the check: this widens nothing that matters for the bill, which is the ledger.
    "budgets": ("SELECT",),
    "budget_spend": ("SELECT", "INSERT", "UPDATE"),
    # A sharded replay's pod adds its shard's sums (ON CONFLICT DO NOTHING: a retried pod adds nothing). The
    # operator reads and deletes them with the owner role. A proxy could write bogus sums, but it can already log
    # bogus requests, which replays read: this widens nothing.
    "replay_shards": ("INSERT",),
})
"""Per table, the privileges of the proxy role: every table the migrations create, so none is left undecided."""

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class RoleError(Exception):
    """The proxy role is set up so that it would not be least privilege; the message says why."""


def check_role_name(name: str) -> str:
    """``name`` if Postgres takes it unquoted as a role of ours, else ValueError saying why (for CLI flags, env)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid proxy role {name[:70]!r}: a role name here is 1 to 63 lowercase letters, digits "
                         "and underscores, not starting with a digit")
    if name.startswith("pg_") or name in ("public", "none"):
        raise ValueError(f"invalid proxy role {name!r}: Postgres reserves pg_* and the names public and none")
    return name


def role_from(env: Mapping[str, str]) -> str:
    """The role ``$PROMPTCACHE_PROXY_ROLE`` names (unset or blank: the default); ValueError naming the variable."""
    try:
        return check_role_name(env.get(ROLE_ENV, "").strip() or DEFAULT_PROXY_ROLE)
    except ValueError as exc:
        raise ValueError(f"{ROLE_ENV}: {exc}") from None


async def converge(conn: Connection, role: str) -> list[str]:
    """Make ``role`` (when missing and we may) and give it exactly :data:`PROXY_GRANTS` in the current schema.

    Returns warnings for an operator's eyes (the role cannot be made here; it may create tables), raises
    :class:`RoleError` when the role would hold more than its grants (the owner itself, a superuser, a member
    of the owner), and leaves asyncpg's errors to the caller.
    """
    import asyncpg  # here, not at the top: the CLI reads this module's names for every subcommand's --help

    check_role_name(role)
    me = await conn.fetchrow("SELECT current_user AS name, current_schema() AS schema, rolsuper OR rolcreaterole "
                             "AS creates FROM pg_roles WHERE rolname = current_user")
    assert me is not None
    owner, schema = str(me["name"]), str(me["schema"])
    if role == owner:
        raise RoleError(f"the proxy role {role} is the role running the migrations, which owns the tables: "
                        "proxies need a role of their own")
    superuser = await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = $1", role)
    if superuser is None:
        if not me["creates"]:
            return [f"the proxy role {role} does not exist and {owner} may not create roles, so it was not "
                    f"granted its privileges: as a superuser or a role with CREATEROLE, run CREATE ROLE {role} "
                    "NOLOGIN; then run promptcache migrate again (or restart the operator)"]
        # A migrator of another database on this server may make it at the same moment: roles are server-wide.
        with contextlib.suppress(asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
            await conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
    elif superuser:
        raise RoleError(f"the proxy role {role} is a superuser: a superuser bypasses every grant")
    if await conn.fetchval("SELECT pg_has_role($1, current_user, 'MEMBER')", role):
        raise RoleError(f"the proxy role {role} is a member of {owner}, which owns the tables: it would hold the "
                        f"owner's privileges (REVOKE {owner} FROM {role})")
    statements = [f'GRANT USAGE ON SCHEMA {_quoted(schema)} TO "{role}"']
    for table, privileges in PROXY_GRANTS.items():
        statements.append(f'REVOKE ALL ON TABLE {table} FROM "{role}"')
        if privileges:
            statements.append(f'GRANT {", ".join(privileges)} ON TABLE {table} TO "{role}"')
    async with conn.transaction():
        await conn.execute(";\n".join(statements))
    if await conn.fetchval("SELECT has_schema_privilege($1, current_schema(), 'CREATE')", role):
        return [f"the proxy role {role} may create tables in schema {schema} (PUBLIC holds CREATE there, the "
                f"default before Postgres 15, or it was granted): as the schema's owner, run REVOKE CREATE ON "
                f"SCHEMA {schema} FROM PUBLIC, {role}"]
    return []


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
