"""``promptcache log``: the request log out of Postgres and into it, as JSON Lines (docs/design.md#request-log)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Coroutine, Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar

from promptcache.operator.cli import options

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands
    from promptcache.proxy.storage.requestlog import LoggedRequest

_T = TypeVar("_T")


def register(commands: Commands) -> None:
    p = commands.add_parser("log", help="export or import the request log as JSON Lines (docs/design.md#request-log)")
    log = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = log.add_parser("export", help="write logged requests in (ts, id) order, one JSON object per line")
    options.add_database(e)
    options.add_window(e)
    options.add_models(e)
    e.add_argument("--output", default="-", help="file to write, or - for standard output (the default)")
    e.set_defaults(func=cmd_log_export)
    i = log.add_parser("import", help="log a JSON Lines file's requests; ids already logged are skipped")
    options.add_database(i)
    i.add_argument("file", help="JSON Lines file, or - for standard input")
    i.set_defaults(func=cmd_log_import)


class _Abort(Exception):
    """A failure met inside the event loop that is not the database's; reported as it is."""


def _database_call(call: Coroutine[Any, Any, _T]) -> _T:
    """Run ``call``; a failure is one line on stderr, not a traceback."""
    try:
        return asyncio.run(call)
    except _Abort as exc:
        options.fail(str(exc))
    except options.database_errors() as exc:
        options.fail(options.database_error(exc))


def cmd_log_export(args: argparse.Namespace) -> int:
    import asyncpg

    from promptcache.proxy.storage.requestlog import export_rows, to_json_line

    since, until = options.window(args)
    models = options.models(args)
    dsn = options.database(args)

    async def export(out: IO[bytes]) -> int:
        conn = await asyncpg.connect(dsn)
        try:
            count = 0
            async for request in export_rows(conn, since, until, models):
                try:
                    out.write(to_json_line(request).encode() + b"\n")
                except OSError as exc:
                    raise _Abort(f"cannot write {args.output}: {exc}") from exc
                count += 1
            return count
        finally:
            await conn.close()

    with contextlib.ExitStack() as files:
        out = sys.stdout.buffer if args.output == "-" else files.enter_context(options.open_file(args.output, "wb"))
        count = _database_call(export(out))
    print(f"exported {count} requests", file=sys.stderr)
    return 0


def cmd_log_import(args: argparse.Namespace) -> int:
    import asyncpg

    from promptcache.proxy.storage.requestlog import LogFormatError, import_rows, read_jsonl

    dsn = options.database(args)
    read = 0

    def requests(source: IO[bytes]) -> Iterator[LoggedRequest]:
        nonlocal read
        try:
            for request in read_jsonl(source):
                read += 1
                yield request
        except LogFormatError as exc:
            raise _Abort(f"{args.file}: {exc}") from exc
        except OSError as exc:
            raise _Abort(f"cannot read {args.file}: {exc}") from exc

    async def run(source: IO[bytes]) -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return await import_rows(conn, requests(source))
        finally:
            await conn.close()

    with contextlib.ExitStack() as files:
        source = sys.stdin.buffer if args.file == "-" else files.enter_context(options.open_file(args.file, "rb"))
        inserted = _database_call(run(source))
    print(f"imported {inserted} of {read} requests ({read - inserted} already logged)")
    return 0
