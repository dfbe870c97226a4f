"""The operator's kopf handlers. Only registration lives here: each handler is a docstring and one
call into its reconciler (``handlers.models``, ``handlers.policies``, ``handlers.planreplay``).

Importing this module registers the handlers with kopf's default registry. Every handler gets the
typed :class:`~promptcache.operator.handlers.state.OperatorMemo` as ``memo``.
"""

from __future__ import annotations

from typing import Any

import kopf

from promptcache.operator.constants import (
    GROUP,
    KEY_REQUEST_LABEL,
    MODEL_LABEL,
    MODELS,
    NAME_LABEL,
    POLICIES,
    PROXY_APP,
    REPLAY_APP,
    REPLAYS,
    SERVICE_NAME_LABEL,
    VERSION,
)
from promptcache.operator.handlers import keyrequests, lifecycle, models, planreplay, policies, replicas
from promptcache.operator.handlers.outcome import apply, post, settled
from promptcache.operator.handlers.state import OperatorMemo


@kopf.on.startup()
async def startup(*, settings: kopf.OperatorSettings, memo: OperatorMemo, logger: Any, **_: Any) -> None:
    """Our finalizer and annotation prefixes; the schema migrated; Postgres, Redis and the API connected."""
    await lifecycle.start(settings, memo, logger)


@kopf.on.cleanup()
async def cleanup(*, memo: OperatorMemo, **_: Any) -> None:
    """Stop housekeeping and close every client startup opened."""
    await lifecycle.stop(memo)


@kopf.index(GROUP, VERSION, MODELS)
def models_by_policy(*, namespace: str | None, name: str, spec: kopf.Spec,
                     **_: Any) -> dict[tuple[str | None, str], tuple[str, dict[str, Any]]]:
    """Which DeployedModels each CachePolicy is bound to, for the policy's reconcile."""
    return {(namespace, models.policy_name(spec)): (name, dict(spec))}


@kopf.index(GROUP, VERSION, MODELS)
def models_by_service(*, namespace: str | None, name: str, spec: kopf.Spec,
                      **_: Any) -> dict[tuple[str, str], tuple[str, str]] | None:
    """Which routed DeployedModels follow each Service's endpoints."""
    return replicas.by_service(namespace or "default", name, spec)


@kopf.index("discovery.k8s.io", "v1", "endpointslices", labels={SERVICE_NAME_LABEL: kopf.PRESENT})
def endpointslices_by_service(*, namespace: str | None, labels: kopf.Labels, body: kopf.Body,
                              **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """Each Service's EndpointSlices, for the models routed over it."""
    return {(namespace or "default", labels[SERVICE_NAME_LABEL]): dict(body)}


@kopf.on.resume(GROUP, VERSION, MODELS)
@kopf.on.create(GROUP, VERSION, MODELS)
@kopf.on.update(GROUP, VERSION, MODELS)
async def reconcile_model(*, body: kopf.Body, patch: kopf.Patch, memo: OperatorMemo, **kwargs: Any) -> None:
    """ConfigMap, Deployment, Service and tariff from the spec and its policy, the replicas routing follows;
    Stalled on a bad spec."""
    apply(await settled(body, models.reconcile(body, memo.kube, memo.pg, memo.redis, memo.config.manifests,
                                               kwargs["endpointslices_by_service"])), body, patch)


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices", labels={SERVICE_NAME_LABEL: kopf.PRESENT})
async def endpoints_changed(*, namespace: str | None, labels: kopf.Labels, memo: OperatorMemo,
                            **kwargs: Any) -> None:
    """The proxies of every model routed over this Service follow its ready endpoints within seconds."""
    service = (namespace or "default", labels[SERVICE_NAME_LABEL])
    await replicas.endpoints_changed(service, kwargs["models_by_service"].get(service, []),
                                     kwargs["endpointslices_by_service"].get(service, []), memo.kube, memo.redis,
                                     memo.config.manifests.redis_prefix)


@kopf.on.delete(GROUP, VERSION, MODELS, retries=3, backoff=5)
async def model_deleted(*, spec: kopf.Spec, namespace: str | None, memo: OperatorMemo, **_: Any) -> None:
    """Close the model's tariff and drop it from its policy's status; owned objects go by garbage collection."""
    await models.deleted(memo.kube, memo.pg, namespace or "default", spec)


@kopf.on.event("apps", "v1", "deployments", labels={MODEL_LABEL: kopf.PRESENT})
async def deployment_changed(*, body: kopf.Body, memo: OperatorMemo, **_: Any) -> None:
    """Ready follows the owned Deployment's availability."""
    await models.deployment_changed(body, memo.kube)


@kopf.on.event("", "v1", "pods", labels={NAME_LABEL: PROXY_APP, MODEL_LABEL: kopf.PRESENT})
async def proxy_pod_changed(*, body: kopf.Body, memo: OperatorMemo, **_: Any) -> None:
    """A proxy pod that refused its config (a tokenizer it cannot load) stalls its model with the proxy's reason."""
    await models.proxy_pod_changed(body, memo.kube)


@kopf.on.resume(GROUP, VERSION, POLICIES)
@kopf.on.create(GROUP, VERSION, POLICIES)
@kopf.on.update(GROUP, VERSION, POLICIES)
async def reconcile_policy(*, body: kopf.Body, patch: kopf.Patch, memo: OperatorMemo, **kwargs: Any) -> None:
    """Validate, configure Redis, announce to running proxies, and make each bound model reconcile again."""
    apply(await settled(body, policies.reconcile(body, kwargs["models_by_policy"], memo.kube, memo.redis,
                                                 memo.config.manifests.redis_prefix)), body, patch)


@kopf.on.event(GROUP, VERSION, POLICIES)
async def policy_deleted(*, type: str, body: kopf.Body, memo: OperatorMemo, **kwargs: Any) -> None:
    """Bound models go Stalled (CachePolicyNotFound) until the policy is back.

    A watch event, not a delete handler: policies carry no finalizer, so nothing blocks their deletion.
    """
    await policies.deleted(type, body, kwargs["models_by_policy"], memo.kube)


@kopf.on.resume(GROUP, VERSION, REPLAYS)
@kopf.on.create(GROUP, VERSION, REPLAYS)
@kopf.on.update(GROUP, VERSION, REPLAYS)
async def run_replay(*, body: kopf.Body, memo: OperatorMemo, **_: Any) -> None:
    """Small windows replay here (the engine off the event loop), large ones in a Job. kopf calls this only for
    spec or metadata changes, and the run itself skips a generation that already ran."""
    event = await planreplay.reconcile(dict(body), memo.kube, memo.config)
    post(body, [event] if event is not None else [])


@kopf.on.event("batch", "v1", "jobs", labels={NAME_LABEL: REPLAY_APP})
async def replay_job_changed(*, body: kopf.Body, memo: OperatorMemo, **_: Any) -> None:
    """A replay Job that failed for good fails its PlanReplay, which would otherwise stay Running; a sharded one
    that completed has its shards' sums added up into the result."""
    outcome = await planreplay.job_changed(dict(body), memo.kube, memo.config)
    if outcome is not None:
        post(outcome[0], [outcome[1]])


def serve_key_requests() -> None:
    """Also watch Secrets that ask for an API key (docs/design.md#api-keys-from-secrets); registered only when
    enabled, since it needs RBAC to read every Secret of the served namespaces."""

    @kopf.on.event("", "v1", "secrets", labels={KEY_REQUEST_LABEL: "true"})
    async def key_request(*, body: kopf.Body, memo: OperatorMemo, **_: Any) -> None:
        """Issue the Secret's key, complete an interrupted issue, or revoke the key as the Secret goes."""
        await keyrequests.react(dict(body), memo.kube, memo.pg)
