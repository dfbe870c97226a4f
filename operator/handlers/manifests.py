"""The Kubernetes objects the operator owns: a DeployedModel's proxy ConfigMap, Deployment and Service,
and the Job of a PlanReplay too large to run in the operator.

Pure functions of the resource and the operator's settings, so reconciling is "compute what
should exist, make it so" and a restart mid-way converges on the same objects.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from promptcache.operator.constants import (
    CHECKSUM_ANNOTATION,
    GENERATION_ANNOTATION,
    INSTANCE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MODEL_LABEL,
    NAME_LABEL,
    PLAN_ENV,
    PROXY_APP,
    REPLAY_APP,
    SHARDS_ANNOTATION,
    TOKENIZER_VOLUME,
    WINDOW_ANNOTATION,
)
from promptcache.operator.errors import SpecError
from promptcache.operator.handlers import serverpolicy
from promptcache.operator.handlers.render import (
    CONFIG_DIR,
    CONFIG_FILE,
    TOKENIZER_DIR,
    UPSTREAM_KEY_ENV,
    Rendered,
    tokenizer_volume,
)

PROXY_PORT = 8080
METRICS_PORT = 9090
"""/metrics alone (``--metrics-port``), so the NetworkPolicy admits scrapers to it and not to the API."""
SERVICE_PORT = 80
PROXY_UID = 10001
MAX_WORKERS = 64
"""As ``promptcache proxy --workers`` allows."""
SPOOL_VOLUME = "spool"
SPOOL_DIR = "/var/lib/promptcache/spool"
SPOOL_VOLUME_LIMIT = "1280Mi"
"""The proxy's own spool bound is 1 GiB (``--spool-max-mb``)."""
DEFAULT_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}}
REPORT_KEY = "result.json"
REPLAY_RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
_NAME_LIMIT = 63
"""A Job's name is also a label value on its pods."""


@dataclass(frozen=True)
class OperatorSettings:
    proxy_image: str = ""
    """The image proxy pods and replay Jobs run; required from the environment (there is no public image)."""
    database_secret: str | None = None
    """``name/key`` of the Secret holding the Postgres DSN the proxies use."""
    redis_url: str | None = None
    redis_secret: str | None = None
    """``name/key`` of the Secret holding the Redis URL (password included) the proxies use; then ``redis_url`` is
    not written into their pods."""
    redis_prefix: str = "promptcache:"
    secret_source: str | None = None
    """The namespace the operator copies the proxies' Secrets (:attr:`database_secret`, :attr:`redis_secret`) from
    into each namespace it runs proxies or replay Jobs in; None: a person puts them there (secretcopies)."""
    replay_service_account: str | None = None
    """The ServiceAccount replay Jobs run as (in the PlanReplay's namespace); None: the namespace's default."""
    server_security: str = serverpolicy.RESTRICTED
    """``restricted``: sidecar servers get the security baseline (serverpolicy); ``unrestricted``: as written."""
    server_secrets: frozenset[str] = frozenset()
    """Secrets a restricted server may read (``name`` in any namespace, or ``namespace/name``)."""
    metrics_namespace: str | None = None
    """Where the Prometheus pods that may scrape proxies run, where a NetworkPolicy guards them (podguards)."""
    metrics_pod_labels: tuple[tuple[str, str], ...] = ()
    """Those pods' labels; empty: every pod of ``metrics_namespace``."""


def names(model: str) -> dict[str, str]:
    return {"configmap": f"{model}-proxy-config", "deployment": f"{model}-proxy", "service": f"{model}-proxy",
            "networkpolicy": f"{model}-proxy", "poddisruptionbudget": f"{model}-proxy"}


def labels(model: str) -> dict[str, str]:
    return {
        NAME_LABEL: PROXY_APP,
        INSTANCE_LABEL: model,
        MANAGED_BY_LABEL: MANAGED_BY,
        MODEL_LABEL: model,
    }


def selector(model: str) -> dict[str, str]:
    return {NAME_LABEL: PROXY_APP, MODEL_LABEL: model}


def replicas(spec: Mapping[str, Any]) -> Any:
    """``spec.proxy.replicas`` as written (the CRD defaults and bounds it), 2 for a server that did not default it."""
    return (spec.get("proxy") or {}).get("replicas", 2)


def endpoint(model: str, namespace: str, api: str) -> str:
    """The base URL clients give their SDK for ``api``: OpenAI's includes ``/v1``, Anthropic's does not."""
    base = f"http://{names(model)['service']}.{namespace}.svc:{SERVICE_PORT}"
    return base if api == "anthropic" else base + "/v1"


def config_map(model: str, namespace: str, rendered: Rendered) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": names(model)["configmap"], "namespace": namespace, "labels": labels(model)},
        "data": {CONFIG_FILE: rendered.yaml},
    }


def service(model: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": names(model)["service"], "namespace": namespace, "labels": labels(model)},
        "spec": {
            "selector": selector(model),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"},
                      {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


def _secure_container() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": PROXY_UID,
        "runAsGroup": PROXY_UID,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _database_env(settings: OperatorSettings) -> list[dict[str, Any]]:
    """Proxy pods' and replay Jobs' DSN: the proxy Secret of their namespace, a login in the proxy role, never the
    owner's DSN the operator holds (docs/design.md#database-roles)."""
    if not settings.database_secret:
        return []
    return [secret_env("PROMPTCACHE_DATABASE_URL", settings.database_secret, "dsn")]


def secret_env(variable: str, ref: str, default_key: str) -> dict[str, Any]:
    """An env var from the Secret ``ref`` (``name/key``, or ``name`` for ``default_key``) of the pod's namespace."""
    secret, _, key = ref.partition("/")
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key or default_key}}}


def proxy_workers(resources: Mapping[str, Any]) -> int:
    """``--workers``: one proxy process per core the container is guaranteed (its CPU request, else its limit),
    rounded up, from 1 to :data:`MAX_WORKERS`; a pod without a CPU figure runs one."""
    cpu = (resources.get("requests") or {}).get("cpu") or (resources.get("limits") or {}).get("cpu")
    if cpu is None:
        return 1
    try:
        cores: Decimal = parse_quantity(cpu)  # type: ignore[no-untyped-call]  # untyped in the kubernetes client
        return max(1, min(MAX_WORKERS, math.ceil(min(cores, Decimal(MAX_WORKERS)))))
    except (ValueError, InvalidOperation, OverflowError) as exc:
        raise SpecError("InvalidSpec", f"spec.proxy.resources cpu {cpu!r} is not a CPU quantity") from exc


def _proxy_container(spec: Mapping[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    proxy = spec.get("proxy") or {}
    env: list[dict[str, Any]] = [{"name": "PROMPTCACHE_REDIS_PREFIX", "value": settings.redis_prefix}]
    env.extend(_database_env(settings))
    if settings.redis_secret:
        env.append(secret_env("PROMPTCACHE_REDIS_URL", settings.redis_secret, "url"))
    elif settings.redis_url:
        env.append({"name": "PROMPTCACHE_REDIS_URL", "value": settings.redis_url})
    key_ref = (spec.get("upstream") or {}).get("apiKeySecretRef")
    if key_ref:
        env.append({"name": UPSTREAM_KEY_ENV,
                    "valueFrom": {"secretKeyRef": {"name": key_ref["name"], "key": key_ref["key"]}}})
    resources = proxy.get("resources") or DEFAULT_RESOURCES
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"},
              {"name": SPOOL_VOLUME, "mountPath": SPOOL_DIR}]
    if tokenizer_volume(spec) is not None:
        mounts.append({"name": TOKENIZER_VOLUME, "mountPath": TOKENIZER_DIR, "readOnly": True})
    return {
        "name": "proxy",
        "image": proxy.get("image") or settings.proxy_image,
        # --degraded-ok: a Postgres outage must not take every proxy out of its Service; they serve at list price
        "args": ["proxy", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--port", str(PROXY_PORT), "--no-manage-tariffs",
                 "--degraded-ok", "--spool-dir", SPOOL_DIR, "--workers", str(proxy_workers(resources)),
                 "--metrics-port", str(METRICS_PORT)],
        "ports": [{"name": "http", "containerPort": PROXY_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "env": env,
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        "resources": resources,
        "securityContext": _secure_container(),
        "terminationMessagePolicy": "FallbackToLogsOnError",  # a refused config's reason: see proxypods
    }


def deployment(model: str, namespace: str, spec: Mapping[str, Any], rendered: Rendered,
               settings: OperatorSettings) -> dict[str, Any]:
    """Gateway mode: proxy pods in front of ``upstream.url``. Sidecar mode: the proxy beside the server."""
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names(model)["configmap"]}},
        {"name": "tmp", "emptyDir": {}},
        # Bills Postgres could not take survive a crashed or restarted container (not a deleted pod): the design
        # doc's "The ledger spool". Larger than the spool's own bound, so the proxy refuses rows before eviction.
        {"name": SPOOL_VOLUME, "emptyDir": {"sizeLimit": SPOOL_VOLUME_LIMIT}},
    ]
    source = tokenizer_volume(spec)
    if source is not None:
        volumes.append({"name": TOKENIZER_VOLUME, **source})
    containers = [_proxy_container(spec, settings)]
    if rendered.sidecar:
        containers.append(serverpolicy.server_container(spec["server"], settings.server_security))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": names(model)["deployment"], "namespace": namespace, "labels": labels(model)},
        "spec": {
            "replicas": replicas(spec),
            "selector": {"matchLabels": selector(model)},
            "template": {
                "metadata": {"labels": labels(model), "annotations": {CHECKSUM_ANNOTATION: rendered.checksum}},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "fsGroup": PROXY_UID,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "automountServiceAccountToken": False,
                    "containers": containers,
                    "volumes": volumes,
                },
            },
        },
    }


def replay_names(replay: str) -> dict[str, str]:
    job = f"{replay}-replay"
    if len(job) > _NAME_LIMIT:
        digest = hashlib.sha256(replay.encode()).hexdigest()[:8]
        job = f"{replay[:_NAME_LIMIT - 16].rstrip('-.')}-{digest}-replay"
    return {"job": job, "configmap": f"{replay}-report"}


def replay_job(replay: str, namespace: str, generation: int, settings: OperatorSettings,
               plan: str | None = None, shards: int = 1) -> dict[str, Any]:
    """``promptcache replay-job NS/NAME`` in the operator's image; it patches the result itself.

    A failed pod is retried twice (the database may be back), and the finished Job is kept for a day
    so its logs can be read. With ``shards`` above 1 it is an Indexed Job of that many pods, each given
    the resolved ``plan`` and its index (``--shard``), that only sum their shard; the operator adds up
    the shards when the Job completes (docs/design.md#sharded-planreplay).
    """
    labels = {NAME_LABEL: REPLAY_APP, MANAGED_BY_LABEL: MANAGED_BY}
    annotations = {GENERATION_ANNOTATION: str(generation)}
    args = ["replay-job", f"{namespace}/{replay}"]
    env = _database_env(settings)
    spec: dict[str, Any] = {"backoffLimit": 2}
    if shards > 1:
        if plan is None:
            raise ValueError("a sharded replay Job needs the resolved plan")
        annotations[SHARDS_ANNOTATION] = str(shards)
        args += ["--shard", "$(JOB_COMPLETION_INDEX)"]  # the kubelet expands it: the job controller sets it
        env = [*env, {"name": PLAN_ENV, "value": plan}]
        spec = {"completionMode": "Indexed", "completions": shards, "parallelism": shards,
                "backoffLimitPerIndex": 2, "maxFailedIndexes": 0}
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "fsGroup": PROXY_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": True,  # it reads the PlanReplay and writes its status
        "containers": [{
            "name": "replay",
            "image": settings.proxy_image,
            "args": args,
            "env": env,
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            "resources": REPLAY_RESOURCES,
            "securityContext": _secure_container(),
        }],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if settings.replay_service_account:
        pod["serviceAccountName"] = settings.replay_service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": replay_names(replay)["job"], "namespace": namespace, "labels": labels,
                     "annotations": annotations},
        "spec": {
            **spec,
            "ttlSecondsAfterFinished": 86400,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def replay_report(replay: str, namespace: str, generation: int, window: str, result: str) -> dict[str, Any]:
    """One run's full result (per-model figures and params, more than a status should hold) as the canonical
    JSON ``promptcache replay --output json`` prints; it names the generation and window it is for."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": replay_names(replay)["configmap"],
            "namespace": namespace,
            "labels": {NAME_LABEL: REPLAY_APP, MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {GENERATION_ANNOTATION: str(generation), WINDOW_ANNOTATION: window},
        },
        "data": {REPORT_KEY: result},
    }
