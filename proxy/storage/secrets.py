"""Secrets every proxy of one database shares (``proxy_secrets``), made on first use by whichever proxy asks first.

Postgres is where the replicas already agree, so a key lives there rather than in one more Kubernetes Secret per
namespace; the first ``INSERT`` wins and every later caller reads that value.
"""

from __future__ import annotations

import secrets

from promptcache.proxy.storage.postgres import Database

KEY_BYTES = 32
_SHARED = """
WITH made AS (
    INSERT INTO proxy_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING value
)
SELECT value FROM made UNION ALL SELECT value FROM proxy_secrets WHERE name = $1 LIMIT 1
"""


async def shared_key(db: Database, name: str) -> bytes:
    """The key called ``name``, made now if no proxy made it yet; IndexUnavailable when Postgres is."""
    candidate = secrets.token_bytes(KEY_BYTES)
    for _ in range(2):  # a proxy racing ours committed between our snapshot and our insert: the next one sees it
        value = await db.run(lambda conn: conn.fetchval(_SHARED, name, candidate))
        if value is not None:
            return bytes(value)
    raise AssertionError(f"proxy_secrets has no {name!r} after inserting it")
