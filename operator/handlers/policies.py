"""Reconcile a CachePolicy (docs/design.md#reconciliation): Redis settings, publication, and the bound models' turn.

The Redis announcement makes a change take effect in running proxies at once; touching the
bound models makes each reconcile again, which writes its new tariff version (announced again,
so proxies re-read it) and re-renders its ConfigMap for proxies that start later.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from promptcache.operator.constants import MODELS, REVISION_ANNOTATION
from promptcache.operator.handlers.conditions import Condition, merge
from promptcache.operator.handlers.kube import Kube
from promptcache.operator.handlers.outcome import Outcome, Stalled
from promptcache.operator.handlers.render import policy_key
from promptcache.proxy import policybus
from promptcache.proxy.domain.policy import CachePolicy, PolicyError

ModelsByPolicy = kopf.Index[tuple[str | None, str], tuple[str, dict[str, Any]]]
"""kopf's index of DeployedModels by the policy they name: ``(namespace, policy) -> (model, spec)``."""


async def configure_redis(client: aioredis.Redis, redis_spec: Mapping[str, Any]) -> tuple[bool, str]:
    """CONFIG SET maxmemory / maxmemory-policy; a server that refuses CONFIG is reported, not fatal."""
    settings = {}
    if redis_spec.get("maxMemory"):
        settings["maxmemory"] = str(redis_spec["maxMemory"]).lower()
    if redis_spec.get("evictionPolicy"):
        settings["maxmemory-policy"] = str(redis_spec["evictionPolicy"])
    if not settings:
        return True, "no Redis settings requested"
    try:
        for key, value in settings.items():
            await client.config_set(key, value)
    except ResponseError as exc:
        return False, f"Redis refused CONFIG SET: {exc}"
    except (RedisError, OSError) as exc:
        return False, f"Redis unreachable: {exc}"
    return True, ", ".join(f"{k}={v}" for k, v in settings.items())


async def reconcile(body: kopf.Body, models_by_policy: ModelsByPolicy, kube: Kube, redis: aioredis.Redis | None,
                    redis_prefix: str) -> Outcome:
    """Apply the policy, then touch every bound model so it reconciles against it.

    Tariffs are written by the bound models' own reconciles (which this change triggers), one
    writer per model, so versions follow the policy's generations in order. A bad spec stalls the
    policy, and its models are touched all the same: each stalls on the policy it can no longer render.
    """
    namespace, name = body.metadata.namespace or "default", body.metadata.name or ""
    generation = body.metadata.get("generation")
    bound = dict(models_by_policy.get((namespace, name), []))
    try:
        return await _apply(namespace, name, dict(body.spec), generation, body.status.get("conditions"), bound,
                            redis, redis_prefix)
    finally:
        await touch(kube, namespace, bound, str(generation))


async def deleted(event_type: str, body: kopf.Body, models_by_policy: ModelsByPolicy, kube: Kube) -> None:
    """A deleted policy's models reconcile again, and find it missing."""
    if event_type != "DELETED":
        return
    namespace, name = body.metadata.namespace or "default", body.metadata.name or ""
    await touch(kube, namespace, dict(models_by_policy.get((namespace, name), [])), f"deleted-{body.metadata.uid}")


async def touch(kube: Kube, namespace: str, bound: Mapping[str, Any], revision: str) -> None:
    for model in sorted(bound):
        annotations = {REVISION_ANNOTATION: revision}
        await kube.patch_resource(MODELS, namespace, model, {"metadata": {"annotations": annotations}})


async def _apply(namespace: str, name: str, spec: Mapping[str, Any], generation: int | None,
                 current: Any, bound: Mapping[str, Mapping[str, Any]], redis: aioredis.Redis | None,
                 redis_prefix: str) -> Outcome:
    try:
        CachePolicy.from_spec(spec)
    except PolicyError as exc:
        raise Stalled("InvalidSpec", str(exc)) from exc
    events: list[tuple[str, str, str]] = []
    status: dict[str, Any] = {"observedGeneration": generation, "boundModels": sorted(bound)}
    conditions = [Condition("Ready", True, "Applied", f"bound to {len(bound)} model(s)"),
                  Condition("Reconciling", False, "Applied", ""), Condition("Stalled", False, "Applied", "")]
    if redis is not None:
        applied, message = await configure_redis(redis, spec.get("redis") or {})
        status.update(redisApplied=applied, redisMessage=message)
        conditions.append(Condition("RedisConfigured", applied, "Applied" if applied else "ConfigRefused", message))
        if not applied:
            events.append(("Warning", "RedisConfigRefused", message))
        try:
            await policybus.publish(redis, redis_prefix, policy_key(namespace, name),
                                    {k: v for k, v in spec.items() if k != "redis"})
        except (RedisError, OSError) as exc:
            message = f"proxies will see the change on their next config reload: {exc}"
            events.append(("Warning", "PublishFailed", message))
    status["conditions"] = merge(current, conditions, generation)
    return Outcome(status, events, conditions)
