"""Shared fixtures for tests that need real backing services (docs/design.md#testing: a fresh database per session)."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from promptcache.proxy.domain.tokens import HuggingFaceTokenizer
from promptcache.proxy.http.server import serving
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.schema import migrate
from promptcache.proxy.testing.simulator import Simulator, SimulatorSettings

# A URL-form DSN of a maintenance database; test databases are created next to it.
PG_ADMIN_DSN = os.environ.get(
    "PROMPTCACHE_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@asynccontextmanager
async def scratch_database(prefix: str = "promptcache_test") -> AsyncIterator[str]:
    """A new, empty database named ``{prefix}_<random hex>``, dropped (FORCE) afterwards; yields its DSN."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlsplit(PG_ADMIN_DSN)._replace(path=f"/{name}").geturl()
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def pg_dsn() -> AsyncIterator[str]:
    """The session's migrated database."""
    async with scratch_database() as dsn:
        await migrate(dsn)
        yield dsn


@pytest.fixture
async def empty_pg_dsn() -> AsyncIterator[str]:
    """A database of the test's own, not migrated: for tests that must see every row or the bare schema."""
    async with scratch_database() as dsn:
        yield dsn


@pytest.fixture
async def pg(pg_dsn: str) -> AsyncIterator[Database]:
    """A pool on the session's database; the storage modules (index, ledger, tariffs…) are built over it."""
    db = await Database.connect(pg_dsn)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support.proxy import write_word_tokenizer

    return write_word_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
async def simulator(word_tokenizer: Path) -> AsyncIterator[tuple[str, Simulator]]:
    """The simulated upstream (word tokenizer, 3 tokens of template overhead per message)."""
    sim = Simulator(SimulatorSettings(HuggingFaceTokenizer(str(word_tokenizer))))
    async with serving(sim.app()) as url:
        yield url, sim


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ.get("PROMPTCACHE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
