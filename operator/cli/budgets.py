"""``promptcache budgets``: per-principal monthly spend limits the proxies enforce (docs/design.md#budgets)."""

from __future__ import annotations

import argparse
import json
import sys
from decimal import Decimal
from typing import TYPE_CHECKING

from promptcache.operator.cli import options
from promptcache.operator.cli.keys import principal_argument

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands
    from promptcache.proxy.storage.budgets import Budget, Budgets


def register(commands: Commands) -> None:
    p = commands.add_parser("budgets", help="set, list or clear per-principal monthly spend budgets")
    budgets = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = budgets.add_parser("set", help="set a principal's monthly budget in USD; over it, requests get 429")
    b.add_argument("principal", type=principal_argument)
    b.add_argument("--monthly", required=True, type=_money, metavar="USD")
    options.add_database(b)
    b = budgets.add_parser("list", help="every budget with this month's spend and what remains")
    b.add_argument("--output", choices=("table", "json"), default="table")
    options.add_database(b)
    b = budgets.add_parser("clear", help="remove a principal's budget")
    b.add_argument("principal", type=principal_argument)
    options.add_database(b)
    p.set_defaults(func=cmd_budgets)


def _money(text: str) -> Decimal:
    from promptcache.proxy.storage.budgets import parse_money

    try:
        return parse_money(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_budgets(args: argparse.Namespace) -> int:
    from promptcache.proxy.storage.budgets import Budgets

    return options.on_database(options.database(args), lambda db: _act(args, Budgets(db)))


async def _act(args: argparse.Namespace, budgets: Budgets) -> int:
    if args.action == "set":
        created = await budgets.set(args.principal, args.monthly)
        print(f"{'set' if created else 'changed'} the monthly budget of {args.principal} to ${args.monthly}")
        return 0
    if args.action == "clear":
        if await budgets.clear(args.principal):
            print(f"cleared the budget of {args.principal}")
            return 0
        print(f"{args.principal} has no budget", file=sys.stderr)
        return 1
    listed = await budgets.list()
    options.write_output(_as_json(listed) if args.output == "json" else _table(listed))
    return 0


def _remaining(budget: Budget) -> Decimal:
    return max(budget.monthly - budget.spent, Decimal(0))


def _table(listed: list[Budget]) -> str:
    if not listed:
        return "no budgets\n"
    rows = [("PRINCIPAL", "MONTHLY", "SPENT", "REMAINING", "MONTH")]
    rows += [(b.principal, str(b.monthly), str(b.spent), str(_remaining(b)), f"{b.month:%Y-%m}") for b in listed]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip() + "\n"
                   for row in rows)


def _as_json(listed: list[Budget]) -> str:
    return json.dumps([{"principal": b.principal, "monthly_usd": str(b.monthly), "spent_usd": str(b.spent),
                        "remaining_usd": str(_remaining(b)), "month": f"{b.month:%Y-%m}"} for b in listed],
                      indent=2) + "\n"
