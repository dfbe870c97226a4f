"""Proxy benchmark (issue 3): latency the proxy adds, and throughput at concurrency 64.

The simulated upstream answers after a fixed latency in its own process; the proxy runs as
``promptcache proxy`` in another, with Postgres and Redis; this process is the client. The
request is a 20k-token prompt with three breakpoints, sent once to write the cache, then
repeated so every measured request takes the Redis hit path. Direct = the same request
straight to the upstream. A bare aiohttp relay is measured alongside, as the floor any
Python proxy pays for the extra hop on this machine. Target: p50 added <= 1.5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml
from aiohttp import web

from promptcache.proxy.domain.tokens import TiktokenTokenizer
from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.schema import migrate
from promptcache.proxy.testing.simulator import Simulator, SimulatorSettings

ADMIN_DSN = os.environ.get("PROMPTCACHE_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PROMPTCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_upstream(port: int, latency: float) -> None:
    simulator = Simulator(SimulatorSettings(TiktokenTokenizer("cl100k_base"), latency=latency, keep_requests=False))
    web.run_app(simulator.app(), host="127.0.0.1", port=port, print=None, access_log=None)


def run_relay(port: int, upstream_url: str) -> None:
    """The floor for any aiohttp proxy: forward the bytes, return the bytes, nothing else."""
    import uvloop

    async def handler(request: web.Request) -> web.Response:
        raw = await request.read()
        async with request.app[SESSION].post(upstream_url, data=raw,
                                             headers={"content-type": "application/json"}) as resp:
            out = await resp.read()
        return web.Response(body=out, content_type="application/json")

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession()
        yield
        await app[SESSION].close()

    app = web.Application(client_max_size=1024**3)
    app.router.add_post("/v1/chat/completions", handler)
    app.cleanup_ctx.append(session)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=uvloop.new_event_loop())


SESSION = web.AppKey("session", aiohttp.ClientSession)


def prompt() -> dict[str, Any]:
    """About 20k cl100k tokens: tools + system (1h), a long history (5m), the new question (5m)."""
    para = ("The quarterly report covers revenue, churn, support volume and the roadmap for the next two "
            "releases, with a breakdown per region and a note on currency effects. ")
    def text(n: int, tag: str) -> str:
        return f"[{tag}] " + para * n
    history: list[dict[str, Any]] = []
    for turn in range(20):
        history.append({"role": "user", "content": text(12, f"user {turn}")})
        history.append({"role": "assistant", "content": text(10, f"assistant {turn}")})
    history[-1] = {"role": "assistant", "content": [
        {"type": "text", "text": history[-1]["content"], "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}
    return {
        "model": "bench",
        "tools": [{"type": "function", "function": {"name": f"tool_{i}", "description": text(3, f"tool {i}"),
                                                    "parameters": {"type": "object", "properties": {}}}}
                  for i in range(8)],
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": text(160, "system"),
                                            "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
            *history,
            {"role": "user", "content": [{"type": "text", "text": text(4, "question"),
                                          "cache_control": {"type": "ephemeral", "ttl": "5m"}}]},
        ],
    }


async def timed_post(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> float:
    start = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as resp:
        data = await resp.read()
        assert resp.status == 200, data[:300]
    return (time.perf_counter() - start) * 1000


async def interleaved(session: aiohttp.ClientSession, urls: list[str], body: bytes, headers: dict[str, str],
                      n: int) -> list[list[float]]:
    """Take turns between the URLs so every side sees the same machine conditions."""
    timings: list[list[float]] = [[] for _ in urls]
    for _ in range(n):
        for url, times in zip(urls, timings, strict=True):
            times.append(await timed_post(session, url, body, headers))
    return timings


async def throughput(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
                     total: int, concurrency: int) -> float:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                assert resp.status == 200

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> int:
    upstream_port, proxy_port, relay_port = free_port(), free_port(), free_port()
    spawn = multiprocessing.get_context("spawn")
    upstream = spawn.Process(target=run_upstream, args=(upstream_port, args.latency / 1000), daemon=True)
    upstream.start()
    direct_url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    relay = spawn.Process(target=run_relay, args=(relay_port, direct_url), daemon=True)
    relay.start()
    name = f"promptcache_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
    proxy: asyncio.subprocess.Process | None = None
    try:
        await migrate(dsn)
        pg = await Database.connect(dsn)
        key = (await ApiKeys(pg).create("bench"))[1]
        await pg.close()
        workdir = Path(tempfile.mkdtemp(prefix="promptcache-bench-"))
        config = workdir / "proxy.yaml"
        config.write_text(yaml.safe_dump({"models": [{
            "alias": "bench", "upstream": {"url": f"http://127.0.0.1:{upstream_port}/v1", "model": "sim",
                                           "api": "openai"},
            "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
            "pricing": {"inputPerMTok": "3", "outputPerMTok": "15"}}]}))
        proxy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("promptcache")), "proxy", "--config", str(config), "--host",
            "127.0.0.1", "--port", str(proxy_port), "--database", dsn, "--redis", REDIS_URL, "--log-level", "WARNING",
            env={**os.environ, "PROMPTCACHE_REDIS_PREFIX": f"bench:{secrets.token_hex(4)}:"})
        body = json.dumps(prompt()).encode()
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        relay_url = f"http://127.0.0.1:{relay_port}/v1/chat/completions"
        proxy_url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            for url in (direct_url, relay_url, proxy_url):
                for _ in range(200):
                    try:
                        async with session.get(url.replace("/v1/chat/completions", "/healthz")) as r:
                            await r.read()
                        break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
            async with session.post(proxy_url, data=body, headers=headers) as resp:
                first = await resp.json()
            usage = first["usage"]
            await asyncio.sleep(0.5)
            async with session.post(proxy_url, data=body, headers=headers) as resp:
                hit = (await resp.json())["usage"]
            print(f"request: {usage['prompt_tokens']} prompt tokens, 3 breakpoints; first call wrote "
                  f"{usage['cache_creation_input_tokens']}, repeat reads {hit['cache_read_input_tokens']}")
            # Pairs, not a three-way rotation: a longer idle gap between requests makes any process
            # on this VM slower to wake, so the proxy and the relay are each paired with direct.
            await interleaved(session, [direct_url, proxy_url], body, headers, 30)
            direct, via = await interleaved(session, [direct_url, proxy_url], body, headers, args.requests)
            relay_direct, bare = await interleaved(session, [direct_url, relay_url], body, headers, args.requests)
            async with session.get(proxy_url.replace("/v1/chat/completions", "/metrics")) as resp:
                metrics = await resp.text()
            direct_rps = await throughput(session, direct_url, body, headers, args.total, args.concurrency)
            proxy_rps = await throughput(session, proxy_url, body, headers, args.total, args.concurrency)
        rows = [
            ("latency p50 (ms)", statistics.median(direct), statistics.median(via)),
            ("latency p99 (ms)", pct(direct, 0.99), pct(via, 0.99)),
            (f"requests/s @ {args.concurrency}", direct_rps, proxy_rps),
        ]
        print(f"\nupstream: simulated, fixed latency {args.latency:.0f} ms; {args.requests} sequential requests, "
              f"{args.total} at concurrency {args.concurrency}\n")
        print(f"{'':24}{'direct':>10}{'proxy':>10}{'added':>10}{'ratio':>8}")
        for label, d, p in rows:
            print(f"{label:24}{d:10.2f}{p:10.2f}{p - d:10.2f}{p / d:8.2f}")
        print("\nproxy-side means over the sequential run (from its /metrics):")
        for stage in ("upstream", "lookup", "classify", "commit"):
            total = count = 0.0
            for line in metrics.splitlines():
                series, _, value = line.rpartition(" ")
                if series.startswith(f"promptcache_{stage}_seconds_sum"):
                    total += float(value)
                elif series.startswith(f"promptcache_{stage}_seconds_count"):
                    count += float(value)
            if count:
                print(f"  {stage:9} {1000 * total / count:7.2f} ms")
        added = statistics.median(via) - statistics.median(direct)
        floor = statistics.median(bare) - statistics.median(relay_direct)
        print(f"\nfor reference, a bare aiohttp relay (bytes in, bytes out) adds {floor:.2f} ms p50 here")
        print(f"p50 added by the proxy: {added:.2f} ms (target <= 1.5 ms)")
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGINT)
            await asyncio.wait_for(proxy.wait(), 20)
        for process in (relay, upstream):
            process.terminate()
            process.join(5)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=20.0, help="upstream latency in ms")
    parser.add_argument("--requests", type=int, default=300, help="sequential requests per side")
    parser.add_argument("--total", type=int, default=2000, help="requests per side for the throughput run")
    parser.add_argument("--concurrency", type=int, default=64)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
