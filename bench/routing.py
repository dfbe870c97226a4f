"""Routing bench (issue 17): does the replica a request goes to hold its prefix's KV cache?

Three llama.cpp ``llama-server`` replicas (SmolLM2-135M-Instruct, the engine and model the billing tests use, one slot
and one thread each, every prompt saved to its host-memory cache: :data:`ENGINE_ARGS`) sit behind the in-process
proxy, with Postgres (a scratch database per mode, dropped after) and Redis (a key prefix of its own). Several
tenants, each running a few multi-turn conversations that start from one of two shared system prompts, stream chat
completions concurrently through the official OpenAI SDK. The same seeded workload runs once per ``--routing`` mode,
on freshly started replicas, and per mode the bench prints:

- the share of billed read tokens the engines report as cached: per request the smaller of the ledger's
  ``read_tokens`` and the engine's own ``engine_cached_tokens``, summed, over the billed reads (goal for affinity
  >= 0.9; random would be about 1/3 with three replicas if the conversations were all of each read, but every
  replica soon caches the shared system prompts, so it is higher here);
- p50/p90 time to first token as the client sees it (the first streamed content), proxy and queueing included;
- requests per replica and the imbalance, the busiest replica's count over the mean (goal <= 1.25).

Figures only, no timing asserted. Run with ``.venv/bin/python -P bench/routing.py [--tenants N] [--turns N]``
(``$PROMPTCACHE_ENGINE_BIN`` names the llama-server directory; without it ``.ci/engine/build`` finds it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from promptcache.proxy.routing import MODES
from promptcache.proxy.storage.schema import migrate

from support.database import scratch_database
from support.engine import CONTEXT, Engine, llama_server, model_path
from support.proxy import RunningProxy, new_key, redis_prefix, running_proxy, settle

REDIS_URL = os.environ.get("PROMPTCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
REPLICAS = 3
WORDS = ("the", "cache", "prefix", "token", "engine", "request", "billing", "tenant", "ledger", "policy", "model",
         "prompt", "reply", "support", "ticket", "invoice", "refund", "customer", "order", "shipping", "delay",
         "region", "report", "revenue", "release", "deploy", "cluster", "volume", "config", "metric", "latency",
         "queue", "retry", "timeout", "database", "index", "lookup", "expiry", "window", "batch", "stream", "usage")


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def marked(content: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content, "cache_control": {"type": "ephemeral"}}]


@dataclass
class Conversation:
    """One tenant's chat: a shared system prompt and its user turns, each marked as it is sent (the system prompt
    and the latest user message, as clients mark them)."""

    tenant: int
    system: str
    turns: list[str]


@dataclass
class Measured:
    ttft: list[float] = field(default_factory=list)
    failed: int = 0
    done: int = 0
    milestone: int | None = None
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once ``milestone`` requests are answered."""


def workload(seed: int, tenants: int, conversations: int, turns: int) -> list[list[Conversation]]:
    """Per tenant, its conversations in order: the same for every mode."""
    rng = random.Random(seed)
    systems = [f"You are the {name} assistant. " + text(rng, 220) for name in ("support", "sales")]
    return [[Conversation(t, systems[(t + c) % 2], [text(rng, rng.randint(25, 50)) for _ in range(turns)])
             for c in range(conversations)] for t in range(tenants)]


async def converse(client: openai.AsyncOpenAI, chat: Conversation, measured: Measured) -> None:
    messages: list[Any] = [{"role": "system", "content": marked(chat.system)}]
    for turn in chat.turns:
        if len(messages) > 1:
            messages[-2]["content"] = messages[-2]["content"][0]["text"]  # the previous user turn, now unmarked
        messages.append({"role": "user", "content": marked(turn)})
        start = time.perf_counter()
        first: float | None = None
        reply = []
        try:
            stream = await client.chat.completions.create(model="smol", messages=messages, max_tokens=8,
                                                          temperature=0, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    reply.append(chunk.choices[0].delta.content)
        except openai.APIError as exc:
            measured.failed += 1
            print(f"  request failed: {exc!r} {exc.__cause__!r}", flush=True)
        measured.done += 1
        if measured.done == measured.milestone:
            measured.reached.set()
        if first is not None:
            measured.ttft.append(first - start)
        messages.append({"role": "assistant", "content": "".join(reply) or "ok"})


async def tenant(proxy: RunningProxy, dsn: str, name: str, chats: list[Conversation], measured: Measured) -> None:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=await new_key(dsn, name), max_retries=0)
    try:
        for chat in chats:
            await converse(client, chat, measured)
    finally:
        await client.close()


def config(engines: list[Engine], mode: str, imbalance: str) -> dict[str, Any]:
    return {"models": [{
        "alias": "smol",
        "upstream": {"url": engines[0].url + "/v1", "model": "smollm2", "api": "openai",
                     "replicas": [e.url + "/v1" for e in engines]},
        "routing": {"mode": mode, "maxImbalance": imbalance},
        "tokenizer": {"type": "gguf", "path": str(model_path())},
        "pricing": {"inputPerMTok": "3.00", "outputPerMTok": "15.00"},
        "cache": {"minPrefixTokens": 16},
    }]}


ENGINE_ARGS = ("--threads", "1", "--slot-prompt-similarity", "0")
"""One thread each (three replicas share two cores). Similarity 0: with the default 0.10 a one-slot llama-server
takes any prompt sharing a tenth of the slot's (a shared system prompt) into the slot as it is, overwriting the
conversation there without saving it; at 0 it saves each prompt to its host-memory cache and restores the longest
match, a prefix cache as vLLM's is (probed by hand: a third conversation's next turn reused its own 272 tokens at 0,
only the 232 of the system prompt at 0.10)."""


@contextlib.contextmanager
def engines() -> Iterator[list[Engine]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(llama_server(extra=list(ENGINE_ARGS))) for _ in range(REPLICAS)]


@dataclass
class Row:
    mode: str
    requests: int
    failed: int
    billed_read: int
    engine_cached: int
    cached_of_read: int
    ttft: list[float]
    per_replica: list[int]
    seconds: float
    decisions: dict[str, int]
    fallbacks: dict[str, int]

    @property
    def share(self) -> float:
        return self.cached_of_read / self.billed_read if self.billed_read else float("nan")

    @property
    def imbalance(self) -> float:
        mean = statistics.mean(self.per_replica)
        return max(self.per_replica) / mean if mean else float("nan")


async def kill_after(replica: Engine, requests: int, measured: Measured) -> None:
    """Kill ``replica`` (SIGKILL, as a node or OOM kill would) once ``requests`` have been answered."""
    measured.milestone = requests
    await measured.reached.wait()
    replica.process.kill()
    print(f"  killed the replica at {replica.url} after {measured.done} requests", flush=True)


async def run_mode(mode: str, plan: list[list[Conversation]], imbalance: str, kill: int | None) -> Row:
    with engines() as replicas, tempfile.TemporaryDirectory(prefix="promptcache-routingbench-") as tmp:
        async with scratch_database("promptcache_bench") as dsn, redis_prefix(REDIS_URL, "routingbench") as prefix:
            await migrate(dsn)
            async with running_proxy(config(replicas, mode, imbalance), Path(tmp), dsn, REDIS_URL,
                                     redis_prefix=prefix) as proxy:
                measured = Measured()
                start = time.perf_counter()
                killing = [kill_after(replicas[0], kill, measured)] if kill is not None else []
                await asyncio.gather(*(tenant(proxy, dsn, f"tenant-{i}", chats, measured)
                                       for i, chats in enumerate(plan)), *killing)
                seconds = time.perf_counter() - start
                await settle(proxy)
                await proxy.server.proxy.store.commit_pending()
                registry = proxy.server.proxy.metrics.registry
                routed = {(e.url + "/v1", d): int(registry.get_sample_value("promptcache_routes_total", {
                    "model": "smol", "replica": e.url + "/v1", "decision": d}) or 0)
                    for e in replicas for d in DECISIONS}
                per_replica = [sum(n for (url, _), n in routed.items() if url == e.url + "/v1") for e in replicas]
                decisions = {d: sum(n for (_, dd), n in routed.items() if dd == d) for d in DECISIONS}
                fallbacks = {reason: int(registry.get_sample_value("promptcache_routing_fallbacks_total", {
                    "model": "smol", "reason": reason}) or 0) for reason in ("unready", "failing", "overloaded")}
            conn = await asyncpg.connect(dsn)
            try:
                ids = await conn.fetchrow("SELECT count(*) AS rows, count(DISTINCT request_id) AS ids FROM ledger")
                assert ids is not None
                if kill is not None:
                    print(f"  {mode} with a replica killed: {ids['rows']} ledger rows, {ids['ids']} distinct request "
                          f"ids, {measured.failed} requests failed (each answered 2xx has its one row)", flush=True)
                row = await conn.fetchrow(
                    "SELECT count(*) AS n, COALESCE(sum(read_tokens), 0) AS read,"
                    " COALESCE(sum(engine_cached_tokens), 0) AS engine,"
                    " COALESCE(sum(LEAST(read_tokens, COALESCE(engine_cached_tokens, 0))), 0) AS both FROM ledger")
            finally:
                await conn.close()
    assert row is not None
    return Row(mode, row["n"], measured.failed, row["read"], row["engine"], row["both"], measured.ttft, per_replica,
               seconds, {d: n for d, n in decisions.items() if n}, {r: n for r, n in fallbacks.items() if n})


DECISIONS = ("read", "write", "least_loaded", "round_robin", "random", "single")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(rows: list[Row]) -> None:
    header = ("routing", "requests", "failed", "billed read", "engine-cached", "share", "TTFT p50", "TTFT p90",
              "per replica", "imbalance", "wall")
    table = [header] + [(r.mode, str(r.requests), str(r.failed), f"{r.billed_read:,}", f"{r.cached_of_read:,}",
                         f"{r.share:.3f}", f"{pct(r.ttft, 0.5) * 1000:.0f} ms", f"{pct(r.ttft, 0.9) * 1000:.0f} ms",
                         "/".join(map(str, r.per_replica)), f"{r.imbalance:.2f}", f"{r.seconds:.0f} s")
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                              strict=True))))
    print("\nshare: per request min(billed read, engine-cached), summed, over billed read tokens; engine-cached "
          "totals (uncapped): " + ", ".join(f"{r.mode} {r.engine_cached:,}" for r in rows))
    for r in rows:
        print(f"{r.mode}: decisions {r.decisions}, fallbacks {r.fallbacks or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routing", default=",".join(("random", "roundRobin", "affinity")),
                        help=f"comma-separated modes, of {', '.join(MODES)}")
    parser.add_argument("--tenants", type=int, default=6)
    parser.add_argument("--conversations", type=int, default=2, help="per tenant, one after another")
    parser.add_argument("--turns", type=int, default=6, help="per conversation")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--max-imbalance", default="1.25", help="routing.maxImbalance")
    parser.add_argument("--kill-after", type=int, default=None, metavar="N",
                        help="kill the first replica once N requests are answered (failure drill)")
    args = parser.parse_args()
    modes = args.routing.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown routing {unknown}; known: {list(MODES)}")
    plan = workload(args.seed, args.tenants, args.conversations, args.turns)
    print(f"{REPLICAS} llama-server replicas (SmolLM2-135M-Instruct, ctx {CONTEXT}, one slot, "
          f"{' '.join(ENGINE_ARGS)}); "
          f"{args.tenants} tenants x {args.conversations} conversations x {args.turns} turns, streamed concurrently "
          f"by tenant; two shared system prompts; seed {args.seed}\n")
    rows = []
    for mode in modes:
        start = time.perf_counter()
        rows.append(asyncio.run(run_mode(mode, plan, args.max_imbalance, args.kill_after)))
        print(f"  {mode}: done in {time.perf_counter() - start:.0f} s (replica start included)", flush=True)
    print()
    report(rows)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average now {load} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
