"""docs/design.md#usage-reports: what tenants spent and saved, computed in Postgres from the ledger in one query.

The ledger is the bill, so a report sums its rows and nothing else: spend is what was billed, list price what
the same tokens cost without a cache, savings the difference. Every money figure is an exact NUMERIC sum; the
ratios are rounded in the query (half away from zero), to 2 places for percentages and 4 for the rest. Rows
are grouped by any of principal, model, and day or hour (UTC, by when the request started), in that order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from promptcache.proxy.domain.errors import clipped
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.requestlog import format_timestamp, parse_timestamp

DIMENSIONS: Mapping[str, str] = {
    "principal": "principal_id",
    "model": "virtual_model",
    "day": "date_trunc('day', started_at, 'UTC')",
    "hour": "date_trunc('hour', started_at, 'UTC')",
}
"""A group-by name and its SQL, in the order a report's columns and sort keys take them."""
_PERIODS = ("day", "hour")

TOKENS = ("prompt_tokens", "uncached_tokens", "read_tokens", "creation_5m", "creation_1h", "creation_24h",
          "completion_tokens")
"""Token sums, by tier: what the prompt was billed as (uncached, read, written per tier), then the completion."""
FIGURES = ("requests", "hits", *TOKENS, "spend", "list_cost", "savings", "savings_pct", "read_token_ratio",
           "hit_rate")
"""A report row's figures after its group columns, in column order."""

_SELECT = """SELECT {groups}count(*) AS requests, count(*) FILTER (WHERE read_tokens > 0) AS hits,
  {tokens}, sum(cost) AS spend, sum(list_cost) AS list_cost, sum(list_cost) - sum(cost) AS savings,
  round(100 * (sum(list_cost) - sum(cost)) / NULLIF(sum(list_cost), 0), 2) AS savings_pct,
  round(sum(read_tokens)::numeric / NULLIF(sum(prompt_tokens), 0), 4) AS read_token_ratio,
  round((count(*) FILTER (WHERE read_tokens > 0))::numeric / NULLIF(count(*), 0), 4) AS hit_rate
FROM ledger{where}{group_by}"""


class UsageError(ValueError):
    """A report that cannot be asked for: ``field`` names the part (as ``usage``'s option, without dashes), the
    message says why."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(detail)
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class Query:
    """What to report: the group-by dimensions and the bounds, each already checked."""

    by: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    principals: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        unknown = [name for name in self.by if name not in DIMENSIONS]
        if unknown:
            raise UsageError("by", f"cannot group by {clipped(unknown[0])!r}: choose from {', '.join(DIMENSIONS)}")
        repeated = next((name for name in self.by if self.by.count(name) > 1), None)
        if repeated is not None:
            raise UsageError("by", f"{repeated} is named twice")
        if all(period in self.by for period in _PERIODS):
            raise UsageError("by", "group by day or by hour, not both")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise UsageError("since", f"{format_timestamp(self.since)} is not before until "
                                      f"{format_timestamp(self.until)}")

    @property
    def groups(self) -> tuple[str, ...]:
        """The group-by dimensions in column order (principal, model, then the period)."""
        return tuple(name for name in DIMENSIONS if name in self.by)

    def sql(self) -> tuple[str, list[object]]:
        terms: list[str] = []
        args: list[object] = []
        for column, value in (("started_at >=", self.since), ("started_at <", self.until),
                              ("principal_id = ANY", self.principals), ("virtual_model = ANY", self.models)):
            if value is not None:
                args.append(list(value) if isinstance(value, tuple) else value)
                terms.append(f"{column}(${len(args)})" if column.endswith("ANY") else f"{column} ${len(args)}")
        groups = [DIMENSIONS[name] for name in self.groups]
        positions = ", ".join(str(i) for i in range(1, len(groups) + 1))
        return _SELECT.format(
            groups="".join(f"{sql} AS {name}, " for name, sql in zip(self.groups, groups, strict=True)),
            tokens=", ".join(f"sum({column})::bigint AS {column}" for column in TOKENS),
            where=f" WHERE {' AND '.join(terms)}" if terms else "",
            group_by=f" GROUP BY {positions} ORDER BY {positions}" if groups else "",
        ), args


def parse(by: str = "", since: str | None = None, until: str | None = None, principals: Sequence[str] = (),
          models: str | None = None) -> Query:
    """A query from its text form (the admin server's parameters, named as ``usage``'s options are); a bad part is
    a :class:`UsageError` naming it."""
    bounds: dict[str, datetime | None] = {}
    for name, text in (("since", since), ("until", until)):
        try:
            bounds[name] = None if text is None else parse_timestamp(text)
        except ValueError as exc:
            raise UsageError(name, str(exc)) from None
    named = None if models is None else tuple(m.strip() for m in models.split(",") if m.strip())
    if named == ():
        raise UsageError("models", f"{clipped(models or '')!r} names no model")
    return Query(by=tuple(name.strip() for name in by.split(",") if name.strip()), since=bounds["since"],
                 until=bounds["until"], principals=tuple(principals) or None, models=named)


Value = str | int | Decimal | datetime | None
Row = dict[str, Value]
"""A report row: its group columns, then :data:`FIGURES`."""


async def report(db: Database, query: Query) -> list[Row]:
    """The query's rows, ordered by their group columns; without groups, one row of totals (none: no requests)."""
    sql, args = query.sql()
    records = await db.run(lambda conn: conn.fetch(sql, *args))
    rows = [dict(record.items()) for record in records]
    return [row for row in rows if row["requests"]]


def columns(query: Query) -> tuple[str, ...]:
    return (*query.groups, *FIGURES)


def plain(row: Row) -> dict[str, str | int | None]:
    """A row as JSON values: money and ratios as exact decimal strings (as in the request log), periods as
    RFC 3339 timestamps, counts as integers, a ratio of nothing as null."""
    out: dict[str, str | int | None] = {}
    for key, value in row.items():
        if isinstance(value, Decimal):
            out[key] = format(value, "f")
        elif isinstance(value, datetime):
            out[key] = format_timestamp(value)
        else:
            out[key] = value
    return out
