"""The ``promptcache`` command: one image, one entry point, a subcommand per role.

Each role is a module here that declares its options and imports what it runs on (aiohttp, asyncpg,
redis, kopf, the replay engine) only when its command runs: building the parser loads none of them,
so ``promptcache hash`` starts fast and the proxy never loads the operator.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from promptcache.operator.cli import (
    admin,
    budgets,
    demo,
    hash,
    keys,
    log,
    migrate,
    operator,
    proxy,
    replay,
    replay_job,
    simulate,
    usage,
)

ROLES = (hash, migrate, proxy, operator, demo, simulate, keys, budgets, usage, admin, log, replay, replay_job)
"""In the order ``promptcache --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptcache", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for role in ROLES:
        role.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
