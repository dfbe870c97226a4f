"""``promptcache keys``: create or revoke API keys; a key is printed once and only its hash is stored."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from promptcache.operator.cli import options

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands


def register(commands: Commands) -> None:
    p = commands.add_parser("keys", help="create or revoke API keys (only their hashes are stored)")
    keys = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = keys.add_parser("create", help="create a key for a principal and print it once")
    k.add_argument("--principal", required=True, type=_principal)
    options.add_database(k)
    k = keys.add_parser("revoke", help="revoke a key by its id")
    k.add_argument("key_id")
    options.add_database(k)
    p.set_defaults(func=cmd_keys)


def _principal(name: str) -> str:
    from promptcache.proxy.domain.entries import PRINCIPAL_RULE, valid_principal

    if not valid_principal(name):
        raise argparse.ArgumentTypeError(f"{PRINCIPAL_RULE}, got {name!r}")
    return name


def cmd_keys(args: argparse.Namespace) -> int:
    from promptcache.proxy.storage.errors import IndexUnavailable
    from promptcache.proxy.storage.keys import ApiKeys
    from promptcache.proxy.storage.postgres import Database

    dsn = options.database(args)

    async def run() -> int:
        pg = await Database.connect(dsn)
        keys = ApiKeys(pg)
        try:
            if args.action == "create":
                key_id, key = await keys.create(args.principal)
                print(f"key id:    {key_id}\nprincipal: {args.principal}\nkey:       {key}")
                print("This key is shown once and only its hash is stored; keep it now.", file=sys.stderr)
                return 0
            if await keys.revoke(args.key_id):
                print(f"revoked {args.key_id}")
                return 0
            print(f"no active key with id {args.key_id}", file=sys.stderr)
            return 1
        finally:
            await pg.close()

    try:
        return asyncio.run(run())
    except IndexUnavailable as exc:
        options.fail(f"database unavailable: {exc}")
