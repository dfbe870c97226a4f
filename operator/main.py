"""The operator's kopf handlers. Only registration lives here; the logic is in the domain modules.

Importing this module registers the handlers with kopf's default registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf
import redis.asyncio as aioredis

from promptcache.operator.handlers import housekeeping, models, planreplay, policies
from promptcache.operator.handlers.conditions import Condition, merge
from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.kube import GROUP, VERSION, Kube
from promptcache.operator.handlers.manifests import MODEL_LABEL, REPLAY_APP
from promptcache.proxy.storage.postgres import PostgresIndex
from promptcache.proxy.storage.schema import migrate

MODELS = "deployedmodels"
POLICIES = "cachepolicies"
REPLAYS = "planreplays"
FINALIZER = "promptcache.io/finalizer"
STALLED_REASONS = ("CachePolicyNotFound", "InvalidSpec")
"""A stalled model's Ready is about its spec, not its pods: Deployment events leave it alone."""


@kopf.on.startup()
async def startup(*, settings: kopf.OperatorSettings, memo: Any, logger: Any, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="promptcache.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="promptcache.io", key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # kopf's per-handler chatter stays out of events; we post transitions
    config: OperatorConfig = memo.get("config") or OperatorConfig.from_env()
    memo.config = config
    memo.pg = None
    if config.database_url:
        applied = await migrate(config.database_url)
        logger.info("schema migrations applied: %s", applied or "none pending")
        # Longer waits than a proxy's: a burst of reconciles may queue for connections, and that is fine here.
        memo.pg = await PostgresIndex.connect(config.database_url, acquire_timeout=30.0, command_timeout=30.0)
        memo.housekeeping = asyncio.create_task(housekeeping.loop(memo.pg, config.housekeeping))
    memo.redis = aioredis.Redis.from_url(config.redis_url) if config.redis_url else None
    memo.kube = Kube.connect()


@kopf.on.cleanup()
async def cleanup(*, memo: Any, **_: Any) -> None:
    task = memo.get("housekeeping")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if memo.get("pg") is not None:
        await memo.pg.close()
    if memo.get("redis") is not None:
        await memo.redis.aclose()
    if memo.get("kube") is not None:
        memo.kube.close()


@kopf.index(GROUP, VERSION, MODELS)
def models_by_policy(*, namespace: str | None, name: str, spec: kopf.Spec,
                     **_: Any) -> dict[tuple[str | None, str], tuple[str, dict[str, Any]]]:
    return {(namespace, models.policy_name(spec)): (name, dict(spec))}


def _post(body: kopf.Body, event: tuple[str, str, str] | None) -> None:
    if event is not None:
        kopf.event(body, type=event[0], reason=event[1], message=event[2])


@kopf.on.resume(GROUP, VERSION, MODELS)
@kopf.on.create(GROUP, VERSION, MODELS)
@kopf.on.update(GROUP, VERSION, MODELS)
async def reconcile_model(*, body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any) -> None:
    outcome = await models.reconcile(body, memo.kube, memo.pg, memo.redis, memo.config.manifests)
    patch.status.update(outcome.status)
    _post(body, outcome.event)


@kopf.on.delete(GROUP, VERSION, MODELS, retries=3, backoff=5)
async def model_deleted(*, spec: kopf.Spec, namespace: str | None, memo: Any, **_: Any) -> None:
    """Close the model's tariff and drop it from its policy's status; owned objects go by garbage collection."""
    await models.close_tariff(memo.pg, spec)
    await models.forget_tariff(memo.kube, namespace or "default", spec)


@kopf.on.event("apps", "v1", "deployments", labels={MODEL_LABEL: kopf.PRESENT})
async def deployment_changed(*, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Ready follows the owned Deployment's availability."""
    namespace, model = body.metadata.namespace or "default", body.metadata.labels[MODEL_LABEL]
    owner = await memo.kube.get_resource(MODELS, namespace, model)
    if owner is None or (owner.get("status") or {}).get("observedGeneration") is None:
        return
    current = owner["status"].get("conditions") or []
    ready = models.deployment_ready(dict(body))
    before = next((c for c in current if c.get("type") == "Ready"), None)
    unchanged = before is not None and before.get("reason") == ready.reason and \
        before.get("status") == ("True" if ready.status else "False")
    if unchanged or (before is not None and before.get("reason") in STALLED_REASONS):
        return
    generation = owner["metadata"].get("generation")
    reconciling = Condition("Reconciling", not ready.status, ready.reason, ready.message)
    conditions = merge(current, [ready, reconciling], generation)
    await memo.kube.patch_resource_status(MODELS, namespace, model, {"conditions": conditions})
    kopf.event(owner, type="Normal", reason="Ready" if ready.status else "NotReady", message=ready.message)


@kopf.on.resume(GROUP, VERSION, POLICIES)
@kopf.on.create(GROUP, VERSION, POLICIES)
@kopf.on.update(GROUP, VERSION, POLICIES)
async def reconcile_policy(*, body: kopf.Body, patch: kopf.Patch, memo: Any, **kwargs: Any) -> None:
    models_by_policy: kopf.Index[tuple[str | None, str], tuple[str, dict[str, Any]]] = kwargs["models_by_policy"]
    namespace, name = body.metadata.namespace or "default", body.metadata.name or ""
    bound = dict(models_by_policy.get((namespace, name), []))
    outcome = await policies.reconcile(
        namespace, name, dict(body.spec), body.metadata.get("generation"), body.status.get("conditions"),
        bound, memo.redis, memo.config.manifests.redis_prefix)
    patch.status.update(outcome.status)
    for event in outcome.events:
        _post(body, event)
    await _touch_dependants(memo.kube, namespace, bound, str(body.metadata.get("generation")))


@kopf.on.event(GROUP, VERSION, POLICIES)
async def policy_deleted(*, type: str, body: kopf.Body, memo: Any, **kwargs: Any) -> None:
    """Bound models go Stalled (CachePolicyNotFound) until the policy is back.

    A watch event, not a delete handler: policies carry no finalizer, so nothing blocks their deletion.
    """
    if type != "DELETED":
        return
    models_by_policy: kopf.Index[tuple[str | None, str], tuple[str, dict[str, Any]]] = kwargs["models_by_policy"]
    namespace, name = body.metadata.namespace or "default", body.metadata.name or ""
    await _touch_dependants(memo.kube, namespace, dict(models_by_policy.get((namespace, name), [])),
                            f"deleted-{body.metadata.uid}")


async def _touch_dependants(kube: Kube, namespace: str, bound: dict[str, Any], revision: str) -> None:
    for model in sorted(bound):
        annotations = {policies.REVISION_ANNOTATION: revision}
        await kube.patch_resource(MODELS, namespace, model, {"metadata": {"annotations": annotations}})


@kopf.on.resume(GROUP, VERSION, REPLAYS)
@kopf.on.create(GROUP, VERSION, REPLAYS)
@kopf.on.update(GROUP, VERSION, REPLAYS)
async def run_replay(*, body: kopf.Body, memo: Any, **_: Any) -> None:
    """Small windows replay here (the engine off the event loop), large ones in a Job. kopf calls this only for
    spec or metadata changes, and the run itself skips a generation that already ran."""
    _post(body, await planreplay.reconcile(dict(body), memo.kube, memo.config))


@kopf.on.event("batch", "v1", "jobs", labels={"app.kubernetes.io/name": REPLAY_APP})
async def replay_job_changed(*, body: kopf.Body, memo: Any, **_: Any) -> None:
    """A replay Job that failed for good fails its PlanReplay, which would otherwise stay Running."""
    failed = await planreplay.job_failed(dict(body), memo.kube)
    if failed is not None:
        _post(*failed)
