"""The operator's own settings, from its environment (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from promptcache.operator.handlers.housekeeping import Housekeeping
from promptcache.operator.handlers.manifests import OperatorSettings
from promptcache.operator.handlers.serverpolicy import RESTRICTED, UNRESTRICTED
from promptcache.proxy.storage.roles import DEFAULT_PROXY_ROLE, role_from


@dataclass(frozen=True)
class OperatorConfig:
    database_url: str | None = None
    """The owner's DSN: the operator migrates, writes tariffs and deletes expired rows."""
    proxy_role: str = DEFAULT_PROXY_ROLE
    """The role its migrations grant the proxies' DML (docs/design.md#database-roles)."""
    redis_url: str | None = None
    manifests: OperatorSettings = field(default_factory=OperatorSettings)
    housekeeping: Housekeeping = field(default_factory=Housekeeping)
    inline_replay_max_requests: int = 200_000
    """A PlanReplay over more requests than this runs as a Job, keeping the operator's CPU and memory for
    reconciling."""
    key_requests: bool = False
    """Issue API keys for Secrets that ask for one (keyrequests); off unless the chart grants the Secret access."""

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
        try:
            proxy_role = role_from(env)
        except ValueError as exc:
            raise EnvironmentError_(str(exc)) from None
        return cls(
            database_url=env.get("PROMPTCACHE_DATABASE_URL") or None,
            proxy_role=proxy_role,
            redis_url=redis_url,
            manifests=OperatorSettings(
                proxy_image=image,
                database_secret=env.get("PROMPTCACHE_DATABASE_SECRET") or None,
                redis_url=redis_url,
                redis_secret=_secret_key(env, "PROMPTCACHE_REDIS_SECRET"),
                redis_prefix=env.get("PROMPTCACHE_REDIS_PREFIX", defaults.redis_prefix),
                secret_source=_namespace(env, "PROMPTCACHE_SECRET_SOURCE_NAMESPACE"),
                replay_service_account=env.get("PROMPTCACHE_REPLAY_SERVICE_ACCOUNT") or None,
                server_security=_choice(env, "PROMPTCACHE_SERVER_SECURITY", (RESTRICTED, UNRESTRICTED)),
                server_secrets=_secret_names(env, "PROMPTCACHE_SERVER_SECRETS"),
                metrics_namespace=_namespace(env, "PROMPTCACHE_METRICS_NAMESPACE"),
                metrics_pod_labels=_labels(env, "PROMPTCACHE_METRICS_POD_LABELS", "PROMPTCACHE_METRICS_NAMESPACE"),
            ),
            housekeeping=Housekeeping(
                interval=timedelta(seconds=_number(env, "PROMPTCACHE_SWEEP_INTERVAL_SECONDS", 300)),
                grace=timedelta(seconds=_number(env, "PROMPTCACHE_SWEEP_GRACE_SECONDS", 3600)),
                log_retention=timedelta(days=_number(env, "PROMPTCACHE_LOG_RETENTION_DAYS", 30)),
            ),
            inline_replay_max_requests=int(_number(env, "PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS", 200_000,
                                                   integer=True)),
            key_requests=_choice(env, "PROMPTCACHE_KEY_REQUESTS", ("false", "true")) == "true",
        )


def _secret_names(env: Mapping[str, str], name: str) -> frozenset[str]:
    """Comma-separated Secret names, each ``name`` or ``namespace/name`` (the chart joins a list); empty when unset."""
    names = frozenset(part.strip() for part in env.get(name, "").split(",") if part.strip())
    for entry in names:
        namespace, slash, secret = entry.partition("/") if "/" in entry else ("", "", entry)
        if not _DNS_SUBDOMAIN.fullmatch(secret) or (slash and not _DNS_LABEL.fullmatch(namespace)):
            raise EnvironmentError_(f"{name}: {entry[:70]!r} is not a Secret name or namespace/name")
    return names


def _secret_key(env: Mapping[str, str], name: str) -> str | None:
    """``secret/key`` (the chart joins them); None when unset."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    secret, slash, key = raw.partition("/")
    if not slash or not _DNS_SUBDOMAIN.fullmatch(secret) or not _SECRET_KEY.fullmatch(key):
        raise EnvironmentError_(f"{name} must be SECRET/KEY, got {raw[:70]!r}")
    return raw


def _namespace(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name, "").strip()
    if raw and not _DNS_LABEL.fullmatch(raw):
        raise EnvironmentError_(f"{name} must be a namespace name, got {raw[:70]!r}")
    return raw or None


def _labels(env: Mapping[str, str], name: str, namespace: str) -> tuple[tuple[str, str], ...]:
    """A JSON object of label keys to values (the chart writes it with toJson), sorted; empty when unset. Labels
    select pods of ``namespace``'s namespace, so they need it."""
    raw = env.get(name, "").strip()
    try:
        labels = json.loads(raw) if raw else {}
    except ValueError:
        labels = None
    if not isinstance(labels, dict) or not all(_label(k, v) for k, v in labels.items()):
        raise EnvironmentError_(f'{name} must be a JSON object of label keys to values, e.g. '
                                f'{{"app.kubernetes.io/name": "prometheus"}}, got {raw[:70]!r}')
    if labels and not env.get(namespace, "").strip():
        raise EnvironmentError_(f"{name} selects pods of the namespace {namespace} names, which is not set")
    return tuple(sorted(labels.items()))


def _label(key: object, value: object) -> bool:
    """A label as the API server takes it: ``[prefix/]name`` (prefix a DNS subdomain), names and values ≤ 63."""
    if not isinstance(key, str) or not isinstance(value, str) or not _LABEL_KEY.fullmatch(key):
        return False
    prefix, _, name = key.rpartition("/")
    return len(prefix) <= 253 and len(name) <= 63 and bool(_LABEL_VALUE.fullmatch(value))


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?")
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


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
