"""``promptcache keys``: create, list, revoke and rotate API keys (docs/design.md#api-keys).

A key is printed once, when it is made, and only its hash is stored; listing shows ids, never keys.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from promptcache.operator.cli import options

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands
    from promptcache.proxy.storage.keys import ApiKeys, KeyInfo

_GRACE = re.compile(r"([0-9]{1,6})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def register(commands: Commands) -> None:
    p = commands.add_parser("keys", help="create or revoke API keys (only their hashes are stored)")
    keys = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = keys.add_parser("create", help="create a key for a principal and print it once")
    k.add_argument("--principal", required=True, type=principal_argument)
    options.add_database(k)
    k = keys.add_parser("list", help="key ids, principals, when created, revoked and last used (never the keys)")
    k.add_argument("--principal", type=principal_argument, help="only this principal's keys")
    k.add_argument("--all", action="store_true", help="revoked keys too")
    k.add_argument("--output", choices=("table", "json"), default="table")
    options.add_database(k)
    k = keys.add_parser("revoke", help="revoke a key by its id, now (also one in its grace period)")
    k.add_argument("key_id")
    options.add_database(k)
    k = keys.add_parser("rotate", help="a new key for the same principal; the old one is revoked after --grace")
    k.add_argument("key_id")
    k.add_argument("--grace", type=_grace, default=timedelta(hours=24),
                   help="how long the old key keeps working, e.g. 30m, 24h, 7d, 0s (default 24h)")
    options.add_database(k)
    p.set_defaults(func=cmd_keys)


def _grace(text: str) -> timedelta:
    match = _GRACE.fullmatch(text)
    if match is None:
        from promptcache.proxy.domain.errors import clipped

        raise argparse.ArgumentTypeError(f"must be a whole number of s, m, h or d such as 24h, got {clipped(text)!r}")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def principal_argument(name: str) -> str:
    """A principal named on the command line, by the rule the proxy writes principals to the ledger with."""
    from promptcache.proxy.domain.entries import PRINCIPAL_RULE, valid_principal

    if not valid_principal(name):
        raise argparse.ArgumentTypeError(f"{PRINCIPAL_RULE}, got {name!r}")
    return name


def cmd_keys(args: argparse.Namespace) -> int:
    from promptcache.proxy.storage.keys import ApiKeys

    return options.on_database(options.database(args), lambda db: _act(args, ApiKeys(db)))


async def _act(args: argparse.Namespace, keys: ApiKeys) -> int:
    if args.action == "create":
        key_id, key = await keys.create(args.principal)
        print(f"key id:    {key_id}\nprincipal: {args.principal}\nkey:       {key}")
        print("This key is shown once and only its hash is stored; keep it now.", file=sys.stderr)
        return 0
    if args.action == "list":
        listed = await keys.list(args.principal, revoked=args.all)
        options.write_output(_as_json(listed) if args.output == "json" else _table(listed))
        return 0
    if args.action == "rotate":
        rotated = await keys.rotate(args.key_id, args.grace)
        if rotated is None:
            print(f"no active key with id {args.key_id}", file=sys.stderr)
            return 1
        key_id, key, ends = rotated
        print(f"key id:    {key_id}\nkey:       {key}\nold key {args.key_id} works until {_when(ends)}")
        print("This key is shown once and only its hash is stored; keep it now.", file=sys.stderr)
        return 0
    if await keys.revoke(args.key_id):
        print(f"revoked {args.key_id}")
        return 0
    print(f"no active key with id {args.key_id}", file=sys.stderr)
    return 1


def _stamp(value: datetime | None) -> str | None:
    from promptcache.proxy.storage.requestlog import format_timestamp

    return None if value is None else format_timestamp(value)


def _when(value: datetime | None) -> str:
    """A time to the second, for a person; ``-`` for none."""
    return _stamp(None if value is None else value.replace(microsecond=0)) or "-"


def _table(listed: list[KeyInfo]) -> str:
    if not listed:
        return "no keys\n"
    rows = [("KEY ID", "PRINCIPAL", "CREATED", "REVOKED", "LAST USED")]
    rows += [(k.key_id, k.principal, _when(k.created), _when(k.revoked), _when(k.last_used)) for k in listed]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
                   for row in rows)


def _as_json(listed: list[KeyInfo]) -> str:
    return json.dumps([{"key_id": k.key_id, "principal": k.principal, "created": _stamp(k.created),
                        "revoked": _stamp(k.revoked), "last_used": _stamp(k.last_used)} for k in listed],
                      indent=2) + "\n"
