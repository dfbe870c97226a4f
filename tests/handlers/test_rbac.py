"""The operator's RBAC rules (docs/design.md#reconciliation): no wildcards, and every request the operator makes is
allowed.

What the operator needs is not listed by hand: the real operator runs against the emulator through a model's and a
policy's whole life, cluster-wide (as the chart deploys it) and namespaced (``--namespace``), with kopf's scanning
on as in production, and every request it sends is mapped to the (apiGroup, resource, verb) the API server's
authorizer would check.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import redis.asyncio as aioredis
import yaml

import promptcache.operator.main  # noqa: F401  (registers the handlers)
from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.manifests import OperatorSettings
from promptcache.operator.handlers.state import OperatorMemo

from support.apiserver import (
    CACHE_POLICIES,
    DEPLOYED_MODELS,
    DEPLOYMENTS,
    GROUP,
    GROUP_VERSION,
    EmulatedCluster,
    emulated_cluster,
    eventually,
    running_operator,
)
from support.proxy import unique

RULES = Path(__file__).resolve().parents[2] / "charts" / "promptcache" / "files" / "rbac-rules.yaml"
NS = "rbac"
WATCHING = (DEPLOYED_MODELS, CACHE_POLICIES, DEPLOYMENTS)
HARNESS_AGENT = "promptcache-rbac-test"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
DISCOVERY = re.compile(r"/(version|api|apis)(/[^/]+){0,2}/?")
"""Non-resource URLs (discovery): every authenticated user may read them (the system:discovery ClusterRole)."""

Access = tuple[str, str, str]
"""(apiGroup, resource[/subresource], verb), as a ClusterRole rule matches a request."""


def load_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(RULES.read_text())
    assert isinstance(rules, list) and rules, "a non-empty YAML list of rules"
    return rules


def allowed(rules: list[dict[str, Any]], access: Access) -> bool:
    group, resource, verb = access
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def access_of(request: kmock.Request) -> Access | None:
    """What the authorizer checks for this request; None for a non-resource (discovery) URL."""
    resource = request.resource
    if resource is None or resource.plural is None:
        assert DISCOVERY.fullmatch(request.url.path), f"an unexpected non-resource request: {request.url}"
        return None
    method = request.method.value.upper()
    if method == "GET":
        verb = "get" if request.name else "watch" if request.params.get("watch") in ("true", "1") else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if request.name else "deletecollection"}[method]
    plural = f"{resource.plural}/{request.subresource}" if request.subresource else str(resource.plural)
    return resource.group or "", plural, verb


def test_rules_are_explicit() -> None:
    for rule in load_rules():
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for key in ("apiGroups", "resources", "verbs"):
            values = rule[key]
            assert isinstance(values, list) and values and all(isinstance(v, str) for v in values), rule
            assert not any("*" in v for v in values), f"a wildcard in {key}: {rule}"
        assert set(rule["verbs"]) <= VERBS, rule


@pytest.fixture
async def config(pg_dsn: str, redis_url: str) -> AsyncIterator[OperatorConfig]:
    prefix = f"rbactest:{secrets.token_hex(4)}:"
    yield OperatorConfig(database_url=pg_dsn, redis_url=redis_url,
                         manifests=OperatorSettings(proxy_image="promptcache:test", database_secret="pg/dsn",
                                                    redis_url=redis_url, redis_prefix=prefix))
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def cluster() -> AsyncIterator[EmulatedCluster]:
    async with emulated_cluster(namespaces=("default", NS)) as emulated, \
            aiohttp.ClientSession(headers={"User-Agent": HARNESS_AGENT}) as session:
        yield dataclasses.replace(emulated, session=session)  # the test's own requests are told apart by agent


def _policy(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "CachePolicy", "metadata": {"name": "standard", "namespace": NS},
            "spec": {"enabledTtls": ["5m", "1h"], "defaultTtl": "5m", "minPrefixTokens": 1024, **spec}}


def _model(alias: str) -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "DeployedModel", "metadata": {"name": "llama", "namespace": NS},
            "spec": {"alias": alias,
                     "upstream": {"url": "http://vllm.llm.svc:8000/v1", "model": "llama", "api": "openai"},
                     "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
                     "pricing": {"inputPerMTok": "3.00", "outputPerMTok": "15.00"},
                     "cachePolicyRef": {"name": "standard"}, "proxy": {"replicas": 2}}}


async def _life_of_a_model(cluster: EmulatedCluster) -> None:
    """Create a policy and a model, change both, play the Deployment controller, delete both; each step awaited,
    and every branch of the owned objects' convergence taken (created, replaced, patched)."""

    async def reconciled() -> dict[str, Any] | None:
        obj = await cluster.get_or_none(GROUP_VERSION, "deployedmodels", NS, "llama")
        status = (obj or {}).get("status") or {}
        if obj is None or status.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        return obj if status.get("configChecksum") else None

    await cluster.create(_policy())
    await cluster.create(_model(unique("rbac")))
    first = await eventually(reconciled, what="the model's first reconcile")
    service = await cluster.get("v1", "services", NS, "llama-proxy")

    await cluster.patch(GROUP_VERSION, "deployedmodels", NS, "llama",
                        {"spec": {"pricing": {"inputPerMTok": "2.50", "outputPerMTok": "15.00"}}})

    async def rerendered() -> bool:
        obj = await reconciled()
        return obj is not None and obj["status"]["configChecksum"] != first["status"]["configChecksum"]

    await eventually(rerendered, what="the re-render after a spec change (ConfigMap and Deployment replaced)")

    await cluster.patch("v1", "services", NS, "llama-proxy", {"spec": {"ports": [{"name": "http", "port": 81}]}})
    await cluster.patch(GROUP_VERSION, "cachepolicies", NS, "standard", {"spec": {"minPrefixTokens": 2048}})

    async def service_restored() -> bool:
        live = await cluster.get("v1", "services", NS, "llama-proxy")
        return bool(live["spec"]["ports"] == service["spec"]["ports"])

    await eventually(service_restored, what="the Service patched back after the policy's change")

    await cluster.patch_status("apps/v1", "deployments", NS, "llama-proxy",
                               {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2})

    async def ready() -> bool:
        obj = await cluster.get(GROUP_VERSION, "deployedmodels", NS, "llama")
        conditions = (obj.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    await eventually(ready, what="Ready once the Deployment is available")

    for plural, name in (("cachepolicies", "standard"), ("deployedmodels", "llama")):
        await cluster.delete(GROUP_VERSION, plural, NS, name)

        async def gone(plural: str = plural, name: str = name) -> bool:
            return await cluster.get_or_none(GROUP_VERSION, plural, NS, name) is None

        await eventually(gone, what=f"{plural} {name} to be deleted (its finalizer released)")


# What the scenario must have made the operator do, or the recording (or the scenario) is broken.
EXERCISED: set[Access] = {
    (GROUP, "deployedmodels", "watch"),
    (GROUP, "deployedmodels", "patch"),
    (GROUP, "deployedmodels", "get"),
    (GROUP, "deployedmodels/status", "patch"),
    (GROUP, "cachepolicies", "watch"),
    ("", "configmaps", "create"),
    ("", "configmaps", "update"),
    ("", "services", "create"),
    ("", "services", "patch"),
    ("apps", "deployments", "create"),
    ("apps", "deployments", "update"),
    ("apps", "deployments", "watch"),
    ("", "events", "create"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}


@pytest.mark.parametrize("clusterwide", [True, False], ids=["clusterwide", "namespaced"])
async def test_rules_allow_every_request_the_operator_makes(
        cluster: EmulatedCluster, config: OperatorConfig, clusterwide: bool) -> None:
    start = len(list(cluster.emulator))
    async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=None if clusterwide else [NS],
                                configure=lambda s: setattr(s.scanning, "disabled", False), watching=WATCHING):
        await _life_of_a_model(cluster)
    requests = [r for r in list(cluster.emulator)[start:] if r.headers.get("User-Agent") != HARNESS_AGENT]
    used = {access for access in map(access_of, requests) if access is not None}

    rules = load_rules()
    assert not EXERCISED - used, f"the scenario did not make the operator do {sorted(EXERCISED - used)}"
    if not clusterwide:
        assert ("", "namespaces", "watch") in used
    denied = sorted(access for access in used if not allowed(rules, access))
    assert not denied, f"requests the rules in {RULES.name} do not allow: {denied}"
