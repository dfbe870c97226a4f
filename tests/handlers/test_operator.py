"""The operator's real kopf loop against the kmock emulator, with real Postgres and Redis
(docs/design.md#reconciliation, #testing).

Kubernetes has no controllers here: the tests play the Deployment controller by patching a
Deployment's status, and the emulator garbage-collects owned objects as the API server would.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import yaml

import promptcache.operator.main  # noqa: F401  (registers the handlers)
from promptcache.operator.constants import CHECKSUM_ANNOTATION, FINALIZER
from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.manifests import OperatorSettings
from promptcache.operator.handlers.state import OperatorMemo
from promptcache.proxy.config import parse_config

from support.apiserver import (
    CACHE_POLICIES,
    CONFIGMAPS,
    DEPLOYED_MODELS,
    DEPLOYMENTS,
    GROUP_VERSION,
    SERVICES,
    EmulatedCluster,
    emulated_cluster,
    eventually,
    running_operator,
)
from support.proxy import unique
from support.resources import NS, condition, model, policy, tariffs

WATCHING = (DEPLOYED_MODELS, CACHE_POLICIES, DEPLOYMENTS)
assert FINALIZER == "promptcache.io/finalizer"


@pytest.fixture
async def cluster() -> AsyncIterator[EmulatedCluster]:
    async with emulated_cluster(namespaces=("default", NS)) as c:
        yield c


@pytest.fixture
def config(pg_dsn: str, redis_url: str) -> OperatorConfig:
    prefix = f"optest:{secrets.token_hex(4)}:"
    return OperatorConfig(database_url=pg_dsn, redis_url=redis_url,
                          manifests=OperatorSettings(proxy_image="promptcache:test", database_secret="pg/dsn",
                                                     redis_url=redis_url, redis_prefix=prefix))


async def get_model(cluster: EmulatedCluster, name: str) -> dict[str, Any] | None:
    return await cluster.get_or_none(GROUP_VERSION, "deployedmodels", NS, name)


async def make_available(cluster: EmulatedCluster, name: str) -> None:
    """Play the Deployment controller: every replica updated and available."""
    deployment = await cluster.get("apps/v1", "deployments", NS, f"{name}-proxy")
    replicas = deployment["spec"]["replicas"]
    await cluster.patch_status("apps/v1", "deployments", NS, f"{name}-proxy", {
        "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas})


async def test_model_lifecycle_create_update_status_only_delete(
        cluster: EmulatedCluster, config: OperatorConfig, pg_dsn: str) -> None:
    alias = unique("llama")
    memo = OperatorMemo(config=config)
    async with running_operator(cluster, memo=memo, namespaces=[NS], watching=WATCHING):
        await cluster.create(policy("standard"))
        await cluster.create(model("llama", alias, "standard"))

        async def rendered() -> dict[str, Any] | None:
            obj = await get_model(cluster, "llama")
            return obj if (obj or {}).get("status", {}).get("configChecksum") else None

        obj = await eventually(rendered, what="the model's first reconcile")
        assert obj is not None
        uid = obj["metadata"]["uid"]
        status = obj["status"]
        assert status["observedGeneration"] == obj["metadata"]["generation"]
        assert status["endpoint"] == f"http://llama-proxy.{NS}.svc:80/v1"
        assert status["mode"] == "gateway"
        assert [(condition(obj, k) or {}).get("status") for k in ("Ready", "Reconciling", "Stalled")] == [
            "False", "True", "False"]
        assert obj["metadata"]["finalizers"] == ["promptcache.io/finalizer"]
        assert all(k.startswith("promptcache.io/") for k in obj["metadata"].get("annotations", {}))

        cm = await cluster.get("v1", "configmaps", NS, "llama-proxy-config")
        config_file = parse_config(cm["data"]["proxy.yaml"])  # the proxy's own loader: one schema
        loaded = config_file.models[alias]
        assert loaded.upstream.url == "http://vllm.llm.svc:8000/v1" and loaded.cache_policy == f"{NS}/standard"
        assert loaded.policy.enabled_ttls == ("5m", "1h") and loaded.input_per_mtok == Decimal("3.00")
        deployment = await cluster.get("apps/v1", "deployments", NS, "llama-proxy")
        service = await cluster.get("v1", "services", NS, "llama-proxy")
        for owned in (cm, deployment, service):
            assert [(r["kind"], r["uid"], r.get("controller")) for r in owned["metadata"]["ownerReferences"]] == [
                ("DeployedModel", uid, True)]
        template = deployment["spec"]["template"]
        assert template["metadata"]["annotations"][CHECKSUM_ANNOTATION] == status["configChecksum"]
        [proxy] = template["spec"]["containers"]
        assert proxy["image"] == "promptcache:test"
        assert proxy["securityContext"]["runAsNonRoot"] and proxy["securityContext"]["readOnlyRootFilesystem"]
        assert not proxy["securityContext"]["allowPrivilegeEscalation"]
        assert {"name": "PROMPTCACHE_DATABASE_URL",
                "valueFrom": {"secretKeyRef": {"name": "pg", "key": "dsn"}}} in proxy["env"]
        [v1] = await tariffs(pg_dsn, alias)
        assert status["tariffVersion"] == v1["version"] and v1["valid_until"] is None

        await make_available(cluster, "llama")

        async def ready() -> bool:
            return (condition(await get_model(cluster, "llama"), "Ready") or {}).get("status") == "True"

        await eventually(ready, what="Ready after the Deployment became available")
        assert (condition(await get_model(cluster, "llama"), "Reconciling") or {}).get("status") == "False"

        # A spec change: new config, new checksum on the pod template (a rollout), a new tariff version.
        await cluster.patch(GROUP_VERSION, "deployedmodels", NS, "llama",
                            {"spec": {"pricing": {"inputPerMTok": "2.50", "outputPerMTok": "15.00"}}})

        async def rerendered() -> dict[str, Any] | None:
            obj = await get_model(cluster, "llama")
            if obj is None or obj.get("status", {}).get("observedGeneration") != obj["metadata"]["generation"]:
                return None
            return obj if obj["status"]["configChecksum"] != status["configChecksum"] else None

        updated = await eventually(rerendered, what="the re-render after a spec change")
        assert updated is not None
        deployment = await cluster.get("apps/v1", "deployments", NS, "llama-proxy")
        checksum = deployment["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION]
        assert checksum == updated["status"]["configChecksum"]
        history = await tariffs(pg_dsn, alias)
        assert [(t["input_per_mtok"], t["valid_until"] is None) for t in history] == [
            (Decimal("3.00"), False), (Decimal("2.50"), True)]
        assert updated["status"]["tariffVersion"] == history[1]["version"]

        # A status-only update renders nothing.
        before = (await cluster.get("v1", "configmaps", NS, "llama-proxy-config"))["metadata"]["resourceVersion"]
        deployment_rv = deployment["metadata"]["resourceVersion"]
        await cluster.patch_status(GROUP_VERSION, "deployedmodels", NS, "llama", {"endpoint": "http://tampered"})
        await cluster.create(model("marker", unique("marker"), "standard"))  # a later event to wait for
        await eventually(lambda: _has_status(cluster, "marker"), what="the later model's reconcile")
        cm_after = await cluster.get("v1", "configmaps", NS, "llama-proxy-config")
        assert cm_after["metadata"]["resourceVersion"] == before
        assert (await cluster.get("apps/v1", "deployments", NS, "llama-proxy"))["metadata"]["resourceVersion"] == \
            deployment_rv

        # Delete: the tariff closes, the finalizer goes, owned objects are garbage-collected.
        await cluster.delete(GROUP_VERSION, "deployedmodels", NS, "llama")

        async def gone() -> bool:
            return await get_model(cluster, "llama") is None and \
                await cluster.get_or_none("apps/v1", "deployments", NS, "llama-proxy") is None

        await eventually(gone, what="the model and its objects to be deleted")
        assert await cluster.get_or_none("v1", "configmaps", NS, "llama-proxy-config") is None
        assert await cluster.get_or_none("v1", "services", NS, "llama-proxy") is None
        assert all(t["valid_until"] is not None for t in await tariffs(pg_dsn, alias))
        events = await eventually(lambda: _events_with(cluster, "llama", "Rendered"), what="the Rendered event")
        assert not any(e["reason"].startswith("Handler") for e in events), "kopf's chatter stays out of events"


async def _events_with(cluster: EmulatedCluster, name: str, reason: str) -> list[dict[str, Any]] | None:
    """The object's events once one has ``reason`` (kopf posts events asynchronously)."""
    events = await cluster.events(NS, involving=name)
    return events if any(e["reason"] == reason for e in events) else None


async def _has_status(cluster: EmulatedCluster, name: str) -> bool:
    return bool(((await get_model(cluster, name)) or {}).get("status", {}).get("observedGeneration"))


async def test_missing_policy_stalls_then_recovers_and_invalid_spec_stalls(
        cluster: EmulatedCluster, config: OperatorConfig) -> None:
    async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING):
        await cluster.create(model("orphan", unique("orphan"), "later"))

        async def stalled(name: str, reason: str) -> bool:
            c = condition(await get_model(cluster, name), "Stalled") or {}
            return c.get("status") == "True" and c.get("reason") == reason

        await eventually(lambda: stalled("orphan", "CachePolicyNotFound"), what="CachePolicyNotFound")
        assert await cluster.get_or_none("apps/v1", "deployments", NS, "orphan-proxy") is None

        bad = model("broken", unique("broken"), "later")
        bad["spec"]["pricing"]["inputPerMTok"] = "three dollars"
        await cluster.create(bad)
        await cluster.create(policy("later"))

        async def recovered() -> bool:
            obj = await get_model(cluster, "orphan")
            return (condition(obj, "Stalled") or {}).get("status") == "False" and \
                await cluster.get_or_none("apps/v1", "deployments", NS, "orphan-proxy") is not None

        await eventually(recovered, what="the orphan to recover once its policy exists")
        await eventually(lambda: stalled("broken", "InvalidSpec"), what="InvalidSpec")
        message = (condition(await get_model(cluster, "broken"), "Stalled") or {})["message"]
        assert "inputPerMTok" in message
        assert await cluster.get_or_none("v1", "configmaps", NS, "broken-proxy-config") is None
        assert (await cluster.list("v1", "configmaps", NS))  # the operator kept running and rendering


async def test_sidecar_mode_points_the_proxy_at_the_server_over_localhost(
        cluster: EmulatedCluster, config: OperatorConfig) -> None:
    server = {"name": "vllm", "image": "vllm/vllm-openai:v0.9", "args": ["--model", "llama"],
              "ports": [{"containerPort": 8000}]}
    spec = model("side", unique("side"), "standard", server=server)
    del spec["spec"]["upstream"]["url"]
    async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING):
        await cluster.create(policy("standard"))
        await cluster.create(spec)
        await eventually(lambda: _has_status(cluster, "side"), what="the sidecar model's reconcile")
        obj = await get_model(cluster, "side")
        assert obj is not None and obj["status"]["mode"] == "sidecar"
        deployment = await cluster.get("apps/v1", "deployments", NS, "side-proxy")
        assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["proxy", "vllm"]
        cm = await cluster.get("v1", "configmaps", NS, "side-proxy-config")
        upstream = yaml.safe_load(cm["data"]["proxy.yaml"])["models"][0]["upstream"]
        assert upstream["url"] == "http://127.0.0.1:8000/v1"


async def test_operator_killed_mid_reconcile_converges_without_duplicates(
        cluster: EmulatedCluster, config: OperatorConfig, pg_dsn: str) -> None:
    alias = unique("crash")
    async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING) as op:
        await cluster.create(policy("standard"))
        await cluster.create(model("crash", alias, "standard"))
        await eventually(lambda: cluster.get_or_none("v1", "configmaps", NS, "crash-proxy-config"),
                         what="the reconcile to have started")
        await op.kill()
    async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING):
        await eventually(lambda: _has_status(cluster, "crash"), what="the restarted operator to converge")
        for resource, name in ((CONFIGMAPS, "crash-proxy-config"), (DEPLOYMENTS, "crash-proxy"),
                               (SERVICES, "crash-proxy")):
            group_version, plural = resource.rsplit("/", 1)
            items = await cluster.list(group_version, plural, NS)
            assert [i["metadata"]["name"] for i in items if i["metadata"]["name"].startswith("crash-")] == [name]
        assert len([t for t in await tariffs(pg_dsn, alias) if t["valid_until"] is None]) == 1


async def test_startup_applies_migrations_to_an_empty_database(
        cluster: EmulatedCluster, empty_pg_dsn: str, redis_url: str) -> None:
    config = OperatorConfig(database_url=empty_pg_dsn, redis_url=redis_url)
    async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS]):
        conn = await asyncpg.connect(empty_pg_dsn)
        try:
            assert [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")] == [1]
        finally:
            await conn.close()


async def test_deleting_the_policy_stalls_its_models_and_forgets_their_tariffs(
        cluster: EmulatedCluster, config: OperatorConfig) -> None:
    alias = unique("gone")
    async with running_operator(cluster, memo=OperatorMemo(config=config), namespaces=[NS], watching=WATCHING):
        await cluster.create(policy("doomed"))
        await cluster.create(model("bound", alias, "doomed"))

        async def recorded() -> bool:
            obj = await cluster.get_or_none(GROUP_VERSION, "cachepolicies", NS, "doomed")
            return alias in ((obj or {}).get("status") or {}).get("tariffVersions", {})

        await eventually(recorded, what="the policy to list the model's tariff")
        await cluster.create(model("other", unique("other"), "doomed"))
        await eventually(lambda: _has_status(cluster, "other"), what="the second model's reconcile")
        await cluster.delete(GROUP_VERSION, "deployedmodels", NS, "other")

        async def forgotten() -> bool:
            obj = await cluster.get_or_none(GROUP_VERSION, "cachepolicies", NS, "doomed")
            versions = ((obj or {}).get("status") or {}).get("tariffVersions", {})
            return alias in versions and len(versions) == 1

        await eventually(forgotten, what="the deleted model to leave the policy's tariffVersions")
        await cluster.delete(GROUP_VERSION, "cachepolicies", NS, "doomed")

        async def stalled() -> bool:
            c = condition(await get_model(cluster, "bound"), "Stalled") or {}
            return c.get("status") == "True" and c.get("reason") == "CachePolicyNotFound"

        await eventually(stalled, what="the bound model to stall once its policy is gone")
