"""SPEC §7: Postgres, the always-correct store behind the prefix index, tariffs, API keys and the ledger.

Every failure surfaces as :class:`IndexUnavailable`, so the proxy's one rule applies (no index,
no discount). A transient connection error is retried once, which is safe because every write
here is idempotent (the commit is keyed by request id); pool exhaustion is not retried, since
waiting longer is exactly what the acquire timeout forbids. A commit runs after its response is
out, so it may wait longer for a connection (``commit_acquire_timeout``) than a lookup, which
holds up a bill: under a burst, commits queue on the pool instead of failing over to the
proxy's retry queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from promptcache.proxy.domain.entries import IndexEntry, IndexUnavailable, Scope
from promptcache.proxy.domain.pricing import Tariff
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.ledger import CHAIN_HASH_BYTES, RequestRecord

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

_T = TypeVar("_T")
_log = logging.getLogger(__name__)

_RETRY_DELAY = (0.01, 0.05)
_TARIFF_LOCK_CLASS = int.from_bytes(b"tarf", "big")
"""First key of the two-key advisory lock that serialises tariff changes per model."""

_DB_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)
_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)

_LOOKUP = """
SELECT prefix_hash, cum_tokens, tier, created_at, expires_at FROM cache_entries
WHERE principal_id = $1 AND virtual_model = $2 AND tokenizer_version = $3 AND prefix_hash = ANY($4::bytea[])
"""
# One statement, so one round trip and one implicit transaction: the log row always; the ledger row
# when billable; the cache changes only when this statement is the one that billed (a retried
# commit finds its ledger row and changes nothing). The upsert is memory.merge_write in SQL: an
# expired entry starts a new episode ($2 is "now"); a live one keeps its created_at and only moves
# to a later expiry. Sorted so concurrent commits lock rows in one order.
_COMMIT = """
WITH log AS (
    INSERT INTO request_log (
        request_id, ts, principal_id, virtual_model, tokenizer_version, api, status,
        prompt_tokens, completion_tokens, read_tokens, creation_5m, creation_1h, creation_24h,
        input_per_mtok, output_per_mtok, billed_cost, list_cost, latency_ms,
        chain_hashes, chain_tokens, chain_roles, chain_tiers
    ) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING 1
), bill AS (
    INSERT INTO ledger (
        request_id, principal_id, virtual_model, tokenizer_version, tariff_version,
        prompt_tokens, completion_tokens, read_tokens, creation_5m, creation_1h, creation_24h,
        uncached_tokens, cost, list_cost, started_at
    )
    SELECT $1, $3, $4, $5, $23::bigint, $8, $9, $10, $11, $12, $13, $24::integer, $25::numeric, $17, $2
    WHERE $26::boolean
    ON CONFLICT (request_id) DO NOTHING
    RETURNING 1
), writes AS (
    INSERT INTO cache_entries AS e (
        principal_id, virtual_model, tokenizer_version, prefix_hash, cum_tokens, tier, created_at, expires_at
    )
    SELECT $3, $4, $5, w.prefix_hash, w.cum_tokens, w.tier, $2, w.expires_at
    FROM unnest($27::bytea[], $28::integer[], $29::text[], $30::timestamptz[])
        AS w(prefix_hash, cum_tokens, tier, expires_at)
    WHERE EXISTS (SELECT 1 FROM bill)
    ORDER BY w.prefix_hash
    ON CONFLICT (principal_id, virtual_model, tokenizer_version, prefix_hash) DO UPDATE SET
        cum_tokens = EXCLUDED.cum_tokens,
        tier = EXCLUDED.tier,
        expires_at = EXCLUDED.expires_at,
        created_at = CASE WHEN e.expires_at > $2 THEN e.created_at ELSE EXCLUDED.created_at END
    WHERE e.expires_at <= $2 OR EXCLUDED.expires_at > e.expires_at
    RETURNING 1
), refresh AS (
    UPDATE cache_entries SET expires_at = GREATEST(expires_at, $32::timestamptz)
    WHERE $31::bytea IS NOT NULL AND EXISTS (SELECT 1 FROM bill)
        AND principal_id = $3 AND virtual_model = $4 AND tokenizer_version = $5 AND prefix_hash = $31
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM log) AS logged, EXISTS (SELECT 1 FROM bill) AS billed
"""
# Write-behind flush: the latest expiry per entry, and never an earlier one than stored.
_REFRESH_MANY = """
UPDATE cache_entries AS e SET expires_at = r.expires_at
FROM (
    SELECT principal_id, virtual_model, tokenizer_version, prefix_hash, max(expires_at) AS expires_at
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::timestamptz[])
        AS u(principal_id, virtual_model, tokenizer_version, prefix_hash, expires_at)
    GROUP BY 1, 2, 3, 4
) AS r
WHERE e.principal_id = r.principal_id AND e.virtual_model = r.virtual_model
    AND e.tokenizer_version = r.tokenizer_version AND e.prefix_hash = r.prefix_hash
    AND e.expires_at < r.expires_at
"""
_TARIFF_COLUMNS = """
version, model, input_per_mtok, output_per_mtok, write_multiplier_5m, write_multiplier_1h,
write_multiplier_24h, read_multiplier, valid_from, valid_until
"""
_ACTIVE_TARIFF = f"SELECT {_TARIFF_COLUMNS} FROM tariffs WHERE model = $1 AND valid_until IS NULL FOR UPDATE"
_INSERT_TARIFF = f"""
INSERT INTO tariffs (
    model, input_per_mtok, output_per_mtok, write_multiplier_5m, write_multiplier_1h, write_multiplier_24h,
    read_multiplier, valid_from
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING {_TARIFF_COLUMNS}
"""
_CLOSE_TARIFF = "UPDATE tariffs SET valid_until = $2 WHERE model = $1 AND valid_until IS NULL"
_LOCK_TARIFFS = "SELECT pg_advisory_xact_lock($1, hashtext($2))"
_TARIFF_AT = f"""
SELECT {_TARIFF_COLUMNS} FROM tariffs
WHERE model = $1 AND valid_from <= $2 AND (valid_until IS NULL OR $2 < valid_until)
ORDER BY valid_from DESC, version DESC
LIMIT 1
"""
# ctid batches keep each DELETE short; a row refreshed meanwhile has a new ctid and survives.
_SWEEP = """
DELETE FROM cache_entries WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM cache_entries WHERE expires_at < $1 LIMIT $2
))
"""
_PURGE_LOG = """
DELETE FROM request_log WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM request_log WHERE ts < $1 LIMIT $2
))
"""


class _ConnectionLost(IndexUnavailable):
    """A failure that a fresh connection may not have: the one kind :meth:`PostgresIndex._run` retries."""


class PostgresIndex:
    """The prefix index and the commit path over an asyncpg pool; safe to share across tasks."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], *, acquire_timeout: float = 1.0,
                 commit_acquire_timeout: float = 10.0) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout
        self._commit_acquire_timeout = commit_acquire_timeout

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        acquire_timeout: float = 1.0,
        commit_acquire_timeout: float = 10.0,
        command_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        application_name: str = "promptcache",
        init: Callable[[asyncpg.Connection[asyncpg.Record]], Coroutine[Any, Any, None]] | None = None,
    ) -> PostgresIndex:
        """Open the pool (``min_size`` connections up front, so a dead database fails here).

        ``init`` runs on every new connection, e.g. to attach a query logger for tracing.
        """
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                command_timeout=command_timeout,
                timeout=connect_timeout,
                server_settings={"application_name": application_name},
                init=init,
                reset=_keep_session,
            )
        except (*_DB_ERRORS, ValueError) as exc:
            raise IndexUnavailable("connect", _describe(exc)) from exc
        return cls(pool, acquire_timeout=acquire_timeout, commit_acquire_timeout=commit_acquire_timeout)

    async def close(self) -> None:
        await self._pool.close()

    async def lookup(self, scope: Scope, hashes: Sequence[bytes]) -> dict[bytes, IndexEntry]:
        """All stored entries among ``hashes`` in one round trip, expired ones included.

        Liveness is the pure classifier's decision (it knows ``now``), not the database's.
        """
        if not hashes:
            return {}
        wanted = list(hashes)
        rows = await self._run(lambda conn: conn.fetch(_LOOKUP, *scope, wanted))
        return {
            row["prefix_hash"]: IndexEntry(
                row["prefix_hash"], row["cum_tokens"], row["tier"], row["created_at"], row["expires_at"]
            )
            for row in rows
        }

    async def ping(self) -> None:
        """Readiness: one trivial query through the pool, failing like any other call."""
        await self._run(lambda conn: conn.execute("SELECT 1"))

    async def commit(self, record: RequestRecord, *, refresh_read: bool = True) -> bool:
        """Log, bill and apply one finished request in a single transaction; False when already done.

        The ledger row's request id is the idempotency key: when it already exists this is a
        retry, and nothing else is touched, so a request is never billed or written twice.
        A non-billable request only gets its log row. ``refresh_read=False`` leaves the read's
        expiry to a write-behind :meth:`refresh_many` (Redis debounces refreshes of hot prefixes).
        """

        row = await self._run(lambda conn: conn.fetchrow(_COMMIT, *_commit_args(record, refresh_read)),
                              acquire_timeout=self._commit_acquire_timeout)
        assert row is not None
        return bool(row["billed"] if record.billable else row["logged"])

    async def refresh_many(self, refreshes: Sequence[tuple[Scope, bytes, datetime]]) -> int:
        """Slide many read entries' expiries in one statement; returns how many rows moved.

        Like a commit's own refresh, an expiry only ever moves later, so a late flush is harmless.
        """
        if not refreshes:
            return 0
        columns = (
            [scope.principal_id for scope, _, _ in refreshes],
            [scope.virtual_model for scope, _, _ in refreshes],
            [scope.tokenizer_version for scope, _, _ in refreshes],
            [prefix_hash for _, prefix_hash, _ in refreshes],
            [expires_at for _, _, expires_at in refreshes],
        )
        status = await self._run(lambda conn: conn.execute(_REFRESH_MANY, *columns))
        return int(status.split()[-1])

    async def set_tariff(self, tariff: Tariff, at: datetime) -> Tariff:
        """Make ``tariff`` the active version from ``at``; unchanged prices keep the active version.

        History is append-only: a change closes the active row at ``at`` and opens a new one.
        The per-model advisory lock also serialises the very first version, which has no row to lock.
        """

        async def run(conn: _Conn) -> Tariff:
            async with conn.transaction():
                await conn.execute(_LOCK_TARIFFS, _TARIFF_LOCK_CLASS, tariff.model)
                row = await conn.fetchrow(_ACTIVE_TARIFF, tariff.model)
                if row is not None:
                    active = _tariff(row)
                    if active.same_prices(tariff):
                        return active
                    assert active.valid_from is not None
                    if at < active.valid_from:
                        raise ValueError(
                            f"tariff change for {tariff.model} at {at.isoformat()} precedes the active"
                            f" version {active.version} (valid from {active.valid_from.isoformat()})"
                        )
                    await conn.execute(_CLOSE_TARIFF, tariff.model, at)
                new = await conn.fetchrow(
                    _INSERT_TARIFF,
                    tariff.model,
                    tariff.input_per_mtok,
                    tariff.output_per_mtok,
                    *(tariff.write_multipliers[tier] for tier in TIERS),
                    tariff.read_multiplier,
                    at,
                )
                assert new is not None
                return _tariff(new)

        return await self._run(run)

    async def close_tariff(self, model: str, at: datetime) -> None:
        """End the active version (the model is no longer served); history stays."""

        async def run(conn: _Conn) -> None:
            async with conn.transaction():
                await conn.execute(_LOCK_TARIFFS, _TARIFF_LOCK_CLASS, model)
                await conn.execute(_CLOSE_TARIFF, model, at)

        await self._run(run)

    async def tariffs(self, model: str) -> list[Tariff]:
        """Every version of a model's tariff, oldest first."""
        query = f"SELECT {_TARIFF_COLUMNS} FROM tariffs WHERE model = $1 ORDER BY version"
        return [_tariff(row) for row in await self._run(lambda conn: conn.fetch(query, model))]

    async def tariff_at(self, model: str, at: datetime) -> Tariff | None:
        """The version in force at ``at``: a request is billed at the tariff active when it started."""
        row = await self._run(lambda conn: conn.fetchrow(_TARIFF_AT, model, at))
        return None if row is None else _tariff(row)

    async def create_api_key(self, principal: str) -> tuple[str, str]:
        """A new key for ``principal`` as ``(key_id, key)``; only the key's SHA-256 is stored."""
        key = "pc-" + secrets.token_urlsafe(32)
        digest = hashlib.sha256(key.encode()).digest()
        key_id = digest.hex()[:12]
        await self._run(
            lambda conn: conn.execute(
                "INSERT INTO api_keys (key_id, key_hash, principal_id) VALUES ($1, $2, $3)",
                key_id,
                digest,
                principal,
            )
        )
        return key_id, key

    async def principal_for_key(self, key: str) -> str | None:
        """The principal a key authenticates, or None when it is unknown or revoked."""
        digest = hashlib.sha256(key.encode()).digest()
        principal: str | None = await self._run(
            lambda conn: conn.fetchval(
                "SELECT principal_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", digest
            )
        )
        return principal

    async def revoke_api_key(self, key_id: str) -> bool:
        """Revoke a key by id; False when no such active key exists."""
        query = (
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL RETURNING key_id"
        )
        revoked = await self._run(lambda conn: conn.fetchval(query, key_id))
        return revoked is not None

    async def sweep_expired(self, grace: timedelta, batch: int = 1000, now: datetime | None = None) -> int:
        """Delete entries expired for longer than ``grace``, ``batch`` rows per statement; returns the count.

        The grace period keeps an entry a commit in flight may still refresh or re-write.
        """
        cutoff = (now or datetime.now(UTC)) - grace
        return await self._delete_in_batches(_SWEEP, cutoff, batch)

    async def purge_request_log(self, older_than: datetime, batch: int = 1000) -> int:
        """Request log retention: delete rows logged before ``older_than`` in bounded batches."""
        return await self._delete_in_batches(_PURGE_LOG, older_than, batch)

    async def _delete_in_batches(self, query: str, cutoff: datetime, batch: int) -> int:
        """Short statements rather than one long DELETE, so the proxy's commits never queue behind it."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        total = 0
        while True:
            status = await self._run(lambda conn: conn.execute(query, cutoff, batch))
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < batch:
                return total

    async def _run(self, fn: Callable[[_Conn], Awaitable[_T]], *, acquire_timeout: float | None = None) -> _T:
        """Run ``fn`` on a pooled connection, retrying once after a jittered pause if the connection broke."""
        timeout = self._acquire_timeout if acquire_timeout is None else acquire_timeout
        try:
            return await self._attempt(fn, timeout)
        except _ConnectionLost as exc:
            _log.warning("retrying once after a lost Postgres connection: %s", exc)
        await asyncio.sleep(random.uniform(*_RETRY_DELAY))
        return await self._attempt(fn, timeout)

    async def _attempt(self, fn: Callable[[_Conn], Awaitable[_T]], acquire_timeout: float) -> _T:
        try:
            conn = await self._pool.acquire(timeout=acquire_timeout)
        except TimeoutError as exc:
            raise IndexUnavailable("pool_exhausted", f"no connection free within {acquire_timeout}s") from exc
        except _DB_ERRORS as exc:
            kind = _ConnectionLost if _is_connection_error(exc) else IndexUnavailable
            raise kind("connect", _describe(exc)) from exc
        try:
            return await fn(conn)
        except TimeoutError as exc:
            raise IndexUnavailable("timeout", _describe(exc)) from exc
        except _DB_ERRORS as exc:
            if _is_connection_error(exc):
                # The retry must get a fresh connection, not this one (unless it already closed,
                # which detaches it from us and returns it to the pool).
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                raise _ConnectionLost("connection_lost", _describe(exc)) from exc
            if isinstance(exc, asyncpg.QueryCanceledError):
                raise IndexUnavailable("timeout", _describe(exc)) from exc
            if isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError):
                raise IndexUnavailable("refused", _describe(exc)) from exc
            raise IndexUnavailable("query", _describe(exc)) from exc
        finally:
            await self._release(conn)

    async def _release(self, conn: _Conn) -> None:
        """Return a connection; if that fails, asyncpg has already dropped it, and the work is done."""
        try:
            await self._pool.release(conn)
        except _DB_ERRORS as exc:
            _log.warning("dropped a Postgres connection that failed to reset: %s", _describe(exc))


def _is_connection_error(exc: BaseException) -> bool:
    """Errors a fresh connection may not have: the only ones worth a second try.

    asyncpg's internal client errors mean its view of the protocol is broken (e.g. a backend
    killed while idle), which is a property of the connection, not of the query.
    """
    return isinstance(exc, _CONNECTION_ERRORS) or (
        isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)
    )


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Skip asyncpg's reset query on release: we set no session state (no SET, LISTEN, cursors or
    session locks), so it would only add a round trip to every lookup. Open transactions are still
    rolled back by the pool."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _commit_args(record: RequestRecord, refresh_read: bool) -> tuple[object, ...]:
    split, chain = record.split, record.chain
    result = record.classification if record.billable and split.cache_valid else None
    writes = result.writes if result is not None else ()
    read = result.read if result is not None and refresh_read else None
    return (
        record.request_id,
        record.started_at,
        *record.scope,
        record.api,
        record.status,
        split.prompt,
        split.completion,
        split.read,
        *(split.creation.get(tier, 0) for tier in TIERS),
        record.tariff.input_per_mtok,
        record.tariff.output_per_mtok,
        record.cost if record.billable else Decimal(0),  # a failed request is logged, not billed
        record.list_cost,
        record.latency_ms,
        [b.hash[:CHAIN_HASH_BYTES] for b in chain],
        [b.tokens for b in chain],
        [b.role for b in chain],
        list(record.sent_tiers) if record.sent_tiers is not None else [b.tier for b in chain],
        record.tariff.version or None,  # version 0: prices not (yet) stored as a tariff
        split.uncached,
        record.cost,
        record.billable,
        [w.hash for w in writes],
        [w.tokens for w in writes],
        [w.tier for w in writes],
        [w.expires_at for w in writes],
        read.hash if read is not None else None,
        read.expires_at if read is not None else None,
    )


def _tariff(row: asyncpg.Record) -> Tariff:
    return Tariff(
        model=row["model"],
        input_per_mtok=row["input_per_mtok"],
        output_per_mtok=row["output_per_mtok"],
        write_multipliers=MappingProxyType({tier: row[f"write_multiplier_{tier}"] for tier in TIERS}),
        read_multiplier=row["read_multiplier"],
        version=row["version"],
        valid_from=row["valid_from"],
        valid_until=row["valid_until"],
    )
