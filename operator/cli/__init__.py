"""The ``promptcache`` command: one image, one entry point, a subcommand per role.

Subcommands import their role lazily so ``promptcache hash`` never loads kopf and the proxy
never loads the operator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Coroutine, Iterator, Sequence
from datetime import datetime
from typing import IO, Any, NoReturn, TypeVar

import yaml

from promptcache.proxy.domain.blocks import APIS
from promptcache.proxy.domain.errors import BadRequest
from promptcache.proxy.domain.policy import CachePolicy, PolicyError, policy_from_document
from promptcache.proxy.domain.prepare import prepare
from promptcache.proxy.domain.tokens import BlockCounter, TokenizerUnavailable, load_tokenizer, parse_tokenizer_flag

EXIT_USAGE = 2


def _fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _read_input(source: str) -> str:
    try:
        if source == "-":
            return sys.stdin.read()
        with open(source, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {source}: {exc}")


def load_policy_file(path: str | None) -> CachePolicy:
    if path is None:
        return CachePolicy()
    try:
        return policy_from_document(yaml.safe_load(_read_input(path)))
    except yaml.YAMLError as exc:
        _fail(f"invalid policy file {path}: {exc}")
    except PolicyError as exc:
        _fail(f"invalid policy file {path}: {exc}")


def cmd_hash(args: argparse.Namespace) -> int:
    policy = load_policy_file(args.policy)
    counter = None
    if args.tokenizer:
        try:
            counter = BlockCounter(load_tokenizer(parse_tokenizer_flag(args.tokenizer)), args.image_tokens)
        except TokenizerUnavailable as exc:
            _fail(f"tokenizer unavailable: {exc}")
    try:
        body: Any = json.loads(_read_input(args.file))
    except json.JSONDecodeError as exc:
        _fail(f"invalid_request_error: body is not valid JSON: {exc}")
    try:
        prepared = prepare(body, args.api, policy, counter)
    except BadRequest as exc:
        _fail(f"{exc.code}: {exc}")
    blocks = [
        {
            "index": block.position,
            "role": block.role,
            "hash": block.hash.hex(),
            "tokens": prepared.tokens[i] if prepared.tokens is not None else None,
            "breakpoint": prepared.tiers[i],
        }
        for i, block in enumerate(prepared.hashed)
    ]
    json.dump({"blocks": blocks, "forward": prepared.forward}, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from promptcache.proxy.storage.schema import MigrationError, migrate

    try:
        applied = asyncio.run(migrate(_database(args)))
    except MigrationError as exc:
        _fail(f"migration failed: {exc}")
    print(f"applied migrations {applied}" if applied else "schema is up to date")
    return 0


def _database(args: argparse.Namespace) -> str:
    dsn: str | None = args.database or os.environ.get("PROMPTCACHE_DATABASE_URL")
    if not dsn:
        _fail("no database: pass --database or set PROMPTCACHE_DATABASE_URL")
    return dsn


def cmd_keys(args: argparse.Namespace) -> int:
    from promptcache.proxy.domain.entries import IndexUnavailable
    from promptcache.proxy.storage.postgres import PostgresIndex

    dsn = _database(args)

    async def run() -> int:
        index = await PostgresIndex.connect(dsn)
        try:
            if args.action == "create":
                key_id, key = await index.create_api_key(args.principal)
                print(f"key id:    {key_id}\nprincipal: {args.principal}\nkey:       {key}")
                print("This key is shown once and only its hash is stored; keep it now.", file=sys.stderr)
                return 0
            if await index.revoke_api_key(args.key_id):
                print(f"revoked {args.key_id}")
                return 0
            print(f"no active key with id {args.key_id}", file=sys.stderr)
            return 1
        finally:
            await index.close()

    try:
        return asyncio.run(run())
    except IndexUnavailable as exc:
        _fail(f"database unavailable: {exc}")


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    import promptcache.operator.main  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose)
    kopf.run(clusterwide=not args.namespace, namespaces=args.namespace or (), standalone=True,
             liveness_endpoint=args.liveness)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from promptcache.operator.cli.demo import run_demo

    return asyncio.run(run_demo())


_T = TypeVar("_T")


class _Abort(Exception):
    """A failure met inside the event loop that is not the database's; reported as it is."""


def _database_call(call: Coroutine[Any, Any, _T]) -> _T:
    """Run ``call``; a database failure is one line on stderr, not a traceback."""
    import asyncpg

    try:
        return asyncio.run(call)
    except _Abort as exc:
        _fail(str(exc))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        _fail(f"database error: {(str(exc) or type(exc).__name__).splitlines()[0]}")


def _open_file(path: str, mode: str) -> IO[bytes]:
    try:
        return open(path, mode)
    except OSError as exc:
        _fail(f"cannot {'read' if 'r' in mode else 'write'} {path}: {exc}")


def _timestamp_option(args: argparse.Namespace, name: str) -> datetime | None:
    from promptcache.proxy.storage.requestlog import parse_timestamp

    text: str | None = getattr(args, name)
    try:
        return None if text is None else parse_timestamp(text)
    except ValueError as exc:
        _fail(f"invalid --{name}: {exc}")


def cmd_log_export(args: argparse.Namespace) -> int:
    import asyncpg

    from promptcache.proxy.storage.requestlog import export_rows, to_json_line

    since, until = _timestamp_option(args, "since"), _timestamp_option(args, "until")
    if since is not None and until is not None and since >= until:
        _fail(f"--since {args.since} is not before --until {args.until}")
    models = None if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    if models == []:
        _fail(f"--models {args.models!r} names no model")
    dsn = _database(args)

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
        out = sys.stdout.buffer if args.output == "-" else files.enter_context(_open_file(args.output, "wb"))
        count = _database_call(export(out))
    print(f"exported {count} requests", file=sys.stderr)
    return 0


def cmd_log_import(args: argparse.Namespace) -> int:
    import asyncpg

    from promptcache.proxy.storage.requestlog import LogFormatError, LoggedRequest, import_rows, read_jsonl

    dsn = _database(args)
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
        source = sys.stdin.buffer if args.file == "-" else files.enter_context(_open_file(args.file, "rb"))
        inserted = _database_call(run(source))
    print(f"imported {inserted} of {read} requests ({read - inserted} already logged)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcache", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("hash", help="print a request's blocks, prefix hashes, breakpoints and forwarded body")
    p.add_argument("--api", choices=APIS, required=True)
    p.add_argument("--tokenizer", help="tiktoken:ENCODING or hf:PATH (without it, tokens are null)")
    p.add_argument("--policy", help="CachePolicy YAML (resource, config with `cache:`, or bare keys)")
    p.add_argument("--image-tokens", type=int, default=0, help="tokens counted per image block")
    p.add_argument("file", help="request body JSON, or - for standard input")
    p.set_defaults(func=cmd_hash)

    p = sub.add_parser("migrate", help="apply the Postgres schema migrations (under an advisory lock)")
    p.add_argument("--database", help="Postgres DSN (default: $PROMPTCACHE_DATABASE_URL)")
    p.set_defaults(func=cmd_migrate)

    from promptcache.proxy.http import server

    p = sub.add_parser("proxy", help="serve the OpenAI and Anthropic endpoints with cache-aware billing")
    server.add_arguments(p)
    p.set_defaults(func=server.run)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf) for DeployedModel, CachePolicy, PlanReplay")
    p.add_argument("--namespace", action="append", metavar="NS",
                   help="watch only this namespace (repeatable; default: all namespaces)")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint URL")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("demo", help="run the proxy against a simulated upstream and print what it billed")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("keys", help="create or revoke API keys (only their hashes are stored)")
    keys = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = keys.add_parser("create", help="create a key for a principal and print it once")
    k.add_argument("--principal", required=True)
    k.add_argument("--database", help="Postgres DSN (default: $PROMPTCACHE_DATABASE_URL)")
    k = keys.add_parser("revoke", help="revoke a key by its id")
    k.add_argument("key_id")
    k.add_argument("--database", help="Postgres DSN (default: $PROMPTCACHE_DATABASE_URL)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("log", help="export or import the request log as JSON Lines (SPEC §9)")
    log = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = log.add_parser("export", help="write logged requests in (ts, id) order, one JSON object per line")
    e.add_argument("--database", help="Postgres DSN (default: $PROMPTCACHE_DATABASE_URL)")
    e.add_argument("--since", help="RFC 3339 timestamp: requests at or after it")
    e.add_argument("--until", help="RFC 3339 timestamp: requests before it")
    e.add_argument("--models", help="comma-separated virtual models (default: all)")
    e.add_argument("--output", default="-", help="file to write, or - for standard output (the default)")
    e.set_defaults(func=cmd_log_export)
    i = log.add_parser("import", help="log a JSON Lines file's requests; ids already logged are skipped")
    i.add_argument("--database", help="Postgres DSN (default: $PROMPTCACHE_DATABASE_URL)")
    i.add_argument("file", help="JSON Lines file, or - for standard input")
    i.set_defaults(func=cmd_log_import)

    from promptcache.operator.cli import replay as replaycli

    p = sub.add_parser("replay", help="project what logged requests would cost under a proposed policy (SPEC §9)")
    replaycli.add_arguments(p)
    p.set_defaults(func=replaycli.cmd_replay)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
