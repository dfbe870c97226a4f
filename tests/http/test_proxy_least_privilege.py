"""A proxy logged in as a member of the proxy role (docs/design.md#database-roles), as in a cluster: the owner
migrates and writes the tariff and the key (the operator's and ``promptcache keys``' part), the real proxy bills a
conversation end to end with exact costs, a replay reads the request log through the same login, and that login can
neither change the schema nor read, rewrite or delete money."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import openai
import pytest
import yaml

from promptcache.proxy.config import load_config
from promptcache.proxy.domain.pricing import Tariff
from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.requestlog import count_rows, export_rows
from promptcache.proxy.storage.schema import migrate
from promptcache.proxy.storage.tariffs import Tariffs
from promptcache.proxy.testing.simulator import Simulator

from support.conversation import openai_turns
from support.database import dsn_as, scratch_database, scratch_roles
from support.proxy import ledger, model_config, running_proxy, settle, unique

# The billing tests' first two turns (tests/http/test_proxy_billing.py works them by hand): (prompt, completion,
# read, creation_5m, creation_1h, uncached, cost) at 3.00 in, 15.00 out per million, 1h 2.0, 5m 1.25, read 0.1.
EXPECTED = [
    (36, 8, 0, 10, 20, 6, Decimal("0.0002955")),
    (60, 8, 30, 18, 0, 12, Decimal("0.0002325")),
]


@dataclass(frozen=True)
class Databases:
    owner_dsn: str
    proxy_dsn: str
    """A login in the proxy role, as the proxy Secret holds."""


@pytest.fixture(scope="module")
async def databases() -> AsyncIterator[Databases]:
    async with scratch_roles() as roles, scratch_database() as dsn:
        role = roles.name("pcproxy")
        await migrate(dsn, proxy_role=role)
        login = await roles.create("pcproxylogin", f"LOGIN PASSWORD 'proxy-pw' IN ROLE {role}")
        yield Databases(dsn, dsn_as(dsn, login, "proxy-pw"))


async def test_a_proxy_in_the_proxy_role_bills_end_to_end(
        databases: Databases, tmp_path: Path, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    url, _ = simulator
    model = model_config("chat", url + "/v1", "openai", word_tokenizer)
    model["upstream"]["cacheSalt"] = "principal"  # start-up makes the shared salt key: an INSERT into proxy_secrets
    config = {"models": [model]}
    (tmp_path / "owner.yaml").write_text(yaml.safe_dump(config))
    principal = unique("acme")
    owner = await Database.connect(databases.owner_dsn)
    try:
        chat = load_config(tmp_path / "owner.yaml").models["chat"]
        tariff = await Tariffs(owner).set(
            Tariff.for_policy("chat", chat.input_per_mtok, chat.output_per_mtok, chat.policy), datetime.now(UTC))
        key = (await ApiKeys(owner).create(principal))[1]
    finally:
        await owner.close()

    async with running_proxy(config, tmp_path, databases.proxy_dsn, manage_tariffs=False) as proxy:
        assert proxy.server.proxy.salt_key_shared
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
        request_ids = []
        for turn, (messages, expected) in enumerate(zip(openai_turns(), EXPECTED, strict=False)):
            sent = {"x-request-id": f"least-privilege-{principal}-{turn}"} if turn else {}  # reserved as the role
            raw = await client.chat.completions.with_raw_response.create(model="chat", messages=messages,  # type: ignore[arg-type]
                                                                         extra_headers=sent)
            await settle(proxy)
            request_ids.append(raw.headers["x-request-id"])
            assert request_ids[-1] == sent.get("x-request-id", request_ids[-1])
            row = await ledger(databases.owner_dsn, request_ids[-1])
            prompt, out, read, c5m, c1h, uncached, cost = expected
            assert (row["principal_id"], row["tariff_version"]) == (principal, tariff.version)
            assert (row["prompt_tokens"], row["completion_tokens"], row["read_tokens"]) == (prompt, out, read)
            assert (row["creation_5m"], row["creation_1h"], row["creation_24h"], row["uncached_tokens"]) == (
                c5m, c1h, 0, uncached)
            assert row["cost"] == cost
            assert row["list_cost"] == (Decimal(prompt) * 3 + Decimal(out) * 15) / 1_000_000

    conn = await asyncpg.connect(databases.owner_dsn)
    try:
        entries = await conn.fetchval("SELECT count(*) FROM cache_entries WHERE principal_id = $1", principal)
        salts = await conn.fetchval("SELECT count(*) FROM proxy_secrets WHERE name = 'cache_salt'")
        used = await conn.fetchval("SELECT last_used_at IS NOT NULL FROM api_keys WHERE principal_id = $1", principal)
    finally:
        await conn.close()
    assert used  # the proxy's lookup stamped the key's use through its role's one updatable column
    assert (entries, salts) == (3, 1)  # turn 1 wrote the system prompt and u1, turn 2 read u1 and wrote u2

    # A replay Job reads the request log with the same Secret.
    conn = await asyncpg.connect(databases.proxy_dsn)
    try:
        assert await count_rows(conn, models=["chat"]) == 2
        logged = [r async for r in export_rows(conn, models=["chat"])]
    finally:
        await conn.close()
    assert [(r.id, r.principal, r.billed_cost) for r in logged] == [
        (rid, principal, cost) for rid, (*_, cost) in zip(request_ids, EXPECTED, strict=True)]


@pytest.mark.parametrize("statement", [
    "CREATE TABLE spool (request_id text)",
    "CREATE SCHEMA mine",
    "CREATE INDEX ON cache_entries (tier)",
    "DROP TABLE ledger",
    "ALTER TABLE ledger ADD COLUMN note text",
    "ALTER TABLE ledger DISABLE TRIGGER ALL",
    "TRUNCATE ledger",
    "TRUNCATE request_log",
    "UPDATE ledger SET cost = 0",
    "DELETE FROM ledger",
    "SELECT cost FROM ledger",
    "UPDATE request_log SET billed_cost = 0",
    "DELETE FROM request_log",
    "DELETE FROM cache_entries",
    "INSERT INTO tariffs (model, input_per_mtok, output_per_mtok, write_multiplier_5m, write_multiplier_1h, "
    "write_multiplier_24h, read_multiplier, valid_from) VALUES ('chat', 0, 0, 0, 0, 0, 0, now())",
    "UPDATE tariffs SET input_per_mtok = 0",
    "SELECT nextval('tariffs_version_seq')",
    "INSERT INTO api_keys (key_id, key_hash, principal_id) VALUES ('k', '\\x00', 'mallory')",
    "UPDATE api_keys SET revoked_at = NULL",
    "UPDATE api_keys SET principal_id = 'mallory'",
    "DELETE FROM proxy_secrets",
    "DELETE FROM schema_migrations",
])
async def test_the_proxy_role_cannot_change_the_schema_or_rewrite_money(databases: Databases, statement: str) -> None:
    conn = await asyncpg.connect(databases.proxy_dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)
    finally:
        await conn.close()
