"""``promptcache proxy``: serve the OpenAI and Anthropic endpoints with cache-aware billing.

The options are the proxy's own (``python -m promptcache.proxy`` takes the same); the server, and
aiohttp, asyncpg and redis with it, load only when it runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from promptcache.proxy.http.arguments import add_arguments

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands


def register(commands: Commands) -> None:
    p = commands.add_parser("proxy", help="serve the OpenAI and Anthropic endpoints with cache-aware billing")
    add_arguments(p)
    p.set_defaults(func=cmd_proxy)


def cmd_proxy(args: argparse.Namespace) -> int:
    from promptcache.proxy.http import server

    return server.run(args)
