"""Cache policies and upstream replicas published on Redis: the operator announces a change, proxies apply it at
once.

A ConfigMap reaches a pod's volume only after the kubelet's next sync (up to a minute or so);
policy changes should not wait for it. The operator stores each policy under
``{prefix}policy:{namespace}/{name}`` and publishes the same JSON on ``{prefix}policies``; a
proxy reads the stored ones when it (re)subscribes and applies each message as it arrives.
A model's ready upstream endpoints (docs/design.md#replica-routing) travel the same way, under
``{prefix}replicas:{namespace}/{name}`` and on ``{prefix}replicas``: they change with every scale-up,
scale-down and readiness flip, which must neither wait for the kubelet nor roll the proxies.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from promptcache.proxy.config import MAX_REPLICAS
from promptcache.proxy.domain.policy import CachePolicy, PolicyError

_log = logging.getLogger("promptcache.policybus")

Apply = Callable[[str, CachePolicy], Awaitable[None]]
ApplyReplicas = Callable[[str, tuple[str, ...]], Awaitable[None]]


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


def replicas_channel(prefix: str) -> str:
    return f"{prefix}replicas"


def replicas_key(prefix: str, name: str) -> str:
    return f"{prefix}replicas:{name}"


async def publish_replicas(client: aioredis.Redis, prefix: str, name: str, urls: Iterable[str]) -> int:
    """Store and announce the replica base URLs of model ``name`` (``namespace/name``); returns the listeners."""
    message = json.dumps({"replicas": name, "urls": list(urls)})
    await client.set(replicas_key(prefix, name), message)
    receivers: int = await client.publish(replicas_channel(prefix), message)
    return receivers


def parse_replicas(message: bytes | str) -> tuple[str, tuple[str, ...]]:
    data = json.loads(message)
    urls = data.get("urls") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("replicas"), str) or not isinstance(urls, list) \
            or len(urls) > MAX_REPLICAS or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                                                   for u in urls):
        raise ValueError(f"a replicas message needs a `replicas` name and `urls`, at most {MAX_REPLICAS} http(s) URLs")
    return data["replicas"], tuple(dict.fromkeys(urls))


async def follow(client: aioredis.Redis, prefix: str, wanted: Callable[[], Iterable[str]], apply: Apply,
                 retry_delay: float = 1.0) -> None:
    """Subscribe, catch up on the stored policies this proxy uses, then apply each announcement.

    Runs until cancelled; a lost Redis connection is retried, and catching up again afterwards
    covers whatever was published in between.
    """
    async def handle(raw: bytes | str) -> None:
        try:
            name, policy = parse(raw)
        except (ValueError, PolicyError) as exc:
            _log.error("ignoring an invalid policy message: %s", exc)
            return
        await apply(name, policy)

    await _follow(client, channel(prefix), lambda: [stored_key(prefix, n) for n in wanted()], handle, retry_delay)


async def follow_replicas(client: aioredis.Redis, prefix: str, wanted: Callable[[], Iterable[str]],
                          apply: ApplyReplicas, retry_delay: float = 1.0) -> None:
    """As :func:`follow`, for the replica lists of the models named by ``wanted``."""
    async def handle(raw: bytes | str) -> None:
        try:
            name, urls = parse_replicas(raw)
        except ValueError as exc:
            _log.error("ignoring an invalid replicas message: %s", exc)
            return
        await apply(name, urls)

    await _follow(client, replicas_channel(prefix), lambda: [replicas_key(prefix, n) for n in wanted()], handle,
                  retry_delay)


async def _follow(client: aioredis.Redis, channel_name: str, stored: Callable[[], Iterable[str]],
                  handle: Callable[[bytes | str], Awaitable[None]], retry_delay: float) -> None:
    while True:
        try:
            async with client.pubsub() as pubsub:
                await pubsub.subscribe(channel_name)
                for key in sorted(set(stored())):
                    value = await client.get(key)
                    if value is not None:
                        await handle(value)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await handle(message["data"])
        except (RedisError, OSError) as exc:
            _log.warning("%s channel unavailable, retrying: %s", channel_name, exc)
            await asyncio.sleep(retry_delay)
