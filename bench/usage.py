"""Usage-report benchmark (issue 16, item 1): ``promptcache usage`` on a ledger of 10M rows, beside a floor.

A scratch database gets ``--rows`` ledger rows (COPY, generated in Postgres by ``generate_series``) from 2,000
principals and 5 models over 30 days, then ``ANALYZE``. Each report is timed as the query ``usage`` runs
(:meth:`Query.sql`), best of three, beside a floor measured in the same run on the same rows: ``count(*)`` over
the same window, the least any query that reads those rows pays. Reports: a week by principal, a day by hour and
model, one principal's month by day, and the whole ledger by model. The figures are printed, not asserted. Run
with ``.venv/bin/python -P bench/usage.py [--rows N]``; about 2 minutes for 10M rows, most of it the load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from promptcache.proxy.storage.schema import migrate
from promptcache.proxy.storage.usage import Query

from support.database import scratch_database

T0 = datetime(2025, 3, 1, tzinfo=UTC)
DAYS = 30

_LOAD = """
INSERT INTO ledger (request_id, principal_id, virtual_model, tokenizer_version, prompt_tokens, completion_tokens,
                    read_tokens, creation_5m, creation_1h, creation_24h, uncached_tokens, cost, list_cost, started_at)
SELECT 'req-' || n, 'principal-' || (n % 2000), 'model-' || (n % 5), 'tok@1', 4000, 300,
       CASE WHEN n % 10 < 7 THEN 3000 ELSE 0 END, CASE WHEN n % 10 < 7 THEN 500 ELSE 3500 END, 0, 0, 500,
       (CASE WHEN n % 10 < 7 THEN 0.0102 ELSE 0.018625 END)::numeric, 0.0165::numeric,
       $2::timestamptz + (n::float8 / $1 * $3) * interval '1 day'
FROM generate_series(1, $1::bigint) AS n
"""


async def best(conn: asyncpg.Connection[asyncpg.Record], sql: str, args: list[object]) -> tuple[float, int]:
    seconds, rows = float("inf"), 0
    for _ in range(3):
        start = time.perf_counter()
        result = await conn.fetch(sql, *args)
        seconds = min(seconds, time.perf_counter() - start)
        rows = len(result)
    return seconds, rows


async def main(rows: int) -> None:
    print(f"Usage reports on {rows:,} ledger rows; load average {os.getloadavg()[0]:.2f} before.")
    async with scratch_database("promptcache_bench") as dsn:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            start = time.perf_counter()
            await conn.execute(_LOAD, rows, T0, DAYS)
            await conn.execute("ANALYZE ledger")
            size = await conn.fetchval("SELECT pg_size_pretty(pg_total_relation_size('ledger'))")
            print(f"loaded in {time.perf_counter() - start:.0f} s ({size} with indexes)")
            week = (T0 + timedelta(days=10), T0 + timedelta(days=17))
            day = (T0 + timedelta(days=20), T0 + timedelta(days=21))
            reports = [
                ("a week by principal", Query(by=("principal",), since=week[0], until=week[1])),
                ("a day by model and hour", Query(by=("model", "hour"), since=day[0], until=day[1])),
                ("one principal's month by day", Query(by=("day",), principals=("principal-7",))),
                ("the whole ledger by model", Query(by=("model",))),
            ]
            for name, query in reports:
                sql, args = query.sql()
                seconds, count = await best(conn, sql, args)
                floor_sql, floor_args = Query(since=query.since, until=query.until,
                                              principals=query.principals).sql()
                floor_sql = "SELECT count(*) FROM ledger" + floor_sql.split("FROM ledger", 1)[1]
                floor, _ = await best(conn, floor_sql, floor_args)
                print(f"  {name:30s} {1000 * seconds:8.0f} ms, {count:5,} rows; count(*) over the same rows "
                      f"{1000 * floor:6.0f} ms: {seconds / floor:.2f}x the floor")
        finally:
            await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=10_000_000)
    asyncio.run(main(parser.parse_args().rows))
