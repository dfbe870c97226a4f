"""``promptcache migrate``: apply the Postgres schema migrations, under an advisory lock so replicas may race."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from promptcache.operator.cli import options

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands


def register(commands: Commands) -> None:
    p = commands.add_parser("migrate", help="apply the Postgres schema migrations (under an advisory lock)")
    options.add_database(p)
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from promptcache.proxy.storage.schema import MigrationError, migrate

    try:
        applied = asyncio.run(migrate(options.database(args)))
    except MigrationError as exc:
        options.fail(f"migration failed: {exc}")
    print(f"applied migrations {applied}" if applied else "schema is up to date")
    return 0
