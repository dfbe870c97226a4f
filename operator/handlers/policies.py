"""Reconcile a CachePolicy (SPEC §11): Redis settings, publication, and the bound models' turn.

The Redis announcement makes a change take effect in running proxies at once; touching the
bound models makes each reconcile again, which writes its new tariff version (announced again,
so proxies re-read it) and re-renders its ConfigMap for proxies that start later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from promptcache.operator.handlers.conditions import Condition, merge, stalled
from promptcache.operator.handlers.render import policy_key
from promptcache.proxy import policybus
from promptcache.proxy.domain.policy import CachePolicy, PolicyError

REVISION_ANNOTATION = "policy.promptcache.io/revision"
"""Set on bound DeployedModels when their policy changes, so kopf re-runs their reconcile. Outside the
``promptcache.io/`` prefix on purpose: kopf keeps its own state there and leaves it out of the diffs."""


@dataclass
class PolicyOutcome:
    status: dict[str, Any]
    events: list[tuple[str, str, str]]
    valid: bool


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


async def reconcile(namespace: str, name: str, spec: Mapping[str, Any], generation: int | None,
                    current: Iterable[Mapping[str, Any]] | None, bound: Mapping[str, Mapping[str, Any]],
                    redis: aioredis.Redis | None, redis_prefix: str) -> PolicyOutcome:
    """``bound`` maps each bound DeployedModel's name to its spec.

    Tariffs are written by the bound models' own reconciles (which this change triggers), one
    writer per model, so versions follow the policy's generations in order.
    """
    try:
        CachePolicy.from_spec(spec)
    except PolicyError as exc:
        conditions = stalled("InvalidSpec", str(exc))
        return PolicyOutcome({"observedGeneration": generation, "conditions": merge(current, conditions, generation)},
                             [("Warning", "InvalidSpec", str(exc))], False)
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
    return PolicyOutcome(status, events, True)
