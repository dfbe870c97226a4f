"""API keys in Postgres: a key authenticates a principal, and only its SHA-256 is ever stored.

A leaked table therefore leaks no usable key; the short ``key_id`` (the digest's first hex
digits) names a key for revocation without revealing it.
"""

from __future__ import annotations

import hashlib
import secrets

from promptcache.proxy.storage.postgres import Database

_INSERT = "INSERT INTO api_keys (key_id, key_hash, principal_id) VALUES ($1, $2, $3)"
_PRINCIPAL = "SELECT principal_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"
_REVOKE = "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL RETURNING key_id"


class ApiKeys:
    """Create, check and revoke API keys, over a shared :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, principal: str) -> tuple[str, str]:
        """A new key for ``principal`` as ``(key_id, key)``; only the key's SHA-256 is stored."""
        key = "pc-" + secrets.token_urlsafe(32)
        digest = hashlib.sha256(key.encode()).digest()
        key_id = digest.hex()[:12]
        await self._db.run(lambda conn: conn.execute(_INSERT, key_id, digest, principal))
        return key_id, key

    async def principal_for(self, key: str) -> str | None:
        """The principal a key authenticates, or None when it is unknown or revoked."""
        digest = hashlib.sha256(key.encode()).digest()
        principal: str | None = await self._db.run(lambda conn: conn.fetchval(_PRINCIPAL, digest))
        return principal

    async def revoke(self, key_id: str) -> bool:
        """Revoke a key by id; False when no such active key exists."""
        revoked = await self._db.run(lambda conn: conn.fetchval(_REVOKE, key_id))
        return revoked is not None
