"""Reconcile a DeployedModel (docs/design.md#reconciliation): config, Deployment, Service, tariff, and its status.

Level-based: every run computes the objects that should exist from the spec and the policy,
converges the live ones onto them and reports what it found, so a run interrupted anywhere
is repaired by the next.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kopf
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from promptcache.operator.constants import MODEL_LABEL, MODELS, POLICIES
from promptcache.operator.errors import SpecError
from promptcache.operator.handlers import manifests, podguards, proxypods, replicas, secretcopies, serverpolicy
from promptcache.operator.handlers.conditions import Condition, merge
from promptcache.operator.handlers.kube import Kube
from promptcache.operator.handlers.outcome import Outcome, Stalled
from promptcache.operator.handlers.render import policy_key, render
from promptcache.proxy import policybus
from promptcache.proxy.domain.pricing import Tariff
from promptcache.proxy.storage.errors import IndexUnavailable
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.tariffs import Tariffs

_log = logging.getLogger(__name__)
STALLED_REASONS = ("CachePolicyNotFound", "InvalidSpec", "SecretNotFound")
"""A stalled model's Ready is about its spec, not its pods: Deployment events leave it alone."""


def deployment_ready(deployment: Mapping[str, Any] | None) -> Condition:
    """Ready follows the Deployment: every desired replica updated and available, and no older pod left (an old pod
    available beside a new one that is not would otherwise pass for the new config)."""
    if deployment is None:
        return Condition("Ready", False, "DeploymentMissing", "the proxy Deployment does not exist yet")
    want = (deployment.get("spec") or {}).get("replicas", 1)
    status = deployment.get("status") or {}
    available = status.get("availableReplicas", 0) or 0
    updated = status.get("updatedReplicas", 0) or 0
    total = status.get("replicas", 0) or 0
    if want == 0:
        return Condition("Ready", False, "ScaledToZero", "spec.proxy.replicas is 0")
    if available >= want and updated >= want and total <= want:
        return Condition("Ready", True, "DeploymentAvailable", f"{available}/{want} proxy replicas available")
    return Condition("Ready", False, "DeploymentProgressing", f"{available}/{want} proxy replicas available")


def policy_name(spec: Mapping[str, Any]) -> str:
    return str((spec.get("cachePolicyRef") or {}).get("name") or "")


async def reconcile(body: kopf.Body, kube: Kube, pg: Database | None, redis: aioredis.Redis | None,
                    settings: manifests.OperatorSettings,
                    endpoints: Mapping[tuple[str, str], Iterable[Mapping[str, Any]]]) -> Outcome:
    """The policy is read from the API, not a cache: reconciles of one model run one after another,
    so each writes a tariff from a policy at least as new as the previous one's. ``endpoints``: each Service's
    EndpointSlices, for a model that routes."""
    namespace, name = body.metadata.namespace or "default", body.metadata.name or ""
    spec = dict(body.spec)
    generation = body.metadata.get("generation")
    current = body.status.get("conditions")
    policy_ref = policy_name(spec)
    policy_obj = await kube.get_resource(POLICIES, namespace, policy_ref) if policy_ref else None
    policy = (policy_obj or {}).get("spec") if policy_obj else None
    if policy is None:
        raise Stalled("CachePolicyNotFound", f"CachePolicy {namespace}/{policy_ref} does not exist")
    try:
        serverpolicy.check(spec, settings.server_security, namespace, settings.server_secrets)
        service = replicas.routed(namespace, spec)
        rendered = render(namespace, name, spec, policy_ref, policy)
        guards = podguards.guards(name, namespace, spec, rendered.config.auth.mode, settings)
        objects = [manifests.config_map(name, namespace, rendered), manifests.service(name, namespace),
                   manifests.deployment(name, namespace, spec, rendered, settings)]
    except SpecError as exc:
        raise Stalled(exc.reason, str(exc)) from exc
    kopf.adopt(objects + guards.objects(), owner=body)
    changes = await secretcopies.copy_into(kube, namespace, settings)  # before the pods that read them
    # The NetworkPolicy first: pods never run before the policy that guards them applies.
    changes += await podguards.converge(kube, name, namespace, body.metadata.uid or "", guards)
    changes += [await kube.converge(obj) for obj in objects]
    model = rendered.config.models[spec["alias"]]
    tariff_version: int | None = None
    if pg is not None:
        wanted = Tariff.for_policy(model.alias, model.input_per_mtok, model.output_per_mtok, model.policy)
        try:
            tariff_version = (await Tariffs(pg).set(wanted, datetime.now(UTC))).version
        except IndexUnavailable as exc:
            raise kopf.TemporaryError(f"cannot record the tariff, Postgres unavailable: {exc}", delay=10) from exc
        known = ((policy_obj or {}).get("status") or {}).get("tariffVersions") or {}
        if known.get(model.alias) != tariff_version:
            await kube.patch_resource_status(POLICIES, namespace, policy_ref,
                                             {"tariffVersions": {model.alias: tariff_version}})
    if redis is not None:
        with contextlib.suppress(RedisError, OSError):  # proxies re-read tariffs on their own timer too
            await policybus.publish(redis, settings.redis_prefix, policy_key(namespace, policy_ref),
                                    {k: v for k, v in policy.items() if k != "redis"})
    ready = deployment_ready(await kube.deployment(namespace, manifests.names(name)["deployment"]))
    rejected = proxypods.first_rejection(await kube.pods(namespace, manifests.selector(name)), rendered.checksum)
    conditions = proxypods.stalled(rejected) if rejected else [
        ready, Condition("Stalled", False, "Reconciled", ""),
        Condition("Reconciling", not ready.status, ready.reason, ready.message)]
    status = {
        "observedGeneration": generation,
        "conditions": merge(current, conditions, generation),
        "endpoint": manifests.endpoint(name, namespace, model.upstream.apis[0]),
        "endpoints": {api: manifests.endpoint(name, namespace, api) for api in model.upstream.apis},
        "configChecksum": rendered.checksum,
        "mode": "sidecar" if rendered.sidecar else "gateway",
    }
    if tariff_version is not None:
        status["tariffVersion"] = tariff_version
    if service is not None:
        status["replicas"] = await replicas.follow(kube, redis, settings.redis_prefix, namespace, name, service,
                                                   endpoints.get((service.namespace, service.name), []))
    outcome = Outcome(status, conditions=conditions)
    if rejected and _stalled_message(current) != rejected:
        outcome.events.append(("Warning", "InvalidSpec", rejected))
    if "created" in changes or "updated" in changes or body.status.get("configChecksum") != rendered.checksum:
        outcome.events.append(
            ("Normal", "Rendered", f"proxy config {rendered.checksum[:12]} applied ({status['mode']} mode)"))
    return outcome


def _condition(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def _stalled_message(conditions: list[dict[str, Any]] | None) -> str | None:
    stalled = _condition(conditions or [], "Stalled")
    return str(stalled.get("message")) if stalled and stalled.get("status") == "True" else None


async def deployment_changed(deployment: kopf.Body, kube: Kube) -> None:
    """Ready and Reconciling follow the owned Deployment, unless the model is stalled on its spec. A model its pods
    stalled (they refused the config) recovers once the Deployment is complete: the config loads after all."""
    namespace, model = deployment.metadata.namespace or "default", deployment.metadata.labels[MODEL_LABEL]
    owner = await kube.get_resource(MODELS, namespace, model)
    if owner is None or (owner.get("status") or {}).get("observedGeneration") is None:
        return
    current = owner["status"].get("conditions") or []
    ready = deployment_ready(dict(deployment))
    before = _condition(current, "Ready")
    unchanged = before is not None and before.get("reason") == ready.reason and \
        before.get("status") == ("True" if ready.status else "False")
    rejected = before is not None and before.get("reason") == proxypods.REJECTED
    if unchanged or (before is not None and before.get("reason") in STALLED_REASONS) or (rejected and not ready.status):
        return
    generation = owner["metadata"].get("generation")
    updates = [ready, Condition("Reconciling", not ready.status, ready.reason, ready.message)]
    if rejected:
        updates.append(Condition("Stalled", False, "Reconciled", ""))
    conditions = merge(current, updates, generation)
    await kube.patch_resource_status(MODELS, namespace, model, {"conditions": conditions})
    kopf.event(kopf.Body(cast(kopf.RawBody, owner)), type="Normal", reason="Ready" if ready.status else "NotReady",
               message=ready.message)


async def proxy_pod_changed(pod: kopf.Body, kube: Kube) -> None:
    """A pod of the model's current config whose proxy refused it stalls the model, with the proxy's reason."""
    message = proxypods.rejection(dict(pod))
    if message is None:
        return
    namespace, model = pod.metadata.namespace or "default", pod.metadata.labels[MODEL_LABEL]
    owner = await kube.get_resource(MODELS, namespace, model)
    status = (owner or {}).get("status") or {}
    if owner is None or status.get("configChecksum") != proxypods.checksum(dict(pod)):
        return
    current = status.get("conditions") or []
    if _stalled_message(current) == message:
        return
    conditions = merge(current, proxypods.stalled(message), owner["metadata"].get("generation"))
    await kube.patch_resource_status(MODELS, namespace, model, {"conditions": conditions})
    kopf.event(kopf.Body(cast(kopf.RawBody, owner)), type="Warning", reason="InvalidSpec", message=message)


async def deleted(kube: Kube, pg: Database | None, namespace: str, spec: Mapping[str, Any]) -> None:
    await close_tariff(pg, spec)
    await forget_tariff(kube, namespace, spec)


async def forget_tariff(kube: Kube, namespace: str, spec: Mapping[str, Any]) -> None:
    """Remove a deleted model's entry from its policy's ``status.tariffVersions`` (merge patch: null deletes)."""
    ref, alias = policy_name(spec), spec.get("alias")
    if ref and alias and await kube.get_resource(POLICIES, namespace, ref) is not None:
        await kube.patch_resource_status(POLICIES, namespace, ref, {"tariffVersions": {alias: None}})


async def close_tariff(pg: Database | None, spec: Mapping[str, Any]) -> None:
    if pg is not None and spec.get("alias"):
        await Tariffs(pg).close(str(spec["alias"]), datetime.now(UTC))
