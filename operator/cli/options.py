"""What several subcommands share, declared once: ``--database`` and its environment default, input
files or ``-``, the ``--since``/``--until`` window, the ``--models`` filter, quiet standard output,
and the one line on standard error with exit 2 that every bad invocation ends in.

Light to import: ``build_parser`` loads this for every subcommand, so what is heavy (asyncpg, the
request log) is imported by the helper that needs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import IO, TYPE_CHECKING, NoReturn, TypeAlias, TypeVar

if TYPE_CHECKING:
    from promptcache.proxy.storage.postgres import Database

    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
    Options: TypeAlias = argparse.ArgumentParser | argparse._ArgumentGroup

_T = TypeVar("_T")
EXIT_USAGE = 2
DATABASE_ENV = "PROMPTCACHE_DATABASE_URL"


def fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def add_database(options: Options, help: str = "Postgres DSN") -> None:
    options.add_argument("--database", metavar="URL", help=f"{help} (default: ${DATABASE_ENV})")


def database(args: argparse.Namespace) -> str:
    """``--database``, else the environment's; the option's default is not the environment's value so that a
    command can tell a DSN given from one inherited."""
    dsn: str | None = args.database or os.environ.get(DATABASE_ENV)
    if not dsn:
        fail(f"no database: pass --database or set {DATABASE_ENV}")
    return dsn


def on_database(dsn: str, act: Callable[[Database], Awaitable[_T]]) -> _T:
    """``act`` on a pool of ``dsn``, closed afterwards; Postgres unavailable is one line and exit 2."""
    import asyncio

    from promptcache.proxy.storage.errors import IndexUnavailable
    from promptcache.proxy.storage.postgres import Database

    async def run() -> _T:
        db = await Database.connect(dsn)
        try:
            return await act(db)
        finally:
            await db.close()

    try:
        return asyncio.run(run())
    except IndexUnavailable as exc:
        fail(f"database unavailable: {exc}")


def database_errors() -> tuple[type[Exception], ...]:
    """What a database that is unreachable, refuses us or rejects a statement raises."""
    import asyncpg

    return (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def database_error(exc: Exception) -> str:
    """One of :func:`database_errors` as the line a user reads."""
    return f"database error: {(str(exc) or type(exc).__name__).splitlines()[0]}"


def read_input(source: str) -> str:
    """A text file's contents, or standard input's for ``-``."""
    try:
        if source == "-":
            return sys.stdin.read()
        with open(source, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {source}: {exc}")


def open_file(path: str, mode: str) -> IO[bytes]:
    """A binary file opened for ``mode``; the caller maps ``-`` to a standard stream."""
    try:
        return open(path, mode)
    except OSError as exc:
        fail(f"cannot {'read' if 'r' in mode else 'write'} {path}: {exc}")


def write_output(text: str) -> None:
    """Write ``text`` to standard output; a reader that stopped early (``| head``) ends the output quietly."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # The interpreter flushes standard output again on exit: point it at /dev/null so that flush is quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def add_window(options: Options) -> None:
    options.add_argument("--since", help="RFC 3339 timestamp: requests at or after it")
    options.add_argument("--until", help="RFC 3339 timestamp: requests before it")


def window(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    """``--since`` and ``--until``, parsed, the first before the second."""
    since, until = _timestamp(args, "since"), _timestamp(args, "until")
    if since is not None and until is not None and since >= until:
        fail(f"--since {args.since} is not before --until {args.until}")
    return since, until


def _timestamp(args: argparse.Namespace, name: str) -> datetime | None:
    from promptcache.proxy.storage.requestlog import parse_timestamp

    text: str | None = getattr(args, name)
    try:
        return None if text is None else parse_timestamp(text)
    except ValueError as exc:
        fail(f"invalid --{name}: {exc}")


def add_models(options: Options) -> None:
    options.add_argument("--models", help="comma-separated virtual models (default: all)")


def models(args: argparse.Namespace) -> list[str] | None:
    text: str | None = args.models
    if text is None:
        return None
    named = [m.strip() for m in text.split(",") if m.strip()]
    if not named:
        fail(f"--models {text!r} names no model")
    return named
