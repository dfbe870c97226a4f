"""``promptcache usage`` and the admin server's ``/v1/usage`` as a user runs them, on a ledger of known rows in a
database of the module's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from promptcache.proxy.storage.schema import migrate

from support.controlplane import free_port
from support.database import scratch_database

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))

# (id, principal, model, started_at, prompt, completion, read, 5m, 1h, 24h, uncached, cost, list_cost)
LEDGER = [
    ("r1", "acme", "claude", "2025-03-01T10:00:00Z", 2000, 100, 0, 1500, 0, 0, 500, "0.0075", "0.0075"),
    ("r2", "acme", "claude", "2025-03-01T10:30:00Z", 2100, 50, 1500, 0, 0, 0, 600, "0.00288", "0.00705"),
    ("r3", "acme", "gpt", "2025-03-01T23:59:59.999999Z", 1000, 10, 0, 0, 0, 0, 1000, "0.00105", "0.00105"),
    ("r4", "globex", "claude", "2025-03-02T00:00:00Z", 3000, 0, 2048, 0, 900, 0, 52, "0.0041384", "0.009"),
    ("r5", "globex", "claude", "2025-03-02T01:15:00Z", 0, 0, 0, 0, 0, 0, 0, "0", "0"),
]


@pytest.fixture(scope="module")
async def ledger_dsn() -> AsyncIterator[str]:
    async with scratch_database() as dsn:
        await migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.executemany(
                "INSERT INTO ledger (request_id, principal_id, virtual_model, tokenizer_version, prompt_tokens,"
                " completion_tokens, read_tokens, creation_5m, creation_1h, creation_24h, uncached_tokens, cost,"
                " list_cost, started_at) VALUES ($1, $2, $3, 'tok@1', $5, $6, $7, $8, $9, $10, $11, $12::numeric,"
                " $13::numeric, $4::text::timestamptz)", LEDGER)
        finally:
            await conn.close()
        yield dsn


def usage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMPTCACHE, "usage", *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_table_by_principal_and_model(ledger_dsn: str) -> None:
    done = usage("--by", "model,principal", "--database", ledger_dsn)

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        "principal  model   requests  hits  prompt_tokens  uncached_tokens  read_tokens  creation_5m  creation_1h"
        "  creation_24h  completion_tokens      spend  list_cost    savings  savings_pct  read_token_ratio  hit_rate\n"
        "acme       claude         2     1           4100             1100         1500         1500            0"
        "             0                150    0.01038    0.01455    0.00417        28.66            0.3659    0.5000\n"
        "acme       gpt            1     0           1000             1000            0            0            0"
        "             0                 10    0.00105    0.00105    0.00000         0.00            0.0000    0.0000\n"
        "globex     claude         2     1           3000               52         2048            0          900"
        "             0                  0  0.0041384      0.009  0.0048616        54.02            0.6827    0.5000\n"
    )


def test_json_by_day_is_exact_and_days_are_utc(ledger_dsn: str) -> None:
    done = usage("--by", "day", "--output", "json", "--database", ledger_dsn)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["columns"][:3] == ["day", "requests", "hits"]
    assert [(r["day"], r["requests"], r["spend"], r["list_cost"], r["savings"]) for r in report["rows"]] == [
        ("2025-03-01T00:00:00Z", 3, "0.01143", "0.01560", "0.00417"),  # 23:59:59.999999 is still the 1st
        ("2025-03-02T00:00:00Z", 2, "0.0041384", "0.009", "0.0048616"),
    ]
    first = report["rows"][0]
    assert Decimal(first["spend"]) == sum(Decimal(row[11]) for row in LEDGER[:3])
    assert (first["savings_pct"], first["read_token_ratio"], first["hit_rate"]) == ("26.73", "0.2941", "0.3333")


def test_totals_with_a_window_and_filters(ledger_dsn: str) -> None:
    """``--since`` is inclusive, ``--until`` exclusive; with no --by, one row of totals."""
    done = usage("--since", "2025-03-01T10:30:00Z", "--until", "2025-03-02T00:00:00Z", "--output", "json",
                 "--database", ledger_dsn)
    rows = json.loads(done.stdout)["rows"]
    assert [(r["requests"], r["spend"]) for r in rows] == [(2, "0.00393")]  # r2 and r3

    done = usage("--principal", "globex", "--models", "claude", "--by", "hour", "--output", "csv",
                 "--database", ledger_dsn)
    assert done.stdout.splitlines() == [
        "hour,requests,hits,prompt_tokens,uncached_tokens,read_tokens,creation_5m,creation_1h,creation_24h,"
        "completion_tokens,spend,list_cost,savings,savings_pct,read_token_ratio,hit_rate",
        "2025-03-02T00:00:00Z,1,1,3000,52,2048,0,900,0,0,0.0041384,0.009,0.0048616,54.02,0.6827,1.0000",
        "2025-03-02T01:00:00Z,1,0,0,0,0,0,0,0,0,0,0,0,,,0.0000",  # nothing to save or read: empty, not 0
    ]


def test_an_empty_window_says_so(ledger_dsn: str) -> None:
    done = usage("--since", "2030-01-01T00:00:00Z", "--database", ledger_dsn)
    assert (done.returncode, done.stdout) == (0, "no billed requests in this window\n")
    done = usage("--since", "2030-01-01T00:00:00Z", "--output", "json", "--database", ledger_dsn)
    assert json.loads(done.stdout)["rows"] == []


@pytest.mark.parametrize(("args", "message"), [
    (["--by", "tenant"], "invalid --by: cannot group by 'tenant': choose from principal, model, day, hour\n"),
    (["--by", "day,hour"], "invalid --by: group by day or by hour, not both\n"),
    (["--by", "model,model"], "invalid --by: model is named twice\n"),
    (["--since", "2025-03-02T00:00:00Z", "--until", "2025-03-01T00:00:00Z"],
     "--since 2025-03-02T00:00:00Z is not before --until 2025-03-01T00:00:00Z"),
    (["--since", "yesterday"],
     "invalid --since: 'yesterday' is not an RFC 3339 timestamp such as 2025-03-01T12:00:00Z"),
    (["--output", "xml"], "invalid --output 'xml': must be one of table, json, csv"),
    (["--models", ","], "--models ',' names no model"),
    (["--by", "x" * 100_000], f"invalid --by: cannot group by '{'x' * 37}...': choose from"),
])
def test_a_bad_request_is_one_line_and_exit_2(ledger_dsn: str, args: list[str], message: str) -> None:
    done = usage(*args, "--database", ledger_dsn)

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1


def test_an_unreachable_database_is_one_line() -> None:
    done = usage("--database", "postgresql://postgres@127.0.0.1:1/postgres")

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("database unavailable: ") and done.stderr.count("\n") == 1


# --- the admin server -----------------------------------------------------------------------------------------

TOKEN = "t0ken-" + "a" * 26


@pytest.fixture(scope="module")
def admin(ledger_dsn: str) -> Iterator[str]:
    """``promptcache admin`` on the module's ledger; yields its base URL."""
    port = free_port()
    env = {**os.environ, "PROMPTCACHE_ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen([PROMPTCACHE, "admin", "--port", str(port), "--database", ledger_dsn], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"admin server on http://127.0.0.1:{port}\n"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


async def get(url: str, token: str | None = TOKEN) -> tuple[int, dict[str, str], Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" else await response.text()
        return response.status, dict(response.headers), body


async def test_the_endpoint_serves_what_the_command_prints(admin: str, ledger_dsn: str) -> None:
    for query, args in [("by=principal,model", ["--by", "principal,model"]),
                        ("by=hour&principal=globex&models=claude",
                         ["--by", "hour", "--principal", "globex", "--models", "claude"]),
                        ("since=2025-03-01T10:30:00Z&until=2025-03-02T00:00:00Z",
                         ["--since", "2025-03-01T10:30:00Z", "--until", "2025-03-02T00:00:00Z"])]:
        status, _, body = await get(f"{admin}/v1/usage?{query}")
        printed = usage(*args, "--output", "json", "--database", ledger_dsn)
        assert (status, body) == (200, json.loads(printed.stdout))
    assert body["rows"][0]["spend"] == "0.00393"


async def test_the_endpoint_wants_the_token(admin: str) -> None:
    for token in (None, "wrong-token-of-some-length", TOKEN + "x", "", "é" * 20):
        status, headers, body = await get(f"{admin}/v1/usage", token)
        assert status == 401, token
        assert headers["WWW-Authenticate"] == 'Bearer realm="promptcache-admin"'
        assert body["error"]["type"] == "authentication_error"
    async with aiohttp.ClientSession() as session, session.get(
            f"{admin}/v1/usage", headers={"Authorization": f"Basic {TOKEN}"}) as response:
        assert response.status == 401
    assert (await get(f"{admin}/healthz", None))[:1] == (200,)


@pytest.mark.parametrize(("query", "message"), [
    ("by=tenant", "invalid by: cannot group by 'tenant': choose from principal, model, day, hour"),
    ("by=day,hour", "invalid by: group by day or by hour, not both"),
    ("since=2025-03-02T00:00:00Z&until=2025-03-01T00:00:00Z",
     "invalid since: 2025-03-02T00:00:00Z is not before until 2025-03-01T00:00:00Z"),
    ("until=tomorrow", "invalid until: 'tomorrow' is not an RFC 3339 timestamp such as 2025-03-01T12:00:00Z"),
    ("models=,", "invalid models: ',' names no model"),
    ("by=day&by=model", "by is given twice"),
    ("group=model", "unknown parameter 'group': use by, models, principal, since, until"),
    ("by=" + "x" * 5000, "invalid by: cannot group by '" + "x" * 37 + "...': choose from principal, model, day, hour"),
    ("since=%ff%fe", "invalid since: "),
])
async def test_a_bad_query_is_400_naming_the_parameter(admin: str, query: str, message: str) -> None:
    status, _, body = await get(f"{admin}/v1/usage?{query}")

    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(message)


@pytest.mark.parametrize(("env", "args"), [({}, []), ({"PROMPTCACHE_ADMIN_TOKEN": "short"}, []),
                                           ({"PROMPTCACHE_ADMIN_TOKEN": "has a space in it, so no"}, []),
                                           ({}, ["--token-file", "/nonexistent/token"])])
def test_the_server_will_not_start_without_a_usable_token(env: dict[str, str], args: list[str]) -> None:
    base = {k: v for k, v in os.environ.items() if k != "PROMPTCACHE_ADMIN_TOKEN"}
    done = subprocess.run([PROMPTCACHE, "admin", *args, "--database", "postgresql://127.0.0.1:1/x"],
                          env={**base, **env}, capture_output=True, text=True, timeout=30, check=False)

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(("no usable admin token in ", "cannot read /nonexistent/token"))
