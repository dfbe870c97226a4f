"""Cache policies published on Redis: the operator announces a change, proxies apply it at once.

A ConfigMap reaches a pod's volume only after the kubelet's next sync (up to a minute or so);
policy changes should not wait for it. The operator stores each policy under
``{prefix}policy:{namespace}/{name}`` and publishes the same JSON on ``{prefix}policies``; a
proxy reads the stored ones when it (re)subscribes and applies each message as it arrives.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from promptcache.proxy.domain.policy import CachePolicy, PolicyError

_log = logging.getLogger("promptcache.policybus")

Apply = Callable[[str, CachePolicy], Awaitable[None]]


def channel(prefix: str) -> str:
    return f"{prefix}policies"


def stored_key(prefix: str, policy: str) -> str:
    return f"{prefix}policy:{policy}"


async def publish(client: aioredis.Redis, prefix: str, policy: str, spec: Mapping[str, Any]) -> int:
    """Store and announce ``policy``'s cache spec; returns how many proxies heard it."""
    message = json.dumps({"policy": policy, "spec": dict(spec)}, sort_keys=True)
    await client.set(stored_key(prefix, policy), message)
    receivers: int = await client.publish(channel(prefix), message)
    return receivers


def parse(message: bytes | str) -> tuple[str, CachePolicy]:
    data = json.loads(message)
    if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
        raise PolicyError("a policy message needs a `policy` name and a `spec`")
    return data["policy"], CachePolicy.from_spec(data.get("spec"))


async def follow(client: aioredis.Redis, prefix: str, wanted: Callable[[], Iterable[str]], apply: Apply,
                 retry_delay: float = 1.0) -> None:
    """Subscribe, catch up on the stored policies this proxy uses, then apply each announcement.

    Runs until cancelled; a lost Redis connection is retried, and catching up again afterwards
    covers whatever was published in between.
    """
    while True:
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(channel(prefix))
                for name in sorted(set(wanted())):
                    stored = await client.get(stored_key(prefix, name))
                    if stored is not None:
                        await _apply(stored, apply)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await _apply(message["data"], apply)
        except (RedisError, OSError) as exc:
            _log.warning("policy channel unavailable, retrying: %s", exc)
            await asyncio.sleep(retry_delay)


async def _apply(raw: bytes | str, apply: Apply) -> None:
    try:
        name, policy = parse(raw)
    except (ValueError, PolicyError) as exc:
        _log.error("ignoring an invalid policy message: %s", exc)
        return
    await apply(name, policy)
