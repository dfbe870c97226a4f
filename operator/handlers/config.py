"""The operator's own settings, from its environment (the Helm chart sets them)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from promptcache.operator.handlers.housekeeping import Housekeeping
from promptcache.operator.handlers.manifests import OperatorSettings
from promptcache.operator.handlers.serverpolicy import RESTRICTED, UNRESTRICTED


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
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        """The settings the chart's Deployment sets; a missing image or a malformed number is an
        :class:`EnvironmentError_` naming the variable, before the operator touches the cluster."""
        image = env.get("PROMPTCACHE_PROXY_IMAGE", "").strip()
        if not image:
            raise EnvironmentError_("PROMPTCACHE_PROXY_IMAGE is not set: the image proxy pods and replay Jobs run "
                                    "(the chart sets it from image.repository and image.tag)")
        redis_url = env.get("PROMPTCACHE_REDIS_URL") or None
        defaults = OperatorSettings()
        return cls(
            database_url=env.get("PROMPTCACHE_DATABASE_URL") or None,
            redis_url=redis_url,
            manifests=OperatorSettings(
                proxy_image=image,
                database_secret=env.get("PROMPTCACHE_DATABASE_SECRET") or None,
                redis_url=redis_url,
                redis_prefix=env.get("PROMPTCACHE_REDIS_PREFIX", defaults.redis_prefix),
                replay_service_account=env.get("PROMPTCACHE_REPLAY_SERVICE_ACCOUNT") or None,
                server_security=_choice(env, "PROMPTCACHE_SERVER_SECURITY", (RESTRICTED, UNRESTRICTED)),
            ),
            housekeeping=Housekeeping(
                interval=timedelta(seconds=_number(env, "PROMPTCACHE_SWEEP_INTERVAL_SECONDS", 300)),
                grace=timedelta(seconds=_number(env, "PROMPTCACHE_SWEEP_GRACE_SECONDS", 3600)),
                log_retention=timedelta(days=_number(env, "PROMPTCACHE_LOG_RETENTION_DAYS", 30)),
            ),
            inline_replay_max_requests=int(_number(env, "PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS", 200_000,
                                                   integer=True)),
        )


class EnvironmentError_(ValueError):
    """The operator's environment is unusable; the message names the variable."""


_LIMIT = 10**9


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (the first when unset)."""
    raw = env.get(name, "").strip() or choices[0]
    if raw not in choices:
        raise EnvironmentError_(f"{name} must be one of {', '.join(choices)}, got {raw[:40]!r}")
    return raw


def _number(env: Mapping[str, str], name: str, default: int, *, integer: bool = False) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = -1
    if not (0 <= value <= _LIMIT) or value != value:  # NaN, inf, negative, absurd
        kind = "an integer" if integer else "a number"
        raise EnvironmentError_(f"{name} must be {kind} from 0 to {_LIMIT}, got {raw[:40]!r}")
    return value
