"""The operator's state, as the typed memo kopf hands every handler.

kopf gives each resource a shallow copy of the operator's memo, so the clients opened at startup
are shared by every handler while nothing a handler sets leaks into another resource's copy.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.kube import Kube
from promptcache.proxy.storage.postgres import Database


@dataclass
class OperatorMemo:
    config: OperatorConfig
    pg: Database | None = None
    """None without ``PROMPTCACHE_DATABASE_URL``: no tariffs, no housekeeping, replays refuse to run."""
    redis: aioredis.Redis | None = None
    kube: Kube = field(init=False)
    """Connected at startup, before any resource handler runs."""
    housekeeping: asyncio.Task[None] | None = None
