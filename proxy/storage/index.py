"""The prefix index in Postgres: which cache entries a scope has stored, and their expiries.

Entries are written only by a ledger commit (an entry exists because a request paid for it);
this module reads them, and slides read expiries that a commit left to the write-behind flush.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from promptcache.proxy.domain.entries import IndexEntry, Scope
from promptcache.proxy.storage.postgres import Database

_LOOKUP = """
SELECT prefix_hash, cum_tokens, tier, created_at, expires_at, replica FROM cache_entries
WHERE principal_id = $1 AND virtual_model = $2 AND tokenizer_version = $3 AND prefix_hash = ANY($4::bytea[])
"""
# Write-behind flush: the latest expiry per entry, and never an earlier one than stored; the replica of that read.
_REFRESH_MANY = """
UPDATE cache_entries AS e SET expires_at = r.expires_at, replica = COALESCE(r.replica, e.replica)
FROM (
    SELECT DISTINCT ON (principal_id, virtual_model, tokenizer_version, prefix_hash)
        principal_id, virtual_model, tokenizer_version, prefix_hash, expires_at, replica
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::timestamptz[], $6::text[])
        AS u(principal_id, virtual_model, tokenizer_version, prefix_hash, expires_at, replica)
    ORDER BY principal_id, virtual_model, tokenizer_version, prefix_hash, expires_at DESC
) AS r
WHERE e.principal_id = r.principal_id AND e.virtual_model = r.virtual_model
    AND e.tokenizer_version = r.tokenizer_version AND e.prefix_hash = r.prefix_hash
    AND e.expires_at < r.expires_at
"""


class PrefixIndex:
    """Lookups and expiry refreshes of cache entries, over a shared :class:`Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def lookup(self, scope: Scope, hashes: Sequence[bytes]) -> dict[bytes, IndexEntry]:
        """All stored entries among ``hashes`` in one round trip, expired ones included.

        Liveness is the pure classifier's decision (it knows ``now``), not the database's.
        """
        if not hashes:
            return {}
        wanted = list(hashes)
        rows = await self._db.run(lambda conn: conn.fetch(_LOOKUP, *scope, wanted))
        return {
            row["prefix_hash"]: IndexEntry(
                row["prefix_hash"], row["cum_tokens"], row["tier"], row["created_at"], row["expires_at"],
                row["replica"],
            )
            for row in rows
        }

    async def refresh_many(self, refreshes: Sequence[tuple[Scope, bytes, datetime, str | None]]) -> int:
        """Slide many read entries' expiries in one statement (and note the replica that served each read);
        returns how many rows moved.

        Like a commit's own refresh, an expiry only ever moves later, so a late flush is harmless.
        """
        if not refreshes:
            return 0
        columns = (
            [scope.principal_id for scope, _, _, _ in refreshes],
            [scope.virtual_model for scope, _, _, _ in refreshes],
            [scope.tokenizer_version for scope, _, _, _ in refreshes],
            [prefix_hash for _, prefix_hash, _, _ in refreshes],
            [expires_at for _, _, expires_at, _ in refreshes],
            [replica for _, _, _, replica in refreshes],
        )
        status = await self._db.run(lambda conn: conn.execute(_REFRESH_MANY, *columns))
        return int(status.split()[-1])
