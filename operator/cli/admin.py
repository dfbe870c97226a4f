"""``promptcache admin``: usage reports as an authenticated read-only JSON endpoint (docs/design.md#the-admin-server).

The token comes from ``--token-file`` (a mounted Secret) or ``$PROMPTCACHE_ADMIN_TOKEN``, never from the command
line, where any user of the machine could read it; aiohttp and the server load only when it runs.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from promptcache.operator.cli import options

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands

TOKEN_ENV = "PROMPTCACHE_ADMIN_TOKEN"
MIN_TOKEN = 16
"""Characters a token needs at least: a short one can be guessed over the network."""


def register(commands: Commands) -> None:
    p = commands.add_parser("admin", help="serve usage reports as JSON for dashboards and billing (bearer token)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8090, help="port (default 8090)")
    p.add_argument("--token-file", metavar="FILE", help=f"the bearer token clients must send (default: ${TOKEN_ENV})")
    options.add_database(p)
    p.set_defaults(func=cmd_admin)


def token(args: argparse.Namespace) -> str:
    """The token, stripped of surrounding whitespace (a Secret file often ends in a newline)."""
    text = options.read_input(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV, "")
    value = text.strip()
    if len(value) < MIN_TOKEN or not value.isprintable() or " " in value:
        where = args.token_file or f"${TOKEN_ENV}"
        options.fail(f"no usable admin token in {where}: it needs at least {MIN_TOKEN} printable characters and no "
                     "spaces (e.g. openssl rand -hex 32)")
    return value


def cmd_admin(args: argparse.Namespace) -> int:
    import asyncio

    from aiohttp import web

    from promptcache.operator.admin import app
    from promptcache.proxy.storage.errors import IndexUnavailable
    from promptcache.proxy.storage.postgres import Database

    secret = token(args)
    dsn = options.database(args)

    async def serve() -> None:
        db = await Database.connect(dsn)
        runner = web.AppRunner(app(db, secret), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, args.host, args.port).start()
            print(f"admin server on http://{args.host}:{args.port}", flush=True)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await db.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        options.fail(f"cannot serve on {args.host}:{args.port}: {exc}")
    except IndexUnavailable as exc:
        options.fail(f"database unavailable: {exc}")
    return 0
