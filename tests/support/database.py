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


class ScratchRoles:
    """Postgres roles of one test, named ``{prefix}_<random hex>``. Roles are server-wide and outlive a database:
    :func:`scratch_roles` drops them at the end, so enter it before the databases that grant them anything."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def name(self, prefix: str) -> str:
        """A fresh name to drop at the end, for a role someone else (the migrations runner) creates."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        self.names.append(name)
        return name

    async def create(self, prefix: str, options: str = "NOLOGIN") -> str:
        name = self.name(prefix)
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'CREATE ROLE "{name}" {options}')
        finally:
            await admin.close()
        return name


@asynccontextmanager
async def scratch_roles() -> AsyncIterator[ScratchRoles]:
    roles = ScratchRoles()
    try:
        yield roles
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            for name in reversed(roles.names):
                await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        finally:
            await admin.close()


def dsn_as(dsn: str, user: str, password: str) -> str:
    """``dsn`` logging in as ``user`` (loopback trusts only ``postgres``: everyone else gives a password)."""
    parts = urlsplit(dsn)
    return parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port or 5432}").geturl()


async def admin_execute(dsn: str, *statements: str) -> None:
    """Run ``statements`` in ``dsn``'s database as the admin role (DSNs from :func:`scratch_database` are its)."""
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()
