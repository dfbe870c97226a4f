"""Run a PlanReplay (SPEC §9, §11): resolve its spec, replay its window, write its status and report.

The operator replays small windows itself, with the engine in a worker thread that pulls rows from
the database cursor a chunk at a time through the event loop, so neither the loop nor memory grows
with the log. Larger windows (more than ``inline_replay_max_requests`` requests) run as a Job of the
same image, whose ``promptcache replay --plan-replay NS/NAME`` calls :func:`run_job`: the same code,
patching the same status. A run is for one generation of the spec: the status names it, a new
generation runs again, and a result finished after the spec moved on is dropped.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import asyncpg
import kopf
import kubernetes
from kubernetes.client import ApiException

from promptcache.operator.constants import GENERATION_ANNOTATION, REPLAY_APP
from promptcache.operator.handlers import manifests
from promptcache.operator.handlers.conditions import Condition, merge, now_rfc3339, stalled
from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.kube import Kube
from promptcache.operator.replay.engine import UNITS, Proposal, ReplayError, Simulation, canonical, report, simulate
from promptcache.proxy.domain.policy import POLICY_KEYS, CachePolicy, PolicyError, parse_decimal
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.requestlog import (
    LoggedRequest,
    count_rows,
    export_rows,
    format_timestamp,
    parse_timestamp,
)

PLURAL = "planreplays"
TERMINAL = ("Succeeded", "Failed")
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
_RESULT_FIELDS = ("summary", "intervals", "digest", "caveats", "reportConfigMap", "startedAt", "finishedAt")
_CHUNK = 1000
"""Rows the simulating thread takes from the cursor per turn of the event loop."""

Event = tuple[str, str, str]
"""(type, reason, message) of the Kubernetes event a user should see."""


class Rejected(Exception):
    """The spec cannot be replayed as written; the PlanReplay is Failed with ``reason`` until it changes."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Plan:
    """A spec resolved into what the engine takes, and the size of its window."""

    proposal: Proposal
    models: tuple[str, ...]
    since: datetime
    until: datetime
    seed: int
    iterations: int
    confidence: float
    unit: str
    requests: int
    """2xx requests logged in the window: what decides between the operator and a Job."""

    @property
    def window(self) -> str:
        return f"{format_timestamp(self.since)}/{format_timestamp(self.until)}"


# --- the spec ------------------------------------------------------------------------------------
# The CRD's schema and CEL rules say most of this already, but an API server that skips them (an old
# one, or the emulator in tests) must not get a traceback instead of a reason.


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _models(spec: Mapping[str, Any]) -> tuple[str, ...]:
    models = spec.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise Rejected("InvalidSpec", "models must be a non-empty list of DeployedModel aliases")
    return tuple(dict.fromkeys(models))


def _window(spec: Mapping[str, Any], now: datetime) -> tuple[datetime, datetime]:
    window, hours = spec.get("window"), spec.get("lastHours")
    if (window is None) == (hours is None):
        raise Rejected("InvalidSpec", "set exactly one of window and lastHours")
    if hours is not None:
        if not _is_int(hours) or not 1 <= hours <= 8760:
            raise Rejected("InvalidSpec", f"lastHours must be an integer from 1 to 8760, got {hours!r}")
        return now - timedelta(hours=hours), now
    bounds = []
    for key in ("start", "end"):
        value = window.get(key) if isinstance(window, Mapping) else None
        try:
            bounds.append(parse_timestamp(value if isinstance(value, str) else ""))
        except ValueError:
            raise Rejected("InvalidSpec", f"window.{key} must be an RFC 3339 timestamp, got {value!r}") from None
    start, end = bounds
    if start >= end:
        raise Rejected("EmptyWindow", f"window.start {format_timestamp(start)} is not before window.end "
                                      f"{format_timestamp(end)}")
    return start, end


def _bootstrap(spec: Mapping[str, Any]) -> tuple[int, int, float, str]:
    """(seed, iterations, confidence, unit), with the CRD's defaults."""
    raw = spec.get("bootstrap") or {}
    if not isinstance(raw, Mapping):
        raise Rejected("InvalidSpec", "bootstrap must be an object with iterations, confidence, seed and unit")
    iterations, confidence = raw.get("iterations", 2000), raw.get("confidence", 0.95)
    seed, unit = raw.get("seed", 0), raw.get("unit", "principal")
    if not _is_int(iterations) or not 100 <= iterations <= 100_000:
        raise Rejected("InvalidSpec", f"bootstrap.iterations must be an integer from 100 to 100000, got {iterations!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0.5 < confidence <= 0.999:
        raise Rejected("InvalidSpec", f"bootstrap.confidence must be in (0.5, 0.999], got {confidence!r}")
    if not _is_int(seed) or seed < 0:
        raise Rejected("InvalidSpec", f"bootstrap.seed must be a non-negative integer, got {seed!r}")
    if unit not in UNITS:
        raise Rejected("InvalidSpec", f"bootstrap.unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return seed, iterations, float(confidence), unit


def _tier_override(spec: Mapping[str, Any]) -> dict[str, str]:
    raw = spec.get("tierOverride") or {}
    if not isinstance(raw, Mapping) or not all(k in TIERS and v in TIERS for k, v in raw.items()):
        raise Rejected("InvalidSpec", f"tierOverride must map tiers to tiers ({', '.join(TIERS)}), got {raw!r}")
    return dict(raw)


def _price_overrides(spec: Mapping[str, Any], models: Sequence[str]) -> dict[str, tuple[Decimal, Decimal]]:
    raw = spec.get("pricingOverrides") or {}
    if not isinstance(raw, Mapping):
        raise Rejected("InvalidSpec", "pricingOverrides must map model aliases to inputPerMTok and outputPerMTok")
    out = {}
    for model, prices in raw.items():
        if model not in models:
            raise Rejected("InvalidSpec", f"pricingOverrides names {model!r}, which is not one of models")
        if not isinstance(prices, Mapping):
            raise Rejected("InvalidSpec", f"pricingOverrides.{model} must have inputPerMTok and outputPerMTok")
        try:
            pair = tuple(parse_decimal(prices.get(key), f"pricingOverrides.{model}.{key}")
                         for key in ("inputPerMTok", "outputPerMTok"))
        except PolicyError as exc:
            raise Rejected("InvalidSpec", str(exc)) from None
        if min(pair) < 0:
            raise Rejected("InvalidSpec", f"pricingOverrides.{model}: prices must not be negative")
        out[model] = (pair[0], pair[1])
    return out


async def _policy(spec: Mapping[str, Any], namespace: str, kube: Kube) -> tuple[CachePolicy, dict[str, Any]]:
    """The proposed policy and its keys as given (echoed in the result, so inline and referenced agree)."""
    inline, ref = spec.get("policy"), spec.get("cachePolicyRef")
    if (inline is None) == (ref is None):
        raise Rejected("InvalidSpec", "set exactly one of policy and cachePolicyRef")
    source, where = inline, "policy"
    if ref is not None:
        name = ref.get("name") if isinstance(ref, Mapping) else None
        if not isinstance(name, str) or not name:
            raise Rejected("InvalidSpec", "cachePolicyRef.name must name a CachePolicy")
        found = await kube.get_resource("cachepolicies", namespace, name)
        if found is None:
            raise Rejected("CachePolicyNotFound", f"CachePolicy {namespace}/{name} does not exist")
        source, where = found.get("spec") or {}, f"CachePolicy {namespace}/{name}"
    if not isinstance(source, Mapping):
        raise Rejected("InvalidPolicy", f"{where} must be an object with the keys of a CachePolicy spec")
    try:
        policy = CachePolicy.from_spec(source)
    except PolicyError as exc:
        raise Rejected("InvalidPolicy", f"{where}: {exc}") from None
    return policy, {key: value for key, value in source.items() if key in POLICY_KEYS}


async def _check_models(models: Sequence[str], namespace: str, kube: Kube) -> None:
    """The request log is shared by every namespace; a PlanReplay may only read its own namespace's models."""
    aliases = {(m.get("spec") or {}).get("alias") for m in await kube.list_resources("deployedmodels", namespace)}
    unknown = [m for m in models if m not in aliases]
    if unknown:
        raise Rejected("UnknownModel", f"no DeployedModel in namespace {namespace} has the alias "
                                       f"{', '.join(unknown)}")


async def resolve(obj: Mapping[str, Any], kube: Kube, conn: asyncpg.Connection[asyncpg.Record],
                  now: datetime) -> Plan:
    """The spec as a replay; :class:`Rejected` when it cannot be one (``lastHours`` ends at ``now``)."""
    spec, namespace = obj.get("spec") or {}, obj["metadata"]["namespace"]
    models = _models(spec)
    since, until = _window(spec, now)
    seed, iterations, confidence, unit = _bootstrap(spec)
    proposal_tiers, prices = _tier_override(spec), _price_overrides(spec, models)
    policy, echoed = await _policy(spec, namespace, kube)
    await _check_models(models, namespace, kube)
    requests = await count_rows(conn, since, until, models)
    if requests == 0:
        raise Rejected("EmptyWindow", f"no 2xx requests of {', '.join(models)} were logged from "
                                      f"{format_timestamp(since)} to {format_timestamp(until)}")
    return Plan(Proposal(policy, echoed, proposal_tiers, prices), models, since, until, seed, iterations, confidence,
                unit, requests)


# --- status --------------------------------------------------------------------------------------


class _Status:
    """Writes the phases of one generation's run; each write's conditions merge onto the previous ones."""

    def __init__(self, kube: Kube, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        self.kube, self.namespace, self.name = kube, str(meta["namespace"]), str(meta["name"])
        self.generation = int(meta.get("generation") or 0)
        self.conditions = (obj.get("status") or {}).get("conditions")

    async def write(self, phase: str, conditions: Sequence[Condition], **fields: Any) -> None:
        self.conditions = merge(self.conditions, conditions, self.generation)
        await self.kube.patch_resource_status(PLURAL, self.namespace, self.name, {
            "phase": phase, "observedGeneration": self.generation, "conditions": self.conditions, **fields})

    async def progress(self, phase: str, reason: str, message: str, **fields: Any) -> None:
        conditions = [Condition("Ready", False, reason, message), Condition("Reconciling", True, reason, message),
                      Condition("Stalled", False, reason)]
        await self.write(phase, conditions, **fields)

    async def fail(self, reason: str, message: str) -> Event:
        await self.write("Failed", stalled(reason, message), finishedAt=now_rfc3339())
        return ("Warning", reason, message)

    async def current(self) -> bool:
        """Whether the resource still has this generation: a result for another one describes nothing."""
        live = await self.kube.get_resource(PLURAL, self.namespace, self.name)
        return live is not None and live["metadata"].get("generation") == self.generation


def _body(obj: Mapping[str, Any]) -> kopf.Body:
    """kopf's view of a resource, to own objects and be the subject of events."""
    return kopf.Body(cast(kopf.RawBody, dict(obj)))


def _done(obj: Mapping[str, Any]) -> bool:
    status = obj.get("status") or {}
    return status.get("observedGeneration") == obj["metadata"].get("generation") and status.get("phase") in TERMINAL


# --- running -------------------------------------------------------------------------------------


async def _simulate(conn: asyncpg.Connection[asyncpg.Record], plan: Plan) -> Simulation:
    """The engine in a worker thread, pulling rows from the cursor through this event loop a chunk at a time."""
    loop = asyncio.get_running_loop()
    rows = export_rows(conn, plan.since, plan.until, plan.models)
    lock = asyncio.Lock()
    stopped = False

    async def chunk() -> list[LoggedRequest]:
        out: list[LoggedRequest] = []
        async with lock:
            if not stopped:
                async for row in rows:
                    out.append(row)
                    if len(out) == _CHUNK:
                        break
        return out

    def feed() -> Iterator[LoggedRequest]:
        while batch := asyncio.run_coroutine_threadsafe(chunk(), loop).result():
            yield from batch

    try:
        return await asyncio.to_thread(simulate, feed(), plan.proposal, plan.unit)
    finally:
        stopped = True  # when this task is cancelled, the thread sees the log end and finishes
        async with lock:
            await rows.aclose()  # type: ignore[attr-defined]


async def execute(obj: Mapping[str, Any], plan: Plan, kube: Kube, conn: asyncpg.Connection[asyncpg.Record],
                  status: _Status) -> Event | None:
    """Replay, then write the report ConfigMap and the final status; None when the spec moved on meanwhile."""
    try:
        sim = await _simulate(conn, plan)
        result = (await asyncio.to_thread(report, sim, plan.proposal, seed=plan.seed, iterations=plan.iterations,
                                          unit=plan.unit, confidence=plan.confidence)).result
    except ReplayError as exc:  # e.g. every request in the window lacks a prefix chain
        return await status.fail("EmptyWindow", str(exc)) if await status.current() else None
    if not await status.current():
        return None
    configmap = manifests.replay_report(status.name, status.namespace, status.generation, plan.window,
                                        canonical(result))
    kopf.adopt(configmap, owner=_body(obj))
    await kube.converge(configmap)
    summary, (low, high) = result["summary"], result["intervals"]["savings"]
    message = (f"projected savings {summary['savings']} USD ({summary['savings_pct']}%) over {summary['requests']} "
               f"requests from {plan.window}, {plan.confidence:.3g} interval [{low}, {high}]")
    await status.write(
        "Succeeded",
        [Condition("Ready", True, "Succeeded", message), Condition("Reconciling", False, "Succeeded"),
         Condition("Stalled", False, "Succeeded")],
        summary=summary, intervals=result["intervals"], digest=result["digest"], caveats=result["caveats"],
        reportConfigMap=configmap["metadata"]["name"], finishedAt=now_rfc3339())
    return ("Normal", "Succeeded", message)


async def reconcile(obj: Mapping[str, Any], kube: Kube, config: OperatorConfig) -> Event | None:
    """The operator's run of the resource's generation, unless that generation already ran or its Job is running:
    annotation changes and operator restarts replay nothing. Pending, then Running, then Succeeded or Failed."""
    current = obj.get("status") or {}
    status = _Status(kube, obj)
    job_name = manifests.replay_names(status.name)["job"]
    job = await kube.job(status.namespace, job_name)
    job_generation = ((job or {}).get("metadata", {}).get("annotations") or {}).get(GENERATION_ANNOTATION)
    if _done(obj) or (current.get("observedGeneration") == status.generation and current.get("phase") == "Running"
                      and job_generation == str(status.generation)):
        return None
    if job is not None and job_generation != str(status.generation):
        await kube.delete_job(status.namespace, job_name)  # it replays an older spec; its result would be dropped
        job = None
    if not config.database_url:
        return await status.fail("DatabaseNotConfigured", "the operator has no PROMPTCACHE_DATABASE_URL: replays "
                                                          "read the request log from Postgres")
    await status.progress("Pending", "Pending", f"generation {status.generation} is waiting to run",
                          **dict.fromkeys(_RESULT_FIELDS))
    try:
        conn = await asyncpg.connect(config.database_url)
        try:
            try:
                plan = await resolve(obj, kube, conn, datetime.now(UTC))
            except Rejected as exc:
                return await status.fail(exc.reason, str(exc))
            if plan.requests > config.inline_replay_max_requests and config.manifests.database_secret:
                return await _start_job(obj, plan, kube, config.manifests, status, create=job is None)
            await status.progress("Running", "Replaying", f"replaying {plan.requests} requests from {plan.window} "
                                                          "in the operator", startedAt=now_rfc3339())
            return await execute(obj, plan, kube, conn, status)
        finally:
            await conn.close()
    except DB_ERRORS as exc:
        message = f"the request log is unavailable, retrying: {exc}"
        await status.progress("Pending", "DatabaseUnavailable", message)
        raise kopf.TemporaryError(message, delay=30) from exc


async def _start_job(obj: Mapping[str, Any], plan: Plan, kube: Kube, settings: manifests.OperatorSettings,
                     status: _Status, *, create: bool) -> Event:
    """Hand the run to a Job; it writes the final status itself. An existing Job of this generation is kept
    (the operator restarted after creating it)."""
    job = manifests.replay_job(status.name, status.namespace, status.generation, settings)
    kopf.adopt(job, owner=_body(obj))
    if create:
        await kube.create(job)
    message = f"replaying {plan.requests} requests from {plan.window} in Job {job['metadata']['name']}"
    await status.progress("Running", "JobRunning", message, startedAt=now_rfc3339())
    return ("Normal", "JobStarted", message)


async def job_failed(job: Mapping[str, Any], kube: Kube) -> tuple[kopf.Body, Event] | None:
    """A replay Job out of retries wrote no result: its PlanReplay, still Running for that generation, fails.
    Returns the PlanReplay and the event to post about it."""
    conditions = (job.get("status") or {}).get("conditions") or []
    failed = next((c for c in conditions if c.get("type") == "Failed" and c.get("status") == "True"), None)
    meta = job["metadata"]
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("kind") == "PlanReplay"), None)
    if failed is None or owner is None:
        return None
    obj = await kube.get_resource(PLURAL, meta["namespace"], owner["name"])
    if obj is None or obj["metadata"].get("uid") != owner.get("uid"):
        return None
    current = obj.get("status") or {}
    generation = (meta.get("annotations") or {}).get(GENERATION_ANNOTATION)
    if current.get("phase") != "Running" or str(current.get("observedGeneration")) != generation:
        return None
    detail = ": ".join(str(part) for part in (failed.get("reason"), failed.get("message")) if part)
    message = f"Job {meta['name']} failed: {detail or 'no reason given'}"
    return _body(obj), await _Status(kube, obj).fail("JobFailed", message)


# --- the Job's side ------------------------------------------------------------------------------


def job_main(target: str) -> int:
    """``promptcache replay --plan-replay NAMESPACE/NAME``."""
    namespace, sep, name = target.partition("/")
    if not sep or not namespace or not name or "/" in name:
        print(f"--plan-replay must be NAMESPACE/NAME, got {target!r}", file=sys.stderr)
        return 2
    return run_job(namespace, name)


def run_job(namespace: str, name: str) -> int:
    """Run the PlanReplay's current generation and patch its status, as a replay Job's pod does.

    0 once an outcome is written (Succeeded or Failed: running again would not change it) or there is
    nothing to do; 1 when Postgres or the API failed, so the Job retries the pod.
    """
    return asyncio.run(_run_job(namespace, name))


async def _run_job(namespace: str, name: str) -> int:
    database_url = os.environ.get("PROMPTCACHE_DATABASE_URL")
    if not database_url:
        print("PROMPTCACHE_DATABASE_URL is not set: the replay reads the request log from Postgres", file=sys.stderr)
        return 1
    try:
        kube = Kube.connect()
    except kubernetes.config.ConfigException as exc:
        print(f"no Kubernetes API to talk to: {exc}", file=sys.stderr)
        return 1
    where = f"PlanReplay {namespace}/{name}"
    try:
        obj = await kube.get_resource(PLURAL, namespace, name)
        if obj is None or _done(obj):
            print(f"{where}: {'does not exist' if obj is None else 'already ran'}; nothing to do")
            return 0
        status = _Status(kube, obj)
        event: Event | None
        conn = await asyncpg.connect(database_url)
        try:
            try:
                plan = await resolve(obj, kube, conn, datetime.now(UTC))
            except Rejected as exc:
                event = await status.fail(exc.reason, str(exc))
            else:
                event = await execute(obj, plan, kube, conn, status)
        finally:
            await conn.close()
        if event is None:
            print(f"{where}: the spec changed while it ran; the result was dropped")
            return 0
        await kube.post_event(obj, *event, component=REPLAY_APP)
        print(f"{where}: {event[1]}: {event[2]}")
        return 0
    except DB_ERRORS as exc:
        print(f"{where}: the request log is unavailable: {exc}", file=sys.stderr)
        return 1
    except ApiException as exc:
        print(f"{where}: Kubernetes API error {exc.status}: {exc.reason}", file=sys.stderr)
        return 1
    finally:
        kube.close()
