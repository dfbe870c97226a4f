"""Run a PlanReplay (docs/design.md#replay, #reconciliation): resolve its spec, replay its window, write its status
and report.

The operator replays small windows itself, with the engine in a worker thread that pulls rows from
the database cursor a chunk at a time through the event loop, so neither the loop nor memory grows
with the log. Larger windows (more than ``inline_replay_max_requests`` requests) run as a Job of the
same image, whose ``promptcache replay-job NS/NAME`` calls :func:`run_job`: the same code, patching
the same status. A run is for one generation of the spec: the status names it, a new generation
runs again, and a result finished after the spec moved on is dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import kopf
import kubernetes
from kubernetes.client import ApiException

from promptcache.operator.constants import GENERATION_ANNOTATION, MODELS, POLICIES, REPLAY_APP, REPLAYS
from promptcache.operator.errors import SpecError
from promptcache.operator.handlers import manifests
from promptcache.operator.handlers.conditions import Condition, merge, now_rfc3339, stalled
from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.kube import Kube
from promptcache.operator.handlers.outcome import Event
from promptcache.operator.replay import proposal, rows
from promptcache.operator.replay.engine import ReplayError, canonical, report, simulate
from promptcache.operator.replay.proposal import Proposal
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.storage.requestlog import count_rows, format_timestamp

TERMINAL = ("Succeeded", "Failed")
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
_RESULT_FIELDS = ("summary", "intervals", "digest", "caveats", "reportConfigMap", "startedAt", "finishedAt")


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
# What needs no cluster is parsed by replay.proposal, with ``promptcache replay``'s flags; the
# policy a spec references and the models it names are looked up here.


async def _policy(spec: Mapping[str, Any], namespace: str, kube: Kube) -> tuple[CachePolicy, dict[str, Any]]:
    """The proposed policy and its keys as given, inline or from the CachePolicy the spec references."""
    name = proposal.policy_reference(spec)
    source, where = spec.get("policy"), "policy"
    if name is not None:
        found = await kube.get_resource(POLICIES, namespace, name)
        if found is None:
            raise SpecError("CachePolicyNotFound", f"CachePolicy {namespace}/{name} does not exist")
        source, where = found.get("spec") or {}, f"CachePolicy {namespace}/{name}"
    if not isinstance(source, Mapping):
        raise SpecError("InvalidPolicy", f"{where} must be an object with the keys of a CachePolicy spec")
    return proposal.policy(source, where)


async def _check_models(models: Sequence[str], namespace: str, kube: Kube) -> None:
    """The request log is shared by every namespace; a PlanReplay may only read its own namespace's models."""
    aliases = {(m.get("spec") or {}).get("alias") for m in await kube.list_resources(MODELS, namespace)}
    unknown = [m for m in models if m not in aliases]
    if unknown:
        raise SpecError("UnknownModel", f"no DeployedModel in namespace {namespace} has the alias "
                                        f"{', '.join(unknown)}")


async def resolve(obj: Mapping[str, Any], kube: Kube, conn: asyncpg.Connection[asyncpg.Record],
                  now: datetime) -> Plan:
    """The spec as a replay; :class:`SpecError` when it cannot be one (``lastHours`` ends at ``now``)."""
    spec, namespace = obj.get("spec") or {}, obj["metadata"]["namespace"]
    models = proposal.models(spec)
    since, until = proposal.window(spec, now)
    seed, iterations, confidence, unit = proposal.bootstrap(spec)
    tiers = proposal.tier_override(spec.get("tierOverride"))
    prices = proposal.price_overrides(spec.get("pricingOverrides"), models)
    policy, echoed = await _policy(spec, namespace, kube)
    await _check_models(models, namespace, kube)
    requests = await count_rows(conn, since, until, models)
    if requests == 0:
        raise SpecError("EmptyWindow", f"no 2xx requests of {', '.join(models)} were logged from "
                                       f"{format_timestamp(since)} to {format_timestamp(until)}")
    return Plan(Proposal(policy, echoed, tiers, prices), models, since, until, seed, iterations, confidence, unit,
                requests)


# --- status --------------------------------------------------------------------------------------


def result_status(result: Mapping[str, Any]) -> dict[str, Any]:
    """The status fields of a replay's result: its summary, intervals, digest and caveats, every key in camelCase
    as in any Kubernetes API (``savings_pct`` → ``savingsPct``). The result itself, as ``promptcache replay``
    prints it and the digest covers it, stays snake_case: it is what the report ConfigMap holds."""
    return {key: _camel(result[key]) for key in ("summary", "intervals", "digest", "caveats")}


def _camel(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {re.sub(r"_([a-z0-9])", lambda m: m[1].upper(), key): _camel(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_camel(item) for item in value]
    return value


class _Status:
    """Writes the phases of one generation's run; each write's conditions merge onto the previous ones."""

    def __init__(self, kube: Kube, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        self.kube, self.namespace, self.name = kube, str(meta["namespace"]), str(meta["name"])
        self.generation = int(meta.get("generation") or 0)
        self.conditions = (obj.get("status") or {}).get("conditions")

    async def write(self, phase: str, conditions: Sequence[Condition], **fields: Any) -> None:
        self.conditions = merge(self.conditions, conditions, self.generation)
        await self.kube.patch_resource_status(REPLAYS, self.namespace, self.name, {
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
        live = await self.kube.get_resource(REPLAYS, self.namespace, self.name)
        return live is not None and live["metadata"].get("generation") == self.generation


def _body(obj: Mapping[str, Any]) -> kopf.Body:
    """kopf's view of a resource, to own objects and be the subject of events."""
    return kopf.Body(cast(kopf.RawBody, dict(obj)))


def _done(obj: Mapping[str, Any]) -> bool:
    status = obj.get("status") or {}
    return status.get("observedGeneration") == obj["metadata"].get("generation") and status.get("phase") in TERMINAL


# --- running -------------------------------------------------------------------------------------


async def execute(obj: Mapping[str, Any], plan: Plan, kube: Kube, conn: asyncpg.Connection[asyncpg.Record],
                  status: _Status) -> Event | None:
    """Replay, then write the report ConfigMap and the final status; None when the spec moved on meanwhile."""
    try:
        sim = await rows.from_postgres(conn, plan.since, plan.until, plan.models,
                                       lambda requests: simulate(requests, plan.proposal, plan.unit))
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
        **result_status(result), reportConfigMap=configmap["metadata"]["name"], finishedAt=now_rfc3339())
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
            except SpecError as exc:
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
    obj = await kube.get_resource(REPLAYS, meta["namespace"], owner["name"])
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


def _api_message(exc: ApiException) -> str:
    """The API server's own words (e.g. which request RBAC refused), for the pod's log."""
    try:
        message = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        return ""
    return f": {message}" if message else ""


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
        obj = await kube.get_resource(REPLAYS, namespace, name)
        if obj is None or _done(obj):
            print(f"{where}: {'does not exist' if obj is None else 'already ran'}; nothing to do")
            return 0
        status = _Status(kube, obj)
        event: Event | None
        conn = await asyncpg.connect(database_url)
        try:
            try:
                plan = await resolve(obj, kube, conn, datetime.now(UTC))
            except SpecError as exc:
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
        print(f"{where}: Kubernetes API error {exc.status}: {exc.reason}{_api_message(exc)}", file=sys.stderr)
        return 1
    finally:
        kube.close()
