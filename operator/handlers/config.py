"""The operator's own settings, from its environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

from promptcache.operator.handlers.housekeeping import Housekeeping
from promptcache.operator.handlers.manifests import OperatorSettings


@dataclass(frozen=True)
class OperatorConfig:
    database_url: str | None = None
    redis_url: str | None = None
    manifests: OperatorSettings = field(default_factory=OperatorSettings)
    housekeeping: Housekeeping = field(default_factory=Housekeeping)
    inline_replay_max_requests: int = 200_000
    """A PlanReplay over more requests than this runs as a Job, keeping the operator's CPU and memory for
    reconciling."""

    @classmethod
    def from_env(cls) -> OperatorConfig:
        env = os.environ
        redis_url = env.get("PROMPTCACHE_REDIS_URL") or None
        defaults = OperatorSettings()
        return cls(
            database_url=env.get("PROMPTCACHE_DATABASE_URL") or None,
            redis_url=redis_url,
            manifests=OperatorSettings(
                proxy_image=env.get("PROMPTCACHE_PROXY_IMAGE", defaults.proxy_image),
                database_secret=env.get("PROMPTCACHE_DATABASE_SECRET") or None,
                redis_url=redis_url,
                redis_prefix=env.get("PROMPTCACHE_REDIS_PREFIX", defaults.redis_prefix),
                replay_service_account=env.get("PROMPTCACHE_REPLAY_SERVICE_ACCOUNT") or None,
            ),
            housekeeping=Housekeeping(
                interval=timedelta(seconds=float(env.get("PROMPTCACHE_SWEEP_INTERVAL_SECONDS", "300"))),
                grace=timedelta(seconds=float(env.get("PROMPTCACHE_SWEEP_GRACE_SECONDS", "3600"))),
                log_retention=timedelta(days=float(env.get("PROMPTCACHE_LOG_RETENTION_DAYS", "30"))),
            ),
            inline_replay_max_requests=int(env.get("PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS", "200000")),
        )
