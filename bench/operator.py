"""Operator benchmark (issue 4): N DeployedModels (default 200) created at once against a real control plane.

The control plane is the tests' (``tests/support/controlplane.py``): etcd, kube-apiserver (RBAC, audit log) and
kube-controller-manager (garbage collector; deployment and replicaset controllers, so every Deployment gets its
ReplicaSet and Pending pods, as in a cluster with no free node) as processes on loopback, from the binaries
``PROMPTCACHE_K8S_BIN`` names or ``.ci/k8s/build`` finds or builds. The operator is ``promptcache operator
--namespace bench`` as a process of its own, on a token of the chart's ServiceAccount (kopf's defaults: no worker
limit), with a scratch Postgres database (migrated, dropped afterwards) and Redis under a key prefix of its own
(deleted afterwards). One CachePolicy, then N models POSTed concurrently; one watch per resource type (ConfigMaps,
Deployments, Services, DeployedModels) tells when each model has its three owned objects and a status with Ready
and Reconciling conditions. Prints the seconds to the first and to the last such model (target for the last:
<= 30 s), the rate, the CPU seconds of each process over that window (and of the rest of the host: on a shared
machine the figures move with it), the operator's requests by verb and resource from the API server's audit log,
with the server's time per request and how many were in flight, and the errors in the operator's log.

The floor, measured in the same run once the operator is stopped and the controller manager has caught up: the
3N objects the operator made, copied (server-set fields dropped) and POSTed at once by this client as
``system:masters`` into a namespace of their own. The seconds until the API server has answered them all are what
no operator can beat on this machine; the ratio of the two is printed. (``system:masters`` is exempt from the API
server's priority and fairness; the operator's ServiceAccount is not, as in a real cluster.)

Run with ``.venv/bin/python -P bench/operator.py [--models N] [--within S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from promptcache.operator.constants import API_VERSION, MODELS, POLICIES
from promptcache.operator.handlers.manifests import names
from promptcache.proxy.storage.schema import migrate

from support.cluster import Cluster, connected, eventually, object_path
from support.controlplane import ControlPlane, control_plane
from support.database import scratch_database
from support.operator_process import OperatorEnvironment, audited, operator_identity, running_operator
from support.proxy import redis_prefix
from support.resources import model, policy

REDIS_URL = os.environ.get("PROMPTCACHE_REDIS_URL", "redis://127.0.0.1:6379/0")
NS = "bench"
FLOOR_NS = "floor"
TARGET_SECONDS = 30.0
PARTS = ("configmap", "deployment", "service", "status")
OWNED = (("v1", "configmaps", "ConfigMap", "configmap"), ("apps/v1", "deployments", "Deployment", "deployment"),
         ("v1", "services", "Service", "service"))
"""(group/version, plural, kind, part) of the three objects the operator makes per model."""
Obj = dict[str, Any]
HOST = "host"


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


def _owned_by_a_model(obj: Obj) -> bool:
    return any(ref.get("kind") == "DeployedModel" for ref in obj["metadata"].get("ownerReferences") or [])


def classifiers(progress: Progress) -> dict[tuple[str, str], Callable[[Obj], None]]:
    """For each watched (group/version, plural), what an event's object says about a model's progress."""
    by_name = {part: {names(m)[part]: m for m in progress.models} for _, _, _, part in OWNED}

    def owned(part: str) -> Callable[[Obj], None]:
        def classify(obj: Obj) -> None:
            model_name = by_name[part].get(obj["metadata"]["name"])
            if model_name is not None and _owned_by_a_model(obj):
                progress.mark(model_name, part)
        return classify

    def status(obj: Obj) -> None:
        kinds = {c.get("type") for c in (obj.get("status") or {}).get("conditions") or []}
        if {"Ready", "Reconciling"} <= kinds:
            progress.mark(obj["metadata"]["name"], "status")

    streams = {(gv, plural): owned(part) for gv, plural, _, part in OWNED}
    streams[(API_VERSION, MODELS)] = status
    return streams


async def watch(cluster: Cluster, group_version: str, plural: str, classify: Callable[[Obj], None],
                opened: asyncio.Event) -> None:
    """List, then watch from the list's resourceVersion (``Cluster.watch``: resumed where the server closes it),
    every ADDED and MODIFIED object to ``classify``."""
    path = object_path(group_version, plural, NS)
    listing = await cluster.call("GET", path)
    for item in listing["items"]:
        classify(item)
    version = str(listing["metadata"]["resourceVersion"])
    opened.set()  # everything after the list's version reaches the watch, however late it connects
    async for kind, obj in cluster.watch(path, version):
        if kind in ("ADDED", "MODIFIED"):
            classify(obj)


class CpuMeter:
    """CPU seconds (user + system) of named processes, and of the whole host (``HOST``: every core's busy time,
    so a shared machine shows), between ``start`` and ``stop``."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._start: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {}
        for name, process in self.processes.items():
            times = process.cpu_times()
            now[name] = times.user + times.system
        host = psutil.cpu_times()
        now[HOST] = sum(host) - host.idle - getattr(host, "iowait", 0.0) - getattr(host, "guest", 0.0) \
            - getattr(host, "guest_nice", 0.0)
        return now

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        self.seconds = {name: value - self._start[name] for name, value in self._now().items()}


def plane_pids(plane: ControlPlane) -> dict[str, int]:
    return {process.name: process.popen.pid for process in plane.processes}


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


@dataclass
class OperatorRun:
    posted: float
    progress: Progress
    cpu: dict[str, float]
    requests: list[Obj]
    """The audit events of the operator's requests received between the first POST and the last model complete."""
    errors: collections.Counter[str]
    error_count: int


@dataclass
class FloorRun:
    objects: int
    done: list[float]
    """Per model, seconds from the first POST until its three objects were answered (sorted)."""
    cpu: dict[str, float]


@dataclass
class Bench:
    version: str
    operator: OperatorRun
    floor: FloorRun | None


def _timestamp(event: Obj) -> datetime:
    return datetime.fromisoformat(str(event["requestReceivedTimestamp"]).replace("Z", "+00:00"))


def _seconds(event: Obj) -> float:
    """How long the API server took over a request, from its receipt to the response's completion."""
    end = datetime.fromisoformat(str(event["stageTimestamp"]).replace("Z", "+00:00"))
    return (end - _timestamp(event)).total_seconds()


LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*")


def logged_errors(log: Path) -> tuple[int, collections.Counter[str]]:
    """The operator log's ERROR lines: how many, and by message (digits folded, timestamps dropped)."""
    messages: collections.Counter[str] = collections.Counter()
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        if "ERROR" in line:
            count += 1
            messages[re.sub(r"\d+", "#", LOG_PREFIX.sub("", line))[:140]] += 1
    return count, messages


async def measure_operator(cluster: Cluster, plane: ControlPlane, operator_pid: int, n: int,
                           within: float) -> tuple[float, Progress, CpuMeter, datetime, datetime]:
    """POST ``n`` models at once and follow them until each is complete (or ``within`` seconds pass)."""
    model_names = [f"m{i:04d}" for i in range(n)]
    progress = Progress(set(model_names))
    streams = classifiers(progress)
    opened = {resource: asyncio.Event() for resource in streams}
    watchers = [asyncio.create_task(watch(cluster, gv, plural, classify, opened[(gv, plural)]))
                for (gv, plural), classify in streams.items()]
    meter = CpuMeter({"operator": operator_pid, **plane_pids(plane), "bench client": os.getpid()})
    try:
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened.values())), 10)
        run = secrets.token_hex(3)
        began = datetime.now(UTC)
        meter.start()
        progress.start = time.perf_counter()
        await asyncio.gather(*(cluster.create(model(name, f"bench-{run}-{name}", "standard", ns=NS))
                               for name in model_names))
        posted = time.perf_counter() - progress.start
        done_or_timeout = asyncio.ensure_future(progress.all_done.wait())
        await asyncio.wait([done_or_timeout, *watchers], timeout=within, return_when=asyncio.FIRST_COMPLETED)
        meter.stop()
        ended = datetime.now(UTC)
        for task in watchers:
            if task.done() and task.exception() is not None:
                raise RuntimeError(f"a watch failed: {task.exception()}")
        done_or_timeout.cancel()
        return posted, progress, meter, began, ended
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


def copy_for_floor(kind: str, api_version: str, obj: Obj) -> Obj:
    """``obj`` as a client would first POST it: no server-set metadata, status, owner or allocated IPs."""
    meta = obj["metadata"]
    metadata: Obj = {"name": meta["name"], "namespace": FLOOR_NS}
    if meta.get("labels"):
        metadata["labels"] = dict(meta["labels"])
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items()
                   if not k.startswith("deployment.kubernetes.io/")}
    if annotations:
        metadata["annotations"] = annotations
    body: Obj = {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}
    if kind == "Service":
        body["spec"] = {k: v for k, v in body["spec"].items() if k not in ("clusterIP", "clusterIPs")}
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata, **body}


async def settled(cluster: Cluster, namespace: str, within: float = 180.0) -> None:
    """Until the controller manager has made every pod the Deployments in ``namespace`` ask for."""
    deployments = await cluster.list("apps/v1", "deployments", namespace)
    wanted = sum(int(d["spec"].get("replicas", 1)) for d in deployments)

    async def caught_up() -> bool:
        return len(await cluster.list("v1", "pods", namespace)) >= wanted

    await eventually(caught_up, within=within, interval=1.0, what=f"the controller manager's {wanted} pods")


async def measure_floor(cluster: Cluster, plane: ControlPlane, objects: list[tuple[str, Obj]]) -> FloorRun:
    """POST ``objects`` (model, object) at once; when each model's objects were all answered."""
    meter = CpuMeter({**plane_pids(plane), "bench client": os.getpid()})
    answered: dict[str, list[float]] = collections.defaultdict(list)

    async def create(model_name: str, obj: Obj) -> None:
        await cluster.create(obj)
        answered[model_name].append(time.perf_counter() - start)

    meter.start()
    start = time.perf_counter()
    await asyncio.gather(*(create(m, obj) for m, obj in objects))
    meter.stop()
    return FloorRun(len(objects), sorted(max(times) for times in answered.values()), meter.seconds)


async def bench(plane: ControlPlane, n: int, within: float, floor: bool) -> Bench:
    async with scratch_database("promptcache_bench") as dsn, redis_prefix(REDIS_URL, "opbench") as prefix, \
            connected(plane) as cluster:
        await migrate(dsn)
        version = str((await cluster.call("GET", "/version")).get("gitVersion"))
        for namespace in (NS, FLOOR_NS):
            await cluster.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        with tempfile.TemporaryDirectory(prefix="promptcache-opbench-") as scratch:
            identity = await operator_identity(cluster, Path(scratch))
            environment = OperatorEnvironment(database_url=dsn, redis_url=REDIS_URL, redis_prefix=prefix,
                                              proxy_image="promptcache:bench")
            log = Path(scratch) / "operator.log"
            async with running_operator(identity, environment, log, namespaces=[NS]) as operator:
                assert operator.popen is not None
                await cluster.create(policy("standard", ns=NS))

                async def policy_applied() -> bool:
                    obj = await cluster.get(API_VERSION, POLICIES, NS, "standard")
                    return bool((obj.get("status") or {}).get("observedGeneration"))

                await eventually(policy_applied, what="the CachePolicy's reconcile")
                posted, progress, meter, began, ended = await measure_operator(
                    cluster, plane, operator.popen.pid, n, within)
            # The operator has stopped: its audit events are all written, and only the floor's client is left.
            requests = [e for e in audited(plane.audit_log) if began <= _timestamp(e) <= ended]
            error_count, errors = logged_errors(log)
        operator_run = OperatorRun(posted, progress, meter.seconds, requests, errors, error_count)
        floor_run = None
        if floor and len(progress.done) == n:
            await settled(cluster, NS)
            objects = []
            for gv, plural, kind, _ in OWNED:
                for obj in await cluster.list(gv, plural, NS):
                    owner = next((r["name"] for r in obj["metadata"].get("ownerReferences") or []
                                  if r.get("kind") == "DeployedModel"), None)
                    if owner in progress.models:
                        objects.append((owner, copy_for_floor(kind, gv, obj)))
            floor_run = await measure_floor(cluster, plane, objects)
        return Bench(version, operator_run, floor_run)


def access(event: Obj) -> str:
    """``verb resource[/subresource]`` of an audited request, or ``verb URL`` for a non-resource one."""
    ref = event.get("objectRef")
    if ref is None:
        return f"{event['verb']} {event.get('requestURI', '?')}"
    resource = f"{ref['resource']}/{ref['subresource']}" if ref.get("subresource") else ref["resource"]
    return f"{event['verb']} {resource}"


def client_of(event: Obj) -> str:
    """Which of the operator's two clients made a request: kopf's own, or the ``kubernetes`` client its handlers
    call in worker threads."""
    agent = str(event.get("userAgent", ""))
    return "kopf" if agent.startswith("kopf/") else "kubernetes client" if agent.startswith("OpenAPI-Generator/") \
        else agent.split("/")[0] or "?"


def cpu_row(cpu: Mapping[str, float], order: Iterable[str]) -> str:
    """The named processes' CPU seconds, then the host's other processes' (its busy time less all of ours)."""
    others = cpu[HOST] - sum(value for name, value in cpu.items() if name != HOST)
    return ", ".join([*(f"{name} {cpu[name]:.1f}" for name in order if name in cpu),
                      f"rest of the host {max(others, 0.0):.1f}"])


def report(n: int, result: Bench, within: float) -> None:
    run = result.operator
    progress = run.progress
    done = sorted(progress.done.values())
    print(f"promptcache operator bench: {n} DeployedModels created at once against a real control plane "
          f"(kube-apiserver {result.version}, etcd, kube-controller-manager; python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores; promptcache operator as a process, the chart's ServiceAccount)")
    rows = [("all POSTs answered", f"{run.posted:7.2f} s")]
    for part, label in (("configmap", "ConfigMap"), ("deployment", "Deployment"), ("service", "Service"),
                        ("status", "status (Ready, Reconciling)")):
        times = progress.part_times(part)
        rows.append((f"last {label}", f"{times[-1]:7.2f} s" if len(times) == n else
                     f"{len(times)}/{n} after {within:.0f} s"))
    if done:
        rows += [("first model complete", f"{done[0]:7.2f} s"),
                 ("median model complete", f"{percentile(done, 0.5):7.2f} s")]
    complete = len(done) == n
    if complete:
        verdict = "within" if done[-1] <= TARGET_SECONDS else "ABOVE"
        rows += [("all models complete", f"{done[-1]:7.2f} s   ({verdict} the {TARGET_SECONDS:.0f} s target)"),
                 ("rate", f"{n / done[-1]:7.1f} models/s")]
    else:
        rows.append(("all models complete", f"no: {len(done)}/{n} after {within:.0f} s"))
    window = done[-1] if complete else within
    operator_cpu = run.cpu.get("operator", 0.0)
    rows.append(("operator CPU", f"{operator_cpu:7.1f} s   ({100 * operator_cpu / window:.0f}% of one core; "
                 f"{1000 * operator_cpu / n:.0f} ms per model)"))
    rows.append(("CPU of the others (s)", cpu_row(run.cpu, ("kube-apiserver", "etcd", "kube-controller-manager",
                                                           "bench client"))))
    codes = collections.Counter(str((e.get("responseStatus") or {}).get("code", "?")) for e in run.requests)
    rows.append(("requests by the operator (audit)", f"{len(run.requests):7d}   "
                 f"(HTTP {', '.join(f'{code} x{count}' for code, count in sorted(codes.items()))})"))
    for label, value in rows:
        print(f"  {label:<34} {value}")
    timed = [e for e in run.requests if e["verb"] != "watch"]
    latencies = sorted(_seconds(e) for e in timed)
    if latencies:
        busy: dict[str, float] = collections.defaultdict(float)
        for event in timed:
            busy[client_of(event)] += _seconds(event)
        print(f"  {'server time per operator request':<34} p50 {1000 * percentile(latencies, 0.5):.1f} ms, "
              f"p90 {1000 * percentile(latencies, 0.9):.1f} ms, max {1000 * latencies[-1]:.0f} ms")
        print(f"  {'operator requests in flight (mean)':<34} {sum(busy.values()) / window:7.1f}   ("
              + ", ".join(f"{client} {seconds / window:.1f}" for client, seconds in sorted(busy.items())) + ")")
    by_access = collections.Counter(access(e) for e in run.requests)
    for name, count in by_access.most_common():
        print(f"    {count:7d}  {name}")
    print(f"  {'errors logged by the operator':<34} {run.error_count:7d}")
    for message, count in run.errors.most_common(3):
        print(f"    {count:5d} x {message}")

    floor = result.floor
    if floor is None:
        print("  floor: not measured" + ("" if complete else " (the operator did not complete)"))
        return
    print(f"floor: the same {floor.objects} objects (ConfigMap, Deployment, Service per model) POSTed at once by "
          "the bench client (system:masters), operator stopped")
    rows = [("first model's three answered", f"{floor.done[0]:7.2f} s"),
            ("all answered", f"{floor.done[-1]:7.2f} s   ({n / floor.done[-1]:.1f} models/s)"),
            ("CPU (s)", cpu_row(floor.cpu, ("kube-apiserver", "etcd", "kube-controller-manager", "bench client")))]
    if complete:
        rows.append(("operator / floor", f"{done[-1] / floor.done[-1]:7.1f} x   (all models complete / all "
                     "answered)"))
    for label, value in rows:
        print(f"  {label:<34} {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--within", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the API server's floor (the same objects POSTed directly)")
    args = parser.parse_args()
    with control_plane() as plane:
        result = asyncio.run(bench(plane, args.models, args.within, args.floor))
    report(args.models, result, args.within)
    return 0 if len(result.operator.progress.done) == args.models else 1


if __name__ == "__main__":
    raise SystemExit(main())
