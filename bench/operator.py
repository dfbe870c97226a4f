"""Operator benchmark (issue 4): N DeployedModels (default 200) created at once against the emulator.

The real operator (kopf's loop, the handlers of ``promptcache.operator.main``) runs against the test harness's
HTTP Kubernetes emulator (``tests/support/apiserver.py``), with a scratch Postgres database (migrated, dropped
afterwards) and
Redis under a key prefix of its own. One CachePolicy, then N models POSTed concurrently; watch streams on the
ConfigMaps, Deployments, Services and DeployedModels tell when each model has its three owned objects and a status
with Ready and Reconciling conditions. Prints the seconds to the first and to the last such model (target for the
last: <= 30 s), the rate, the requests the emulator served and the errors kopf logged.

Run with ``.venv/bin/python -P bench/operator.py [--models N] [--worker-limit K] [--as-in-tests]``. The emulator and
the operator share this process (and its GIL): the emulator in the main event loop, the operator in a thread of its
own. By default the emulator forgets the requests it has answered (``LeanApiServer``): kmock's request log makes each
request cost more than the last, which would measure the harness rather than the operator; ``--as-in-tests`` keeps it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import secrets
import sys
import time
import unittest.mock
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import asyncpg
import kmock
import kopf
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import promptcache.operator.main  # noqa: F401  (registers the handlers)
from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.manifests import OperatorSettings, names
from promptcache.operator.handlers.state import OperatorMemo
from promptcache.proxy.storage.schema import migrate

from support import apiserver as kube  # the tests' Kubernetes emulator and operator runner
from support.apiserver import (
    CACHE_POLICIES,
    DEPLOYED_MODELS,
    DEPLOYMENTS,
    GROUP_VERSION,
    ApiServer,
    EmulatedCluster,
    emulated_cluster,
    eventually,
    object_path,
    running_operator,
)

ADMIN_DSN = os.environ.get("PROMPTCACHE_TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PROMPTCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
NS = "bench"
TARGET_SECONDS = 30.0
PARTS = ("configmap", "deployment", "service", "status")


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    name = f"promptcache_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + name
        await migrate(dsn)
        yield dsn
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def redis_prefix() -> AsyncIterator[str]:
    prefix = f"opbench:{secrets.token_hex(4)}:"
    try:
        yield prefix
    finally:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


def policy() -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "CachePolicy", "metadata": {"name": "standard", "namespace": NS},
            "spec": {"enabledTtls": ["5m", "1h"], "defaultTtl": "5m", "minPrefixTokens": 1024}}


def model(name: str, alias: str) -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "DeployedModel", "metadata": {"name": name, "namespace": NS},
            "spec": {"alias": alias,
                     "upstream": {"url": "http://vllm.llm.svc:8000/v1", "model": "llama", "api": "openai"},
                     "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
                     "pricing": {"inputPerMTok": "3.00", "outputPerMTok": "15.00"},
                     "cachePolicyRef": {"name": "standard"}, "proxy": {"replicas": 2}}}


class LeanApiServer(ApiServer):
    """The harness's emulator, minus kmock's request log.

    kmock keeps every request it served (for tests' assertions) and finds the reaction for each new one by
    scanning that log (``request in view``, criteria checked request by request): a cost that grows with the number
    of requests served, quadratic over a run, and nothing a real API server has. This one forgets a request once
    it is answered; what it serves, and how, is unchanged.
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.live: dict[int, kmock.Request] = {}
        self.served: list[str] = []
        """The User-Agent of each request answered (for the report)."""

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        self.live[id(request)] = request
        try:
            return await super()._handle(request)
        finally:
            del self.live[id(request)]
            self.served.append(request.headers.get("User-Agent", ""))
            self._requests[:] = [r for r in self._requests if id(r) in self.live or r.resource == _NAMESPACES]


_NAMESPACES = kmock.resource("", "v1", "namespaces")
"""Requests for Namespaces are re-addressed (an alias kmock can parse), so a live one is not known by identity."""


@contextmanager
def emulator_class(lean: bool) -> Iterator[None]:
    if not lean:
        yield
        return
    with unittest.mock.patch.object(kube, "ApiServer", LeanApiServer):
        yield


@dataclass
class Progress:
    """When each model got each part (seconds since the first POST), from the watch streams."""

    models: set[str]
    start: float = 0.0
    seen: dict[str, dict[str, float]] = field(default_factory=lambda: collections.defaultdict(dict))
    done: dict[str, float] = field(default_factory=dict)
    all_done: asyncio.Event = field(default_factory=asyncio.Event)

    def mark(self, model: str, part: str) -> None:
        if model not in self.models or part in self.seen[model]:
            return
        now = time.perf_counter() - self.start
        self.seen[model][part] = now
        if len(self.seen[model]) == len(PARTS):
            self.done[model] = now
            if len(self.done) == len(self.models):
                self.all_done.set()

    def part_times(self, part: str) -> list[float]:
        return sorted(parts[part] for parts in self.seen.values() if part in parts)


def _owned_by_a_model(obj: dict[str, Any]) -> bool:
    return any(ref.get("kind") == "DeployedModel" for ref in obj["metadata"].get("ownerReferences") or [])


def classifiers(progress: Progress) -> dict[str, Callable[[dict[str, Any]], None]]:
    """For each watched resource, what an event's object says about a model's progress."""
    by_name = {part: {names(m)[part]: m for m in progress.models} for part in ("configmap", "deployment", "service")}

    def owned(part: str) -> Callable[[dict[str, Any]], None]:
        def classify(obj: dict[str, Any]) -> None:
            model_name = by_name[part].get(obj["metadata"]["name"])
            if model_name is not None and _owned_by_a_model(obj):
                progress.mark(model_name, part)
        return classify

    def status(obj: dict[str, Any]) -> None:
        kinds = {c.get("type") for c in (obj.get("status") or {}).get("conditions") or []}
        if {"Ready", "Reconciling"} <= kinds:
            progress.mark(obj["metadata"]["name"], "status")

    return {"v1/configmaps": owned("configmap"), "apps/v1/deployments": owned("deployment"),
            "v1/services": owned("service"), f"{GROUP_VERSION}/deployedmodels": status}


async def watch(cluster: EmulatedCluster, resource: str, classify: Callable[[dict[str, Any]], None],
                opened: asyncio.Event) -> None:
    group_version, plural = resource.rsplit("/", 1)
    url = cluster.url + object_path(group_version, plural, NS)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with cluster.session.get(url, params={"watch": "true"}, timeout=timeout) as response:
        response.raise_for_status()
        opened.set()
        async for line in response.content:
            if line.strip():
                event = json.loads(line)
                if event.get("type") in ("ADDED", "MODIFIED"):
                    classify(event["object"])


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def user_agents(emulator: ApiServer) -> list[str]:
    """The User-Agent of every request the emulator has answered (lean) or received (as in the tests)."""
    if isinstance(emulator, LeanApiServer):
        return list(emulator.served)
    return [request.headers.get("User-Agent", "") for request in emulator]


class KopfErrors(logging.Handler):
    """Counts the errors kopf logs (a handler or an API request failing, to be retried) instead of printing each."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.messages: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.messages[re.sub(r"\d+", "#", record.getMessage())[:120]] += 1


@dataclass
class Run:
    posted: float
    progress: Progress
    agents: list[str]


async def measure(cluster: EmulatedCluster, n: int, within: float) -> Run:
    """POST ``n`` models at once and follow them until each is complete (or ``within`` seconds pass)."""
    model_names = [f"m{i:04d}" for i in range(n)]
    progress = Progress(set(model_names))
    streams = classifiers(progress)
    opened = {resource: asyncio.Event() for resource in streams}
    watchers = [asyncio.create_task(watch(cluster, resource, classify, opened[resource]))
                for resource, classify in streams.items()]
    try:
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened.values())), 10)
        before = len(user_agents(cluster.emulator))
        run = secrets.token_hex(3)
        progress.start = time.perf_counter()
        await asyncio.gather(*(cluster.create(model(name, f"bench-{run}-{name}")) for name in model_names))
        posted = time.perf_counter() - progress.start
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(progress.all_done.wait(), within)
        return Run(posted, progress, user_agents(cluster.emulator)[before:])
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


async def bench(n: int, worker_limit: int | None, within: float, lean: bool) -> Run:
    def configure(settings: kopf.OperatorSettings) -> None:
        settings.batching.worker_limit = worker_limit

    with emulator_class(lean):
        async with scratch_database() as dsn, redis_prefix() as prefix, \
                emulated_cluster(namespaces=("default", NS)) as cluster:
            manifests = OperatorSettings(proxy_image="promptcache:bench", redis_url=REDIS_URL, redis_prefix=prefix)
            memo = OperatorMemo(config=OperatorConfig(database_url=dsn, redis_url=REDIS_URL, manifests=manifests))
            async with running_operator(cluster, memo=memo, namespaces=[NS], configure=configure,
                                        watching=(DEPLOYED_MODELS, CACHE_POLICIES, DEPLOYMENTS)):
                await cluster.create(policy())

                async def policy_applied() -> bool:
                    obj = await cluster.get(GROUP_VERSION, "cachepolicies", NS, "standard")
                    return bool((obj.get("status") or {}).get("observedGeneration"))

                await eventually(policy_applied, what="the CachePolicy's reconcile")
                return await measure(cluster, n, within)


def report(n: int, run: Run, errors: KopfErrors, within: float, worker_limit: int | None, lean: bool) -> None:
    progress = run.progress
    done = sorted(progress.done.values())
    print(f"promptcache operator bench: {n} DeployedModels created at once (python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores; {'lean emulator' if lean else 'emulator as in the tests'}; "
          f"kopf worker_limit {worker_limit or 'unlimited'})")
    rows = [("all POSTs answered", f"{run.posted:7.2f} s")]
    for part, label in (("configmap", "ConfigMap"), ("deployment", "Deployment"), ("service", "Service"),
                        ("status", "status (Ready, Reconciling)")):
        times = progress.part_times(part)
        rows.append((f"last {label}", f"{times[-1]:7.2f} s" if len(times) == n else
                     f"{len(times)}/{n} after {within:.0f} s"))
    if done:
        rows += [("first model complete", f"{done[0]:7.2f} s"),
                 ("median model complete", f"{percentile(done, 0.5):7.2f} s")]
    if len(done) == n:
        verdict = "within" if done[-1] <= TARGET_SECONDS else "ABOVE"
        rows += [("all models complete", f"{done[-1]:7.2f} s   ({verdict} the {TARGET_SECONDS:.0f} s target)"),
                 ("rate", f"{n / done[-1]:7.1f} models/s")]
    else:
        rows.append(("all models complete", f"no: {len(done)}/{n} after {within:.0f} s"))
    who = collections.Counter(
        "operator (kopf)" if agent.startswith("kopf/") else
        "operator (kubernetes client)" if agent.startswith("OpenAPI-Generator/") else "bench" for agent in run.agents)
    rows.append(("requests to the emulator", f"{len(run.agents):7d}   "
                 f"({', '.join(f'{k} {v}' for k, v in sorted(who.items()))})"))
    rows.append(("errors logged by kopf (retried)", f"{errors.count:7d}"))
    for label, value in rows:
        print(f"  {label:<34} {value}")
    for message, count in errors.messages.most_common(3):
        print(f"    {count:5d} x {message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--worker-limit", type=int, default=None,
                        help="kopf's settings.batching.worker_limit (default: kopf's, unlimited)")
    parser.add_argument("--within", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--as-in-tests", action="store_true",
                        help="the harness's emulator as it is (with kmock's request log; see LeanApiServer)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    errors = KopfErrors()
    kopf_logger = logging.getLogger("kopf")
    kopf_logger.addHandler(errors)
    kopf_logger.propagate = False
    lean = not args.as_in_tests
    run = asyncio.run(bench(args.models, args.worker_limit, args.within, lean))
    report(args.models, run, errors, args.within, args.worker_limit, lean)
    return 0 if len(run.progress.done) == args.models else 1


if __name__ == "__main__":
    raise SystemExit(main())
