"""Client request ids (docs/design.md#client-request-ids): an ``x-request-id`` a client sent keys its ledger row, so
each is reserved once, before its request is forwarded."""

from __future__ import annotations

import re

from promptcache.proxy.storage.postgres import Database

CLIENT_ID = re.compile(r"(?!req_)[A-Za-z0-9][A-Za-z0-9._:-]{7,127}")
"""8 to 128 characters of letters, digits and ``._:-``, not starting with ``req_``: the proxy's own ids start with
it, so a client cannot send one the ledger already holds."""
_RESERVE = ("INSERT INTO client_request_ids (request_id, principal_id) VALUES ($1, $2) "
            "ON CONFLICT (request_id) DO NOTHING RETURNING true")


def valid_client_id(value: str) -> bool:
    return CLIENT_ID.fullmatch(value) is not None


class RequestIds:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def reserve(self, request_id: str, principal: str) -> bool:
        """Whether ``request_id`` was free (it is now taken); raises IndexUnavailable when Postgres cannot say."""
        taken = await self._db.run(lambda conn: conn.fetchval(_RESERVE, request_id, principal))
        return taken is True
