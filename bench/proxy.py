"""Proxy benchmark (issues 3 and 13): latency the proxy adds, and throughput at concurrency 64, beside LiteLLM.

The simulated upstream answers after a fixed latency in its own process; the proxy runs as ``promptcache proxy``
in another (and again with ``--workers 2``, and again with tracing on: OpenTelemetry spans exported over OTLP/HTTP
to a sink process that accepts and drops them, issue 16), with Postgres and Redis; this process is the client.
Every row is measured in the same run with the same body: direct (straight to the upstream), a bare aiohttp relay
(the floor any Python proxy pays for the extra hop on this machine), the LiteLLM proxy and promptcache. Bodies, each
sent once to write the cache and then repeated, so every measured request takes the Redis hit path:

- main: ≈130 KB, tools + system (1h), a 40-message history (5m), the new question (5m): three explicit breakpoints;
- multi-message: 100 messages of plain string content, no markers; the model's policy places its automatic
  ``lastUserMessage`` breakpoint, as for an SDK client that knows nothing of caching;
- mismatched count: the main body to a second upstream whose tokenizer counts a fraction of ours (``--undercount``),
  as an engine whose joint tokenization comes out below our per-block sum, so the proxy's billing caps scale every
  split (docs/design.md#billing-caps); ``promptcache_billing_caps_total`` is read from /metrics.

LiteLLM (``.ci/litellm/build``, its own virtualenv, or ``--litellm VENV``) runs as ``litellm --config`` with one
uvicorn worker (its default) as a plain OpenAI pass-through: each model ``openai/sim`` at the simulator's ``/v1``
with a dummy key, no master key and no DATABASE_URL (no auth, no Prisma, no spend or error logs), no callbacks,
``--telemetry False``, ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (no fetch of the cost map), ``LITELLM_LOG=ERROR`` and
uvicorn's access log off: its fastest configuration. Goals (issue 13, item 14): promptcache ≥ 10x LiteLLM's
requests/s at concurrency 64, and a p50 added at concurrency 1 within 1 ms of the bare relay's. A run takes about
4 minutes (``--quick``: about 2); anything else running on the machine skews every row, so the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from promptcache.proxy.domain.tokens import TiktokenTokenizer, Tokenizer
from promptcache.proxy.storage.keys import ApiKeys
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.schema import migrate
from promptcache.proxy.testing.simulator import Simulator, SimulatorSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.database import scratch_database
from support.faults import free_port
from support.proxy import redis_prefix

REDIS_URL = os.environ.get("PROMPTCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"



class Undercounting:
    """cl100k_base times a factor: an upstream whose prompt_tokens come out below our count of the same blocks."""

    def __init__(self, factor: float) -> None:
        self._inner = TiktokenTokenizer("cl100k_base")
        self._factor = factor
        self.version = f"{self._inner.version}x{factor}"

    def count(self, text: str) -> int:
        return int(self._inner.count(text) * self._factor)


def run_upstream(port: int, latency: float, factor: float) -> None:
    tokenizer: Tokenizer = TiktokenTokenizer("cl100k_base") if factor == 1 else Undercounting(factor)
    simulator = Simulator(SimulatorSettings(tokenizer, latency=latency, keep_requests=False))
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
    app.router.add_post(CHAT, handler)
    app.cleanup_ctx.append(session)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=uvloop.new_event_loop())


def run_trace_sink(port: int) -> None:
    """An OTLP/HTTP traces endpoint that accepts every export and keeps nothing: the tracing-on proxy's collector."""
    async def export(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=1024**3)
    app.router.add_post("/v1/traces", export)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


SESSION = web.AppKey("session", aiohttp.ClientSession)
PARA = ("The quarterly report covers revenue, churn, support volume and the roadmap for the next two "
        "releases, with a breakdown per region and a note on currency effects. ")


def text(n: int, tag: str) -> str:
    return f"[{tag}] " + PARA * n


def prompt(model: str) -> dict[str, Any]:
    """About 25k cl100k tokens, ≈130 KB: tools + system (1h), a long history (5m), the new question (5m)."""
    history: list[dict[str, Any]] = []
    for turn in range(20):
        history.append({"role": "user", "content": text(12, f"user {turn}")})
        history.append({"role": "assistant", "content": text(10, f"assistant {turn}")})
    history[-1] = {"role": "assistant", "content": [
        {"type": "text", "text": history[-1]["content"], "cache_control": {"type": "ephemeral", "ttl": "5m"}}]}
    return {
        "model": model,
        "tools": [{"type": "function", "function": {"name": f"tool_{i}", "description": text(3, f"tool {i}"),
                                                    "parameters": {"type": "object", "properties": {}}}}
                  for i in range(8)],
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": text(320, "system"),
                                            "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
            *history,
            {"role": "user", "content": [{"type": "text", "text": text(4, "question"),
                                          "cache_control": {"type": "ephemeral", "ttl": "5m"}}]},
        ],
    }


def conversation(model: str, messages: int) -> dict[str, Any]:
    """A system string and ``messages`` - 1 turns of plain strings, no markers, ending on the user's: ≈130 KB."""
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": text(7, f"turn {i}")}
             for i in range(messages - 1)]
    if turns[-1]["role"] != "user":
        turns[-1]["role"] = "user"
    return {"model": model, "messages": [{"role": "system", "content": text(80, "system")}, *turns]}


@dataclass
class Target:
    name: str
    base: str
    """Base URL, without the path."""
    metrics: bool = False
    """A promptcache: /metrics is scraped around each measurement."""


@dataclass
class Body:
    title: str
    model: str
    data: bytes
    requests: int
    """Sequential requests per side at concurrency 1."""
    upstream: str
    relay: str
    """The upstream's base URL, and the bare relay's in front of it."""


@dataclass
class Row:
    name: str
    times: list[float]
    direct: list[float] | None
    """The direct requests interleaved with this row's, which its added latency is measured against."""
    rps: float = 0.0
    at1: dict[str, float] = field(default_factory=dict)
    at64: dict[str, float] = field(default_factory=dict)
    """What /metrics counted during the sequential run and during the throughput window."""


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
                     seconds: float, concurrency: int) -> float:
    """Requests completed per second in a window of ``seconds`` that opens once every connection has had its first
    answer (a queue of 64 at a slow proxy takes seconds to reach steady state); a window rather than a count, so a
    slow proxy costs the run no more time than a fast one."""
    loop = asyncio.get_running_loop()
    answered = done = 0
    end: float | None = None

    async def worker() -> None:
        nonlocal answered, done, end
        first = True
        while end is None or loop.time() < end:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                assert resp.status == 200
            now = loop.time()
            if first:
                first, answered = False, answered + 1
                if answered == concurrency:
                    end = now + seconds
            elif end is not None and now <= end:
                done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / seconds


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scrape(session: aiohttp.ClientSession, target: Target) -> dict[str, float]:
    """The proxy's /metrics as ``{series: value}`` (empty for a side without them)."""
    if not target.metrics:
        return {}
    async with session.get(target.base + "/metrics") as resp:
        lines = (await resp.text()).splitlines()
    pairs = (line.rpartition(" ") for line in lines if line and not line.startswith("#"))
    return {series: float(value) for series, _, value in pairs}


def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def total(metrics: dict[str, float], prefix: str, *labels: str) -> float:
    """Every series named ``prefix…`` that carries all of ``labels`` (``key="value"``), summed."""
    return sum(v for k, v in metrics.items() if k.startswith(prefix) and all(label in k for label in labels))


def mean(metrics: dict[str, float], histogram: str) -> float | None:
    count = total(metrics, histogram + "_count")
    return total(metrics, histogram + "_sum") / count if count else None


async def wait_up(session: aiohttp.ClientSession, base: str, process: asyncio.subprocess.Process | None) -> None:
    """Until the server answers anything on its port (a 404 will do), or its process has exited."""
    for _ in range(600):
        if process is not None and process.returncode is not None:
            raise RuntimeError(f"{base}: the server exited with {process.returncode}")
        try:
            async with session.get(base + "/healthz") as r:
                await r.read()
            return
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base} did not come up")


def litellm_venv(path: str | None) -> Path:
    """The given virtualenv, or the one ``.ci/litellm/build`` installs or finds (its last line)."""
    if path:
        return Path(path)
    out = subprocess.run(["bash", str(ROOT / ".ci/litellm/build")], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


async def start_litellm(venv: Path, port: int, workdir: Path, models: dict[str, str]) -> asyncio.subprocess.Process:
    """LiteLLM as a plain pass-through, each model to ``openai/sim`` at its upstream, everything optional off."""
    config = workdir / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": name, "litellm_params": {"model": "openai/sim", "api_base": url,
                                                               "api_key": "dummy"}}
                       for name, url in models.items()],
        "litellm_settings": {"callbacks": [], "success_callback": [], "failure_callback": [],
                             "turn_off_message_logging": True},
        "general_settings": {"disable_spend_logs": True, "disable_error_logs": True,
                             "background_health_checks": False},
    }))
    logging_config = workdir / "litellm-logging.json"
    logging_config.write_text(json.dumps({"version": 1, "disable_existing_loggers": False, "loggers": {
        "uvicorn.access": {"level": "WARNING"}, "uvicorn.error": {"level": "WARNING"}}}))
    log = (workdir / "litellm.log").open("wb")
    return await asyncio.create_subprocess_exec(
        str(venv / "bin/litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
        "--telemetry", "False", "--log_config", str(logging_config), stdout=log, stderr=log,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
             "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"})


async def start_proxy(port: int, config: Path, dsn: str, workers: int, prefix: str,
                      traces: str | None = None) -> asyncio.subprocess.Process:
    """As deployed: its own Redis ``prefix`` (so it writes its own entries) and a ledger spool on disk; with ``traces``
    (an OTLP/HTTP endpoint) tracing on, else off (no OTEL_EXPORTER_OTLP_* in its environment)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_EXPORTER_OTLP")}
    env["PROMPTCACHE_REDIS_PREFIX"] = prefix
    if traces is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = traces
    return await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("promptcache")), "proxy", "--config", str(config), "--host",
        "127.0.0.1", "--port", str(port), "--database", dsn, "--redis", REDIS_URL, "--log-level", "WARNING",
        "--workers", str(workers), "--spool-dir", str(config.with_name(f"spool-{port}")), env=env)


async def run_body(session: aiohttp.ClientSession, direct: Target, targets: list[Target], body: Body,
                   headers: dict[str, str], args: argparse.Namespace) -> list[Row]:
    """One body through every side: each paired with direct at concurrency 1, then each alone at concurrency 64."""
    # Pairs, not a rotation through every side: a longer idle gap between requests makes any process on this VM
    # slower to wake, so each side is paired with direct.
    rows: list[Row] = []
    for target in targets:
        urls = [direct.base + CHAT, target.base + CHAT]
        await interleaved(session, urls, body.data, headers, 30)
        before = await scrape(session, target)
        d, t = await interleaved(session, urls, body.data, headers, body.requests)
        rows.append(Row(target.name, t, d, at1=since(before, await scrape(session, target))))
    rows.insert(0, Row(direct.name, [x for r in rows if r.direct for x in r.direct], None))
    for row, target in zip(rows, [direct, *targets], strict=True):
        before = await scrape(session, target)
        row.rps = await throughput(session, target.base + CHAT, body.data, headers, args.seconds, args.concurrency)
        await asyncio.sleep(0.5)  # commits off the response path drain before the next side starts
        row.at64 = since(before, await scrape(session, target))
    return rows


def report(rows: list[Row], litellm: str, relay: str, model: str, concurrency: int) -> None:
    """The table, then the goals beside the figures and what each promptcache counted in its /metrics."""
    by_name = {r.name: r for r in rows}
    liteflow = by_name[litellm].rps

    def added(r: Row) -> float:
        assert r.direct is not None
        return statistics.median(r.times) - statistics.median(r.direct)

    print(f"  {'':26}{'p50 @1':>9}{'p99 @1':>9}{'added p50':>11}{'req/s @64':>11}{'vs LiteLLM':>12}")
    for r in rows:
        gap = "" if r.direct is None else f"{added(r):.2f}"
        print(f"  {r.name:26}{statistics.median(r.times):9.2f}{pct(r.times, 0.99):9.2f}{gap:>11}"
              f"{r.rps:11.1f}{r.rps / liteflow:11.1f}x")
    floor = added(by_name[relay])
    for r in rows:
        if not r.at1:
            continue
        print(f"  {r.name}: {r.rps / liteflow:.1f}x LiteLLM at concurrency {concurrency} (goal ≥ 10x); p50 added "
              f"{added(r):.2f} ms - the relay's {floor:.2f} ms = {added(r) - floor:.2f} ms (goal ≤ 1 ms)")
        stages = ", ".join(f"{stage} {1000 * m:.2f}" for stage in ("upstream", "lookup", "classify", "commit")
                           if (m := mean(r.at1, f"promptcache_{stage}_seconds")) is not None)
        caps = {action: total(r.at1, "promptcache_billing_caps_total", f'action="{action}"', f'model="{model}"')
                + total(r.at64, "promptcache_billing_caps_total", f'action="{action}"', f'model="{model}"')
                for action in ("scaled", "list_price")}
        print(f"    /metrics at concurrency 1, means in ms: {stages} (commit: per group commit)")
        print(f"    /metrics at concurrency {concurrency}: {mean(r.at64, 'promptcache_commit_batch_size') or 0:.1f} "
              f"requests per group commit, {1000 * (mean(r.at64, 'promptcache_commit_seconds') or 0):.2f} ms each; "
              f"billing caps over both: {caps['scaled']:.0f} scaled, {caps['list_price']:.0f} list price")


async def main(args: argparse.Namespace) -> int:
    venv = litellm_venv(args.litellm)
    litellm = f"LiteLLM {venv.name.removeprefix('litellm-')}"
    ports = {name: free_port() for name in ("upstream", "mismatch", "relay", "relay-mismatch", "litellm", "traces")}
    base = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    proxy_ports = {(1, False): free_port(), (2, False): free_port(), (1, True): free_port()}
    latency = args.latency / 1000
    spawn = multiprocessing.get_context("spawn")
    children = [
        spawn.Process(target=run_upstream, args=(ports["upstream"], latency, 1.0), daemon=True),
        spawn.Process(target=run_upstream, args=(ports["mismatch"], latency, args.undercount), daemon=True),
        spawn.Process(target=run_relay, args=(ports["relay"], base["upstream"] + CHAT), daemon=True),
        spawn.Process(target=run_relay, args=(ports["relay-mismatch"], base["mismatch"] + CHAT), daemon=True),
        spawn.Process(target=run_trace_sink, args=(ports["traces"],), daemon=True),
    ]
    for child in children:
        child.start()
    scratch = contextlib.AsyncExitStack()
    dsn = await scratch.enter_async_context(scratch_database("promptcache_bench"))
    servers: list[asyncio.subprocess.Process] = []
    workdir = tempfile.TemporaryDirectory(prefix="promptcache-bench-")
    try:
        await migrate(dsn)
        pg = await Database.connect(dsn)
        key = (await ApiKeys(pg).create("bench"))[1]
        await pg.close()
        models = {"bench": base["upstream"], "bench-auto": base["upstream"], "bench-mismatch": base["mismatch"]}
        config = Path(workdir.name) / "proxy.yaml"
        config.write_text(yaml.safe_dump({"models": [
            {"alias": alias, "upstream": {"url": url + "/v1", "model": "sim", "api": "openai"},
             "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
             "pricing": {"inputPerMTok": "3", "outputPerMTok": "15"},
             **({"cache": {"automatic": {"mode": "lastUserMessage"}}} if alias == "bench-auto" else {})}
            for alias, url in models.items()]}))
        servers.append(await start_litellm(venv, ports["litellm"], Path(workdir.name),
                                           {alias: url + "/v1" for alias, url in models.items()}))
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                for url in base.values():
                    await wait_up(session, url, servers[0])
            except RuntimeError:
                sys.stderr.write((Path(workdir.name) / "litellm.log").read_text(errors="replace")[-4000:])
                raise
            proxies: list[Target] = []
            for (workers, traced), port in proxy_ports.items():  # one by one: each writes the tariffs at start-up
                prefix = await scratch.enter_async_context(redis_prefix(REDIS_URL, "bench"))  # deleted at the end
                servers.append(await start_proxy(port, config, dsn, workers, prefix,
                                                 base["traces"] if traced else None))
                proxies.append(Target("promptcache" + (f" --workers {workers}" if workers > 1 else "")
                                      + (", tracing on" if traced else ""), f"http://127.0.0.1:{port}", metrics=True))
                await wait_up(session, proxies[-1].base, servers[-1])
            main_body = json.dumps(prompt("bench")).encode()
            bodies = [
                Body("main body: tools, system, 40 messages, question; 3 explicit breakpoints", "bench", main_body,
                     args.requests, base["upstream"], base["relay"]),
                Body(f"multi-message body: {args.messages} messages of string content, no markers, the policy's "
                     "automatic lastUserMessage breakpoint", "bench-auto",
                     json.dumps(conversation("bench-auto", args.messages)).encode(), args.requests // 3,
                     base["upstream"], base["relay"]),
                Body(f"mismatched count: the main body to an upstream counting {args.undercount} of our tokens",
                     "bench-mismatch", json.dumps(prompt("bench-mismatch")).encode(), args.requests // 3,
                     base["mismatch"], base["relay-mismatch"]),
            ]
            print(f"upstream: simulated, fixed latency {args.latency:.0f} ms. Concurrency 1: sequential requests, "
                  f"each side paired with direct; concurrency {args.concurrency}: a {args.seconds:.0f} s window per "
                  f"side. {os.cpu_count()} cores shared by this client, the upstreams and every proxy, so "
                  f"--workers 2 competes with all of them for the same two; load average {os.getloadavg()[0]:.2f} "
                  "before the run")
            for body in bodies:
                first = await post_json(session, proxies[0].base, body.data, headers)
                await asyncio.sleep(0.5)  # its writes are committed off the response path
                hit = await post_json(session, proxies[0].base, body.data, headers)
                upstream = (await post_json(session, body.upstream, body.data, headers))["usage"]
                relayed = (await post_json(session, base["litellm"], body.data, headers))["usage"]
                print(f"\n{body.title}\n  {len(body.data) / 1000:.1f} KB; the upstream reports "
                      f"{upstream['prompt_tokens']} prompt tokens ({relayed['prompt_tokens']} through LiteLLM); "
                      "promptcache's first call wrote "
                      f"{first['usage']['cache_creation_input_tokens']}, a repeat reads "
                      f"{hit['usage']['cache_read_input_tokens']}")
                targets = [Target("bare aiohttp relay", body.relay), Target(litellm, base["litellm"]), *proxies]
                rows = await run_body(session, Target("direct", body.upstream), targets, body, headers, args)
                report(rows, litellm, "bare aiohttp relay", body.model, args.concurrency)
            print(f"\nload average after the run: {os.getloadavg()[0]:.2f} (anything else running skews every row)")
    finally:
        for server in servers:
            if server.returncode is None:
                server.send_signal(signal.SIGINT)
            await asyncio.wait_for(server.wait(), 30)
        for child in children:
            child.terminate()
            child.join(5)
        await scratch.aclose()
        workdir.cleanup()
    return 0


async def post_json(session: aiohttp.ClientSession, base: str, body: bytes, headers: dict[str, str]) -> Any:
    async with session.post(base + CHAT, data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=20.0, help="upstream latency in ms")
    parser.add_argument("--requests", type=int, default=300,
                        help="sequential requests per side for the main body (a third for the others)")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput window per side")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--messages", type=int, default=100, help="messages in the multi-message body")
    parser.add_argument("--undercount", type=float, default=0.9,
                        help="the mismatched upstream counts this fraction of our tokens (< 0.8: list price)")
    parser.add_argument("--litellm", metavar="VENV",
                        help="a virtualenv with litellm[proxy] (default: the one .ci/litellm/build installs)")
    parser.add_argument("--quick", action="store_true", help="60 sequential requests and a 2 s window per side")
    parsed = parser.parse_args()
    if parsed.quick:
        parsed.requests, parsed.seconds = 60, 2.0
    raise SystemExit(asyncio.run(main(parsed)))
