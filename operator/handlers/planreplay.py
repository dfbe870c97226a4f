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
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import kopf
import kubernetes
from kubernetes.client import ApiException

from promptcache.operator.constants import (
    GENERATION_ANNOTATION,
    MODELS,
    PLAN_ENV,
    POLICIES,
    REPLAY_APP,
    REPLAYS,
    SHARDS_ANNOTATION,
)
from promptcache.operator.errors import SpecError
from promptcache.operator.handlers import manifests, secretcopies
from promptcache.operator.handlers.conditions import Condition, merge, now_rfc3339, stalled
from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.kube import Kube
from promptcache.operator.handlers.outcome import Event, Stalled
from promptcache.operator.replay import proposal, rows
from promptcache.operator.replay.engine import (
    REQUESTS,
    Partial,
    ReplayError,
    Simulation,
    accumulate,
    canonical,
    finish,
    report,
    simulate,
)
from promptcache.operator.replay.proposal import Proposal
from promptcache.operator.replay.wire import WireError, decode, encode
from promptcache.proxy.domain.policy import CachePolicy
from promptcache.proxy.storage.requestlog import count_rows, format_timestamp

TERMINAL = ("Succeeded", "Failed")
REDUCE_RETRY = 30.0
"""Seconds between attempts to read a completed sharded Job's sums while Postgres is unavailable."""
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
    parallelism: int = 1

    @property
    def window(self) -> str:
        return f"{format_timestamp(self.since)}/{format_timestamp(self.until)}"

    def resolved(self, generation: int) -> str:
        """The plan as a spec that needs no cluster and no clock (the policy inline, the window absolute), with
        the request count and the generation it is of: what a sharded run's pods are given, so that every shard
        and the operator's sum of them replay the same proposal over the same window (:func:`from_resolved`)."""
        p = self.proposal
        spec = {
            "models": list(self.models),
            "window": {"start": format_timestamp(self.since), "end": format_timestamp(self.until)},
            "policy": dict(p.spec), "tierOverride": dict(p.tier_override),
            "pricingOverrides": {m: {"inputPerMTok": str(i), "outputPerMTok": str(o)}
                                 for m, (i, o) in sorted(p.price_overrides.items())},
            "bootstrap": {"seed": self.seed, "iterations": self.iterations, "confidence": self.confidence,
                          "unit": self.unit},
            "parallelism": self.parallelism,
        }
        return canonical({"spec": spec, "requests": self.requests, "generation": generation})


MAX_PARALLELISM = 64


def parallelism(spec: Mapping[str, Any]) -> int:
    """``parallelism``: how many pods a Job's run is split across (1: one pod, which writes the status itself)."""
    value = spec.get("parallelism", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARALLELISM:
        raise SpecError("InvalidSpec", f"parallelism must be an integer from 1 to {MAX_PARALLELISM}, got {value!r}")
    return value


def _plan(spec: Mapping[str, Any], now: datetime, policy: tuple[CachePolicy, dict[str, Any]],
          requests: int) -> Plan:
    """What needs no cluster: the fields ``resolve`` and :func:`from_resolved` both parse."""
    models = proposal.models(spec)
    since, until = proposal.window(spec, now)
    seed, iterations, confidence, unit = proposal.bootstrap(spec)
    tiers = proposal.tier_override(spec.get("tierOverride"))
    prices = proposal.price_overrides(spec.get("pricingOverrides"), models)
    return Plan(Proposal(policy[0], policy[1], tiers, prices), models, since, until, seed, iterations, confidence,
                unit, requests, parallelism(spec))


def from_resolved(text: str) -> tuple[Plan, int]:
    """The plan :meth:`Plan.resolved` wrote, and its generation; :class:`SpecError` for anything else."""
    try:
        document = json.loads(text)
        spec, requests, generation = document["spec"], document["requests"], document["generation"]
        return _plan(spec, datetime.now(UTC), proposal.policy(spec["policy"], "policy"), int(requests)), \
            int(generation)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SpecError("InvalidPlan", f"{PLAN_ENV} is not a resolved replay plan: {exc!r}") from None


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
    plan = _plan(spec, now, await _policy(spec, namespace, kube), 0)
    await _check_models(plan.models, namespace, kube)
    requests = await count_rows(conn, plan.since, plan.until, plan.models)
    if requests == 0:
        raise SpecError("EmptyWindow", f"no 2xx requests of {', '.join(plan.models)} were logged from "
                                       f"{plan.window.replace('/', ' to ')}")
    return replace(plan, requests=requests)


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
    except ReplayError as exc:  # a cost sum beyond exact arithmetic
        return await status.fail("ReplayFailed", str(exc)) if await status.current() else None
    return await publish(obj, plan, sim, kube, status)


async def publish(obj: Mapping[str, Any], plan: Plan, sim: Simulation, kube: Kube, status: _Status) -> Event | None:
    """Bootstrap the simulation, then write the report ConfigMap and the final status; None when the spec moved
    on meanwhile."""
    try:
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
            if (plan.requests > config.inline_replay_max_requests or plan.parallelism > 1) \
                    and config.manifests.database_secret:
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
    """Hand the run to a Job; it writes the final status itself, or its shards' sums for the operator to add up.
    The status says Running before the Job exists, so no pod finds its resource not yet running; an existing Job
    of this generation is kept (the operator restarted after creating it)."""
    job = manifests.replay_job(status.name, status.namespace, status.generation, settings,
                               plan.resolved(status.generation), plan.parallelism)
    kopf.adopt(job, owner=_body(obj))
    message = f"replaying {plan.requests} requests from {plan.window} in Job {job['metadata']['name']}"
    if plan.parallelism > 1:
        message += f", {plan.parallelism} shards"
    if create:
        try:
            await secretcopies.copy_into(kube, status.namespace, settings)  # the DSN its pods read
        except Stalled as exc:
            return await status.fail(exc.reason, exc.message)
    await status.progress("Running", "JobRunning", message, startedAt=now_rfc3339())
    if create:
        await kube.create(job)
    return ("Normal", "JobStarted", message)


async def job_changed(job: Mapping[str, Any], kube: Kube, config: OperatorConfig) -> tuple[kopf.Body, Event] | None:
    """A replay Job of the generation its PlanReplay is Running: out of retries, it fails the PlanReplay (which
    would otherwise stay Running); a sharded one complete, the operator adds up its shards and writes the result.
    Returns the PlanReplay and the event to post about it."""
    conditions = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or []
                  if c.get("status") == "True"}
    meta = job["metadata"]
    annotations = meta.get("annotations") or {}
    sharded = SHARDS_ANNOTATION in annotations
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("kind") == "PlanReplay"), None)
    if owner is None or not ("Failed" in conditions or (sharded and "Complete" in conditions)):
        return None
    obj = await kube.get_resource(REPLAYS, meta["namespace"], owner["name"])
    if obj is None or obj["metadata"].get("uid") != owner.get("uid"):
        return None
    current = obj.get("status") or {}
    ran = {str(current.get("observedGeneration")), str(obj["metadata"].get("generation"))}
    if current.get("phase") != "Running" or ran != {annotations.get(GENERATION_ANNOTATION)}:
        return None  # the Job is of another generation, or its outcome is already written
    status = _Status(kube, obj)
    failed = conditions.get("Failed")
    if failed is not None:
        detail = ": ".join(str(part) for part in (failed.get("reason"), failed.get("message")) if part)
        return _body(obj), await status.fail("JobFailed", f"Job {meta['name']} failed: {detail or 'no reason given'}")
    while True:  # a watch event is not retried by kopf: the sums wait in Postgres until it is back
        try:
            event = await _reduce(obj, job, kube, config, status)
            return (_body(obj), event) if event is not None else None
        except DB_ERRORS as exc:
            await status.progress("Running", "DatabaseUnavailable", f"the shards' sums are unavailable, retrying in "
                                                                    f"{REDUCE_RETRY:g} s: {exc}")
        await asyncio.sleep(REDUCE_RETRY)
        if not await status.current():
            return None


async def _reduce(obj: Mapping[str, Any], job: Mapping[str, Any], kube: Kube, config: OperatorConfig,
                  status: _Status) -> Event | None:
    """Add up a completed sharded Job's sums, bootstrap and write the result; the shards' rows are deleted after."""
    [container] = job["spec"]["template"]["spec"]["containers"]
    try:
        plan, _ = from_resolved(next(e["value"] for e in container.get("env") or [] if e.get("name") == PLAN_ENV))
    except (StopIteration, SpecError) as exc:
        return await status.fail("InvalidPlan", f"Job {job['metadata']['name']} has no resolved plan: {exc!r}")
    uid = str(obj["metadata"]["uid"])
    if not config.database_url:
        return await status.fail("DatabaseNotConfigured", "the operator has no PROMPTCACHE_DATABASE_URL to read "
                                                          "the shards' sums from")
    conn = await asyncpg.connect(config.database_url)
    try:
        written = await conn.fetch("SELECT shard, sums FROM replay_shards WHERE replay_uid = $1 AND generation = $2 "
                                   "ORDER BY shard", uid, status.generation)
        missing = sorted(set(range(plan.parallelism)) - {row["shard"] for row in written})
        if missing:
            return await status.fail("ShardMissing", f"Job {job['metadata']['name']} completed, but shard(s) "
                                                     f"{', '.join(map(str, missing))} of {plan.parallelism} wrote "
                                                     "no sums")
        try:
            sim = await asyncio.to_thread(_total, [bytes(row["sums"]) for row in written], plan.proposal)
        except (WireError, ReplayError) as exc:
            return await status.fail("ShardUnreadable", str(exc))
        event = await publish(obj, plan, sim, kube, status)
        await conn.execute("DELETE FROM replay_shards WHERE replay_uid = $1 AND generation <= $2", uid,
                           status.generation)
        return event
    finally:
        await conn.close()


def _total(shards: Sequence[bytes], proposal: Proposal) -> Simulation:
    total = Partial()
    for data in shards:
        total.add(decode(data))
    return finish(total, proposal)


# --- the Job's side ------------------------------------------------------------------------------


def _api_message(exc: ApiException) -> str:
    """The API server's own words (e.g. which request RBAC refused), for the pod's log."""
    try:
        message = json.loads(exc.body or "").get("message")
    except (ValueError, AttributeError):
        return ""
    return f": {message}" if message else ""


def run_job(namespace: str, name: str, shard: int | None = None) -> int:
    """Run the PlanReplay's current generation and patch its status, as a replay Job's pod does; with ``shard``,
    as a sharded Job's pod does: sum that shard of the plan in ``$PROMPTCACHE_REPLAY_PLAN`` into Postgres.

    0 once an outcome is written (Succeeded or Failed, or a shard's sums: running again would not change it) or
    there is nothing to do; 1 when Postgres or the API failed, so the Job retries the pod.
    """
    return asyncio.run(_run_job(namespace, name, shard))


async def _run_job(namespace: str, name: str, shard: int | None) -> int:
    database_url = os.environ.get("PROMPTCACHE_DATABASE_URL")
    if not database_url:
        print("PROMPTCACHE_DATABASE_URL is not set: the replay reads the request log from Postgres", file=sys.stderr)
        return 1
    plan: tuple[Plan, int] | None = None
    if shard is not None:
        try:
            plan = from_resolved(os.environ.get(PLAN_ENV, ""))
        except SpecError as exc:
            print(exc, file=sys.stderr)
            return 1
        if shard >= plan[0].parallelism:
            print(f"shard {shard} does not exist: the plan has {plan[0].parallelism}", file=sys.stderr)
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
            if plan is not None and shard is not None:
                return await _sum_shard(obj, *plan, shard, conn, status, where)
            try:
                resolved = await resolve(obj, kube, conn, datetime.now(UTC))
            except SpecError as exc:
                event = await status.fail(exc.reason, str(exc))
            else:
                event = await execute(obj, resolved, kube, conn, status)
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


async def _sum_shard(obj: Mapping[str, Any], plan: Plan, generation: int, shard: int,
                     conn: asyncpg.Connection[asyncpg.Record], status: _Status, where: str) -> int:
    """One shard's exact sums into ``replay_shards``; the operator adds them up once the Job completes."""
    label = f"{where}: shard {shard} of {plan.parallelism}"
    if (obj.get("status") or {}).get("phase") != "Running" or status.generation != generation:
        print(f"{label}: the resource is not running this generation; nothing to do")
        return 0
    try:
        partial = await rows.from_postgres(conn, plan.since, plan.until, plan.models,
                                           lambda requests: accumulate(requests, plan.proposal, plan.unit),
                                           (shard, plan.parallelism))
    except ReplayError as exc:
        await status.fail("ReplayFailed", f"{label}: {exc}")
        print(f"{label}: {exc}", file=sys.stderr)
        return 0
    requests = sum(cell[REQUESTS] for cell in partial.cells.values())
    await conn.execute("INSERT INTO replay_shards (replay_uid, generation, shard, shards, requests, sums) "
                       "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING", str(obj["metadata"]["uid"]),
                       status.generation, shard, plan.parallelism, requests, encode(partial))
    print(f"{label}: summed {requests} requests")
    return 0
