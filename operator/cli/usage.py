"""``promptcache usage``: what tenants spent and saved, from the ledger (docs/design.md#usage-reports).

The report is one query (:mod:`promptcache.proxy.storage.usage`); this prints it as an aligned table, JSON
(the admin server's body) or CSV. Money is printed exact, as the ledger holds it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from typing import TYPE_CHECKING

from promptcache.operator.cli import options

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands
    from promptcache.proxy.storage.usage import Query, Row

OUTPUTS = ("table", "json", "csv")


def register(commands: Commands) -> None:
    p = commands.add_parser("usage", help="spend, list price and savings per tenant, model and period, from the ledger")
    p.add_argument("--by", default="", metavar="DIMS",
                   help="comma-separated group-by: principal, model, day or hour (default: one row of totals)")
    options.add_window(p)
    p.add_argument("--principal", action="append", metavar="P", help="only this principal (repeatable)")
    options.add_models(p)
    p.add_argument("--output", default="table", help=f"one of {', '.join(OUTPUTS)} (default: table)")
    options.add_database(p)
    p.set_defaults(func=cmd_usage)


def query(args: argparse.Namespace) -> Query:
    """The report the arguments ask for; a bad one is one line on standard error, exit 2."""
    from promptcache.proxy.storage.usage import Query, UsageError

    since, until = options.window(args)
    models = options.models(args)
    try:
        return Query(by=tuple(name.strip() for name in args.by.split(",") if name.strip()), since=since,
                     until=until, principals=tuple(args.principal) if args.principal else None,
                     models=tuple(models) if models is not None else None)
    except UsageError as exc:
        options.fail(f"invalid --{exc.field}: {exc.detail}")


def cmd_usage(args: argparse.Namespace) -> int:
    from promptcache.proxy.storage.usage import columns, report

    if args.output not in OUTPUTS:
        options.fail(f"invalid --output {args.output!r}: must be one of {', '.join(OUTPUTS)}")
    wanted = query(args)
    rows = options.on_database(options.database(args), lambda db: report(db, wanted))
    names = columns(wanted)
    options.write_output({"table": table, "json": as_json, "csv": as_csv}[args.output](names, rows))
    return 0


def as_json(names: tuple[str, ...], rows: list[Row]) -> str:
    from promptcache.proxy.storage.usage import plain

    return json.dumps({"columns": list(names), "rows": [plain(row) for row in rows]}, indent=2) + "\n"


def as_csv(names: tuple[str, ...], rows: list[Row]) -> str:
    from promptcache.proxy.storage.usage import plain

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        values = plain(row)
        writer.writerow(["" if values[name] is None else values[name] for name in names])
    return out.getvalue()


def table(names: tuple[str, ...], rows: list[Row]) -> str:
    """Aligned columns: text to the left, numbers to the right; a ratio of nothing is ``-``."""
    from promptcache.proxy.storage.usage import plain

    if not rows:
        return "no billed requests in this window\n"
    cells = [[str(name) for name in names]]
    for row in rows:
        values = plain(row)
        cells.append(["-" if values[name] is None else str(values[name]) for name in names])
    widths = [max(len(line[i]) for line in cells) for i in range(len(names))]
    numeric = [not isinstance(rows[0][name], str) for name in names]
    lines = ["  ".join(cell.rjust(w) if right else cell.ljust(w)
                       for cell, w, right in zip(line, widths, numeric, strict=True)).rstrip()
             for line in cells]
    return "\n".join(lines) + "\n"
