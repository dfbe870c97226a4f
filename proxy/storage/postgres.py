"""docs/design.md#storage: Postgres, the always-correct store: one connection pool and the one failure rule.

The tables have modules of their own (``index``, ``ledger``, ``tariffs``, ``keys``,
``retention``), each over a shared :class:`Database`, so that every statement fails the same way.
Every failure surfaces as :class:`IndexUnavailable`, so the proxy's one rule applies (no index,
no discount). A transient connection error or a lost deadlock is retried once, which is safe
because every write is idempotent (the commit is keyed by request id); pool exhaustion is not
retried, since waiting longer is exactly what the acquire timeout forbids. A commit runs after
its response is out, so it may wait longer for a connection (``commit_acquire_timeout``) than a
lookup, which holds up a bill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from promptcache.proxy.storage.errors import IndexUnavailable

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]
    """What :meth:`Database.run` hands its function: a pooled connection, for one call only."""

_T = TypeVar("_T")
_log = logging.getLogger(__name__)

_RETRY_DELAY = (0.01, 0.05)

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


class _Retryable(IndexUnavailable):
    """A failure a second try may not have (a broken connection, a deadlock or serialization failure between
    concurrent transactions): the one kind :meth:`Database.run` retries."""


class Database:
    """An asyncpg pool and the failure rule every statement runs under; safe to share across tasks."""

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
    ) -> Database:
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

    async def ping(self) -> None:
        """Readiness: one trivial query through the pool, failing like any other call."""
        await self.run(lambda conn: conn.execute("SELECT 1"))

    async def run(self, fn: Callable[[Conn], Awaitable[_T]], *, commit: bool = False) -> _T:
        """Run ``fn`` on a pooled connection, retrying once after a jittered pause if the connection broke or the
        transaction lost a deadlock (group commits from several processes can lock entries in different orders).

        ``commit`` marks work done after its response is out, which may wait up to
        ``commit_acquire_timeout`` for a connection instead of ``acquire_timeout``.
        """
        timeout = self._commit_acquire_timeout if commit else self._acquire_timeout
        try:
            return await self._attempt(fn, timeout)
        except _Retryable as exc:
            _log.warning("retrying once after a lost Postgres connection or a conflict: %s", exc)
        await asyncio.sleep(random.uniform(*_RETRY_DELAY))
        return await self._attempt(fn, timeout)

    async def _attempt(self, fn: Callable[[Conn], Awaitable[_T]], acquire_timeout: float) -> _T:
        try:
            conn = await self._pool.acquire(timeout=acquire_timeout)
        except TimeoutError as exc:
            raise IndexUnavailable("pool_exhausted", f"no connection free within {acquire_timeout}s") from exc
        except _DB_ERRORS as exc:
            kind = _Retryable if _is_connection_error(exc) else IndexUnavailable
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
                raise _Retryable("connection_lost", _describe(exc)) from exc
            if isinstance(exc, asyncpg.TransactionRollbackError):  # deadlock_detected, serialization_failure
                raise _Retryable("conflict", _describe(exc)) from exc
            if isinstance(exc, asyncpg.QueryCanceledError):
                raise IndexUnavailable("timeout", _describe(exc)) from exc
            if isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError):
                raise IndexUnavailable("refused", _describe(exc)) from exc
            raise IndexUnavailable("query", _describe(exc)) from exc
        finally:
            await self._release(conn)

    async def _release(self, conn: Conn) -> None:
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
