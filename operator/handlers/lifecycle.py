"""Operator startup and cleanup: kopf's storage under our prefixes, the schema, the shared clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf
import redis.asyncio as aioredis

from promptcache.operator.constants import FINALIZER, PREFIX
from promptcache.operator.handlers import housekeeping
from promptcache.operator.handlers.kube import Kube
from promptcache.operator.handlers.state import OperatorMemo
from promptcache.proxy.storage.postgres import Database
from promptcache.proxy.storage.schema import migrate


async def start(settings: kopf.OperatorSettings, memo: OperatorMemo, logger: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # kopf's per-handler chatter stays out of events; we post transitions
    config = memo.config
    if config.database_url:
        migrated = await migrate(config.database_url, proxy_role=config.proxy_role)
        logger.info("schema migrations applied: %s", migrated.applied or "none pending")
        for warning in migrated.warnings:
            logger.warning("%s", warning)
        # Longer waits than a proxy's: a burst of reconciles may queue for connections, and that is fine here.
        memo.pg = await Database.connect(config.database_url, acquire_timeout=30.0, command_timeout=30.0)
        memo.housekeeping = asyncio.create_task(housekeeping.loop(memo.pg, config.housekeeping))
    memo.redis = aioredis.Redis.from_url(config.redis_url) if config.redis_url else None
    memo.kube = Kube.connect()


async def stop(memo: OperatorMemo) -> None:
    if memo.housekeeping is not None:
        memo.housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await memo.housekeeping
    if memo.pg is not None:
        await memo.pg.close()
    if memo.redis is not None:
        await memo.redis.aclose()
    if hasattr(memo, "kube"):
        memo.kube.close()
