"""``promptcache migrate``: apply the Postgres schema migrations, under an advisory lock so replicas may race, and
give the proxies' role its grants (docs/design.md#database-roles)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import TYPE_CHECKING

from promptcache.operator.cli import options

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands


def register(commands: Commands) -> None:
    from promptcache.proxy.storage.roles import DEFAULT_PROXY_ROLE, ROLE_ENV

    p = commands.add_parser("migrate", help="apply the Postgres schema migrations (under an advisory lock)")
    options.add_database(p)
    p.add_argument("--proxy-role", metavar="NAME",
                   help=f"the NOLOGIN role proxies log in through, made if missing and granted exactly their DML "
                        f"(default: ${ROLE_ENV}, else {DEFAULT_PROXY_ROLE})")
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from promptcache.proxy.storage.roles import check_role_name, role_from
    from promptcache.proxy.storage.schema import MigrationError, migrate

    try:
        role = role_from(os.environ) if args.proxy_role is None else check_role_name(args.proxy_role)
    except ValueError as exc:
        options.fail(str(exc) if args.proxy_role is None else f"--proxy-role: {exc}")
    dsn = options.database(args)
    try:
        migrated = asyncio.run(migrate(dsn, proxy_role=role))
    except MigrationError as exc:
        options.fail(f"migration failed: {exc}")
    for warning in migrated.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"applied migrations {migrated.applied}" if migrated.applied else "schema is up to date")
    return 0
