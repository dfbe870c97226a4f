"""The proxies' own Postgres role (docs/design.md#database-roles): the migrations runner makes it and grants it exactly
the DML each table needs, takes back whatever was widened by hand on the next run, says what to run when it may not
make the role, and refuses a role that would hold more than its grants. ``promptcache migrate --proxy-role`` and
``$PROMPTCACHE_PROXY_ROLE`` refuse a bad name with exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from promptcache.operator.handlers.config import EnvironmentError_, OperatorConfig
from promptcache.proxy.storage.roles import PROXY_GRANTS
from promptcache.proxy.storage.schema import MigrationError, migrate

from support.database import admin_execute, dsn_as, scratch_database, scratch_roles

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))
PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
# Written out here, not read from PROXY_GRANTS: what each table's grants must be, per docs/design.md#database-roles.
EXPECTED = {
    "schema_migrations": set(),
    "cache_entries": {"SELECT", "INSERT", "UPDATE"},
    "tariffs": {"SELECT"},
    "api_keys": {"SELECT"},  # and UPDATE of last_used_at only: updatable_columns
    "ledger": {"INSERT"},
    "request_log": {"SELECT", "INSERT"},
    "proxy_secrets": {"SELECT", "INSERT"},
    "client_request_ids": {"INSERT"},
    "replay_shards": {"INSERT"},
    "budgets": {"SELECT"},
    "budget_spend": {"SELECT", "INSERT", "UPDATE"},
}


async def privileges(dsn: str, role: str) -> dict[str, set[str]]:
    """Per table of the schema, the table privileges ``role`` holds (directly or through a role it is in)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = "
                                                           "'public'")]
        return {table: {p for p in PRIVILEGES
                        if await conn.fetchval("SELECT has_table_privilege($1, $2, $3)", role, table, p)}
                for table in tables}
    finally:
        await conn.close()


async def readable_columns(dsn: str, role: str, table: str, privilege: str = "SELECT") -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT attname FROM pg_attribute WHERE attrelid = $2::regclass AND attnum > 0 AND "
                                "NOT attisdropped AND has_column_privilege($1, $2, attname, $3)", role, table,
                                privilege)
    finally:
        await conn.close()
    return {r["attname"] for r in rows}


async def fetchval(dsn: str, query: str, *args: object) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


def run_migrate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")}
    return subprocess.run([PROMPTCACHE, "migrate", *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def test_every_table_has_a_decision() -> None:
    assert {t: set(p) for t, p in PROXY_GRANTS.items()} == EXPECTED | {
        "ledger": {"INSERT", "SELECT (request_id)"}, "client_request_ids": {"INSERT", "SELECT (request_id)"},
        "api_keys": {"SELECT", "UPDATE (last_used_at)"}}


async def test_the_runner_makes_the_role_and_grants_exactly_its_dml() -> None:
    async with scratch_roles() as roles, scratch_database() as dsn:
        role = roles.name("pcproxy")
        migrated = await migrate(dsn, proxy_role=role)

        assert (migrated.applied, migrated.warnings) == ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [])
        assert await privileges(dsn, role) == EXPECTED  # every table the migrations made, and nothing more
        assert await readable_columns(dsn, role, "ledger") == {"request_id"}  # what ON CONFLICT (request_id) reads
        assert await readable_columns(dsn, role, "client_request_ids") == {"request_id"}
        assert await readable_columns(dsn, role, "api_keys", "UPDATE") == {"last_used_at"}
        assert await fetchval(dsn, "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", role) is False
        assert await fetchval(dsn, "SELECT has_sequence_privilege($1, 'tariffs_version_seq', 'USAGE')", role) is False
        assert await fetchval(dsn, "SELECT has_schema_privilege($1, 'public', 'USAGE')", role) is True
        assert await fetchval(dsn, "SELECT has_schema_privilege($1, 'public', 'CREATE')", role) is False


async def test_a_rerun_takes_back_a_grant_widened_by_hand() -> None:
    async with scratch_roles() as roles, scratch_database() as dsn:
        role = roles.name("pcproxy")
        await migrate(dsn, proxy_role=role)
        await admin_execute(dsn, f"GRANT SELECT, UPDATE, DELETE, TRUNCATE ON ledger TO {role}",
                            f"GRANT DELETE ON request_log, cache_entries TO {role}",
                            f"GRANT INSERT, UPDATE ON tariffs, api_keys TO {role}")
        assert (await privileges(dsn, role))["ledger"] == {"INSERT", "SELECT", "UPDATE", "DELETE", "TRUNCATE"}

        assert (await migrate(dsn, proxy_role=role)).applied == []
        assert await privileges(dsn, role) == EXPECTED
        assert await readable_columns(dsn, role, "ledger") == {"request_id"}


async def test_an_owner_that_may_not_create_roles_still_migrates_and_says_what_to_run() -> None:
    async with scratch_roles() as roles, scratch_database() as dsn:
        owner = await roles.create("pcowner", "LOGIN PASSWORD 'owner-pw' NOCREATEROLE")
        role = roles.name("pcproxy")
        await admin_execute(dsn, f"ALTER DATABASE {dsn.rsplit('/', 1)[1]} OWNER TO {owner}")
        owner_dsn = dsn_as(dsn, owner, "owner-pw")

        first = run_migrate("--database", owner_dsn, "--proxy-role", role)

        assert (first.returncode, first.stdout) == (0, "applied migrations [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n")
        assert first.stderr == (
            f"warning: the proxy role {role} does not exist and {owner} may not create roles, so it was not granted "
            f"its privileges: as a superuser or a role with CREATEROLE, run CREATE ROLE {role} NOLOGIN; then run "
            "promptcache migrate again (or restart the operator)\n")
        assert await fetchval(dsn, "SELECT tableowner FROM pg_tables WHERE tablename = 'ledger'") == owner

        await admin_execute(dsn, f"CREATE ROLE {role} NOLOGIN")
        second = run_migrate("--database", owner_dsn, PROMPTCACHE_PROXY_ROLE=role)

        assert (second.returncode, second.stdout, second.stderr) == (0, "schema is up to date\n", "")
        assert await privileges(dsn, role) == EXPECTED


async def test_a_role_that_may_create_tables_is_reported() -> None:
    """Postgres before 15 let PUBLIC create tables in ``public``; the runner cannot revoke that, it says so."""
    async with scratch_roles() as roles, scratch_database() as dsn:
        role = roles.name("pcproxy")
        await admin_execute(dsn, "GRANT CREATE ON SCHEMA public TO PUBLIC")

        migrated = await migrate(dsn, proxy_role=role)

        assert migrated.warnings == [
            f"the proxy role {role} may create tables in schema public (PUBLIC holds CREATE there, the default before "
            f"Postgres 15, or it was granted): as the schema's owner, run REVOKE CREATE ON SCHEMA public FROM PUBLIC, "
            f"{role}"]
        assert await privileges(dsn, role) == EXPECTED


async def test_a_superuser_or_the_owner_itself_is_refused() -> None:
    async with scratch_roles() as roles, scratch_database() as dsn:
        superuser = await roles.create("pcsuper", "NOLOGIN SUPERUSER")
        with pytest.raises(MigrationError) as caught:
            await migrate(dsn, proxy_role=superuser)
        assert str(caught.value) == f"the proxy role {superuser} is a superuser: a superuser bypasses every grant"

        with pytest.raises(MigrationError) as caught:
            await migrate(dsn, proxy_role="postgres")
        assert str(caught.value) == ("the proxy role postgres is the role running the migrations, which owns the "
                                     "tables: proxies need a role of their own")


async def test_a_member_of_the_owner_is_refused() -> None:
    async with scratch_roles() as roles, scratch_database() as dsn:
        owner = await roles.create("pcowner", "LOGIN PASSWORD 'owner-pw' CREATEROLE")
        member = await roles.create("pcproxy", f"NOLOGIN IN ROLE {owner}")
        await admin_execute(dsn, f"ALTER DATABASE {dsn.rsplit('/', 1)[1]} OWNER TO {owner}")

        done = run_migrate("--database", dsn_as(dsn, owner, "owner-pw"), "--proxy-role", member)

        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr == (f"migration failed: the proxy role {member} is a member of {owner}, which owns the "
                               f"tables: it would hold the owner's privileges (REVOKE {owner} FROM {member})\n")


@pytest.mark.parametrize(("name", "reason"), [
    ("Proxy", "a role name here is 1 to 63 lowercase letters, digits and underscores, not starting with a digit"),
    ("1proxy", "a role name here is 1 to"),
    ("proxy-role", "a role name here is 1 to"),
    ('proxy"; DROP TABLE ledger; --', "a role name here is 1 to"),
    ("", "a role name here is 1 to"),
    ("a" * 64, "a role name here is 1 to"),
    ("pg_proxy", "Postgres reserves pg_* and the names public and none"),
    ("public", "Postgres reserves pg_*"),
    ("none", "Postgres reserves pg_*"),
])
def test_a_bad_role_name_is_a_usage_error(name: str, reason: str) -> None:
    done = run_migrate("--database", "postgresql://postgres@127.0.0.1:1/none", "--proxy-role", name)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"--proxy-role: invalid proxy role {name[:70]!r}: {reason}")
    assert done.stderr.count("\n") == 1

    env = run_migrate("--database", "postgresql://postgres@127.0.0.1:1/none", PROMPTCACHE_PROXY_ROLE=name or "Bad")
    assert env.returncode == 2 and env.stderr.startswith("PROMPTCACHE_PROXY_ROLE: invalid proxy role ")


def test_the_operator_reads_its_proxy_role() -> None:
    image = {"PROMPTCACHE_PROXY_IMAGE": "registry.example.com/promptcache:1"}
    assert OperatorConfig.from_env(image).proxy_role == "promptcache_proxy"
    assert OperatorConfig.from_env({**image, "PROMPTCACHE_PROXY_ROLE": " billing_proxy "}).proxy_role == "billing_proxy"
    with pytest.raises(EnvironmentError_) as caught:
        OperatorConfig.from_env({**image, "PROMPTCACHE_PROXY_ROLE": "pg_proxy"})
    assert str(caught.value) == ("PROMPTCACHE_PROXY_ROLE: invalid proxy role 'pg_proxy': Postgres reserves pg_* and "
                                 "the names public and none")
