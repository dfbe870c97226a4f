"""docs/design.md#api-keys: a key authenticates a principal, and only its SHA-256 is ever stored.

A leaked table therefore leaks no usable key; the short ``key_id`` (the digest's first hex digits) names a key
for listing, revocation and rotation without revealing it. A revocation may be dated in the future: rotating a
key issues a new one and revokes the old at the end of a grace period, so clients can switch without an outage.
A lookup stamps ``last_used_at`` in the same statement, so "last used" costs no extra round trip; proxies cache
keys, so the stamp is as fresh as their key cache.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from promptcache.proxy.storage.postgres import Database

if TYPE_CHECKING:
    from promptcache.proxy.storage.postgres import Conn

_ACTIVE = "(revoked_at IS NULL OR revoked_at > now())"
_INSERT = "INSERT INTO api_keys (key_id, key_hash, principal_id) VALUES ($1, $2, $3)"
_PRINCIPAL = f"UPDATE api_keys SET last_used_at = now() WHERE key_hash = $1 AND {_ACTIVE} RETURNING principal_id"
_REVOKE = f"UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND {_ACTIVE} RETURNING key_id"
_RETIRE = ("UPDATE api_keys SET revoked_at = now() + $2::interval WHERE key_id = $1 AND revoked_at IS NULL "
           "RETURNING principal_id")
_REGISTER = """WITH inserted AS (
    INSERT INTO api_keys (key_id, key_hash, principal_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING
    RETURNING principal_id, revoked_at)
SELECT principal_id, revoked_at, true AS new FROM inserted
UNION ALL
SELECT principal_id, revoked_at, false FROM api_keys WHERE key_hash = $2 AND NOT EXISTS (SELECT FROM inserted)"""
_LIST = f"""SELECT key_id, principal_id, created_at, revoked_at, last_used_at FROM api_keys
WHERE ($1::text IS NULL OR principal_id = $1) AND ($2 OR {_ACTIVE}) ORDER BY principal_id, created_at, key_id"""


@dataclass(frozen=True)
class Registered:
    """What :meth:`ApiKeys.register` found: the key's principal (maybe another than asked), whether it is revoked, and
    whether this call stored it."""

    principal: str
    revoked: bool
    new: bool


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown of a key: never the key, nor its hash."""

    key_id: str
    principal: str
    created: datetime
    revoked: datetime | None
    """When it stops (or stopped) working; a future time is a rotated key's grace period."""
    last_used: datetime | None


class ApiKeys:
    """Create, check, list, revoke and rotate API keys, over a shared :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, principal: str) -> tuple[str, str]:
        """A new key for ``principal`` as ``(key_id, key)``; only the key's SHA-256 is stored."""
        key_id, digest, key = _new_key()
        await self._db.run(lambda conn: conn.execute(_INSERT, key_id, digest, principal))
        return key_id, key

    @staticmethod
    def new() -> tuple[str, str]:
        """A fresh ``(key_id, key)``, not stored yet: for a caller that must put the key somewhere first
        (:meth:`register` stores it then, idempotently)."""
        key_id, _, key = _new_key()
        return key_id, key

    async def register(self, key: str, principal: str) -> Registered | None:
        """Store ``key`` for ``principal`` unless a key with its hash is stored already; either way, what is stored
        for it. None: the key's id is taken by another key (a 48-bit collision, or a forged id)."""
        key_id, digest = key_id_of(key), hashlib.sha256(key.encode()).digest()
        row = await self._db.run(lambda conn: conn.fetchrow(_REGISTER, key_id, digest, principal))
        if row is None:
            return None
        return Registered(row["principal_id"], row["revoked_at"] is not None, row["new"])

    async def owner(self, key: str) -> str | None:
        """The principal ``key`` was issued to, in force or not (nothing is stamped); None for an unknown key."""
        digest = hashlib.sha256(key.encode()).digest()
        principal: str | None = await self._db.run(
            lambda conn: conn.fetchval("SELECT principal_id FROM api_keys WHERE key_hash = $1", digest))
        return principal

    async def principal_for(self, key: str) -> str | None:
        """The principal a key authenticates (stamping its use), or None when it is unknown or revoked."""
        digest = hashlib.sha256(key.encode()).digest()
        principal: str | None = await self._db.run(lambda conn: conn.fetchval(_PRINCIPAL, digest))
        return principal

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key by id now (also one in its grace period); False when no such active key exists."""
        revoked = await self._db.run(lambda conn: conn.fetchval(_REVOKE, key_id))
        return revoked is not None

    async def rotate(self, key_id: str, grace: timedelta) -> tuple[str, str, datetime] | None:
        """A new key for the principal of active key ``key_id`` as ``(key_id, key, old key's end)``, the old one
        revoked once ``grace`` has passed; None when no such active key exists. One transaction: a rotation
        never leaves a principal with neither key."""
        new_id, digest, key = _new_key()

        async def rotating(conn: Conn) -> datetime | None:
            async with conn.transaction():
                principal = await conn.fetchval(_RETIRE, key_id, grace)
                if principal is None:
                    return None
                await conn.execute(_INSERT, new_id, digest, principal)
                ends: datetime = await conn.fetchval("SELECT revoked_at FROM api_keys WHERE key_id = $1", key_id)
                return ends

        ends = await self._db.run(rotating)
        return None if ends is None else (new_id, key, ends)

    async def list(self, principal: str | None = None, *, revoked: bool = False) -> list[KeyInfo]:
        """Keys in force (with ``revoked``: also those revoked), of ``principal`` or of all, by principal and age."""
        rows = await self._db.run(lambda conn: conn.fetch(_LIST, principal, revoked))
        return [KeyInfo(r["key_id"], r["principal_id"], r["created_at"], r["revoked_at"], r["last_used_at"])
                for r in rows]


def key_id_of(key: str) -> str:
    """A key's id: its SHA-256's first 12 hex digits."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _new_key() -> tuple[str, bytes, str]:
    key = "pc-" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).digest()
    return key_id_of(key), digest, key
