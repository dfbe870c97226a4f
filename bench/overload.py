"""Overload benchmark (issue 13 item 13): does a saturated proxy still classify?

One proxy process (Postgres, Redis) in front of a simulated upstream (20 ms, its own process); this process is
the client: ``--clients`` concurrent connections (500) each sending the same ~20k-token prompt with three
breakpoints, written once beforehand, so every answer should read the cache. Reported per configuration, in one
run: answered, shed (429 + Retry-After), classified (a cache read billed), list price (the classification missed
its deadline or failed), p50/p99 latency and req/s. The peer is the same proxy with the classification gate
off (``classifyConcurrency: 0``: every request classifies at once, as before the gate).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from promptcache.proxy.domain.tokens import TiktokenTokenizer
from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.schema import migrate
from promptcache.proxy.testing.simulator import Simulator, SimulatorSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.database import scratch_database
from support.faults import free_port

REDIS_URL = os.environ.get("PROMPTCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")



def run_upstream(port: int, latency: float) -> None:
    simulator = Simulator(SimulatorSettings(TiktokenTokenizer("cl100k_base"), latency=latency, keep_requests=False))
    web.run_app(simulator.app(), host="127.0.0.1", port=port, print=None, access_log=None)


def prompt(tag: str) -> dict[str, Any]:
    para = ("The quarterly report covers revenue, churn, support volume and the roadmap for the next two "
            "releases, with a breakdown per region and a note on currency effects. ")
    history: list[dict[str, Any]] = []
    for turn in range(20):
        history += [{"role": "user", "content": f"[user {turn}] " + para * 12},
                    {"role": "assistant", "content": f"[assistant {turn}] " + para * 10}]
    history[-1] = {"role": "assistant", "content": [{"type": "text", "text": history[-1]["content"],
                                                     "cache_control": {"type": "ephemeral"}}]}
    return {"model": "bench", "messages": [
        {"role": "system", "content": [{"type": "text", "text": f"[{tag}] " + para * 160,
                                        "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
        *history,
        {"role": "user", "content": [{"type": "text", "text": para * 4, "cache_control": {"type": "ephemeral"}}]}]}


async def start_proxy(config: Path, port: int, dsn: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("promptcache")), "proxy", "--config", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--database", dsn, "--redis", REDIS_URL, "--log-level", "WARNING",
        env={**os.environ, "PROMPTCACHE_REDIS_PREFIX": f"bench:{secrets.token_hex(4)}:"})
    await answering(port, "the proxy")
    return process


async def answering(port: int, what: str) -> None:
    """Wait until ``port`` answers HTTP (the proxy on /healthz; the simulated upstream with any status)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    await r.read()
                return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


async def storm(url: str, body: bytes, headers: dict[str, str], clients: int, total: int) -> dict[str, Any]:
    outcomes = {"answered": 0, "shed": 0, "classified": 0, "list price": 0, "other": 0}
    latencies: list[float] = []
    remaining = total
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    data = await resp.read()
                latencies.append((time.perf_counter() - start) * 1000)
                if resp.status == 429:
                    outcomes["shed"] += 1
                elif resp.status != 200:
                    outcomes["other"] += 1
                else:
                    outcomes["answered"] += 1
                    read = json.loads(data)["usage"].get("cache_read_input_tokens", 0)
                    outcomes["classified" if read else "list price"] += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {**outcomes, "p50": statistics.median(ordered), "p99": ordered[int(0.99 * (len(ordered) - 1))],
            "rps": total / elapsed}


async def measure(label: str, limits: dict[str, Any], args: argparse.Namespace, upstream_port: int,
                  dsn: str, key: str, workdir: Path) -> dict[str, Any]:
    config = workdir / f"{label}.yaml"
    config.write_text(yaml.safe_dump({"limits": limits, "models": [{
        "alias": "bench", "upstream": {"url": f"http://127.0.0.1:{upstream_port}/v1", "model": "sim", "api": "openai"},
        "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
        "pricing": {"inputPerMTok": "3", "outputPerMTok": "15"}}]}))
    port = free_port()
    proxy = await start_proxy(config, port, dsn)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = json.dumps(prompt(label)).encode()
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
            await asyncio.sleep(1.0)  # the write lands (and goes through to Redis)
        return await storm(url, body, headers, args.clients, args.total)
    finally:
        proxy.send_signal(signal.SIGINT)
        await asyncio.wait_for(proxy.wait(), 60)


async def main(args: argparse.Namespace) -> int:
    upstream_port = free_port()
    upstream = multiprocessing.get_context("spawn").Process(target=run_upstream, args=(upstream_port, 0.02),
                                                            daemon=True)
    upstream.start()
    await answering(upstream_port, "the simulated upstream")
    scratch = contextlib.AsyncExitStack()
    dsn = await scratch.enter_async_context(scratch_database("promptcache_bench"))
    try:
        await migrate(dsn)
        pg = await Database.connect(dsn)
        key = (await ApiKeys(pg).create("bench"))[1]
        await pg.close()
        workdir = Path(tempfile.mkdtemp(prefix="promptcache-overload-"))
        rows = [(label, await measure(label, limits, args, upstream_port, dsn, key, workdir))
                for label, limits in (("gate off", {"classifyConcurrency": 0}), ("gate on (default)", {}),
                                              ("gate, queue 128", {"maxQueuedClassifications": 128}))]
    finally:
        upstream.terminate()
        upstream.join(5)
        await scratch.aclose()
    print(f"{args.total} requests from {args.clients} concurrent clients, one proxy process, 20 ms upstream, "
          f"~{len(json.dumps(prompt('x'))) // 1024} KB body, every request a cache hit when classified\n")
    columns = ("answered", "shed", "classified", "list price", "other", "p50", "p99", "rps")
    print(f"{'':20}" + "".join(f"{c:>12}" for c in columns))
    for label, row in rows:
        print(f"{label:20}" + "".join(f"{row[c]:12.0f}" if c not in ("p50", "p99", "rps") else f"{row[c]:12.1f}"
                                      for c in columns))
    for label, row in rows:
        share = row["classified"] / max(row["answered"], 1)
        print(f"{label}: {100 * share:.1f}% of answered requests classified; latency in ms")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--total", type=int, default=3000)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
