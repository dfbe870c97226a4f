"""Databases of one's own on the machine's Postgres: for a test session, a test, or a bench run."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import asyncpg

PG_ADMIN_DSN = os.environ.get("PROMPTCACHE_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
"""A URL-form DSN of a maintenance database; scratch databases are created next to it."""


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
