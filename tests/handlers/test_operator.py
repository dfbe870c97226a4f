"""The operator, as a process with the chart's identity, against the real API server and controller manager,
with real Postgres and Redis (docs/design.md#reconciliation, #testing).

The controller manager creates each Deployment's ReplicaSet and pods and garbage-collects owned objects. There is
no kubelet: where a test needs a Deployment to become available, it plays the kubelet by marking the pods Running
and Ready through their status subresource (``Cluster.play_kubelet``), and the real Deployment controller computes
the availability the operator follows.
"""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

import asyncpg
import yaml

from promptcache.operator.constants import API_VERSION, CHECKSUM_ANNOTATION, FINALIZER
from promptcache.proxy.config import parse_config
from promptcache.proxy.storage import schema

from support.cluster import Cluster, eventually
from support.operator_process import OperatorEnvironment, StartOperator
from support.proxy import unique
from support.resources import condition, model, policy, tariffs

assert FINALIZER == "promptcache.io/finalizer"


async def get_model(kube: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    return await kube.get_or_none(API_VERSION, "deployedmodels", ns, name)


async def test_model_lifecycle_create_update_status_only_delete(
        kube: Cluster, start_operator: StartOperator, pg_dsn: str) -> None:
    alias = unique("llama")
    ns = await kube.namespace("llm")
    async with start_operator(namespaces=[ns]):
        await kube.create(policy("standard", ns=ns))
        await kube.create(model("llama", alias, "standard", ns=ns))

        async def rendered() -> dict[str, Any] | None:
            obj = await get_model(kube, ns, "llama")
            return obj if (obj or {}).get("status", {}).get("configChecksum") else None

        obj = await eventually(rendered, what="the model's first reconcile")
        assert obj is not None
        uid = obj["metadata"]["uid"]
        status = obj["status"]
        assert status["observedGeneration"] == obj["metadata"]["generation"]
        assert status["endpoint"] == f"http://llama-proxy.{ns}.svc:80/v1"
        assert status["endpoints"] == {"openai": f"http://llama-proxy.{ns}.svc:80/v1"}
        assert status["mode"] == "gateway"
        assert [(condition(obj, k) or {}).get("status") for k in ("Ready", "Reconciling", "Stalled")] == [
            "False", "True", "False"]
        assert obj["metadata"]["finalizers"] == ["promptcache.io/finalizer"]
        assert all(k.partition("/")[0].endswith("promptcache.io") for k in obj["metadata"].get("annotations", {}))

        cm = await kube.get("v1", "configmaps", ns, "llama-proxy-config")
        config_file = parse_config(cm["data"]["proxy.yaml"])  # the proxy's own loader: one schema
        loaded = config_file.models[alias]
        assert loaded.upstream.url == "http://vllm.llm.svc:8000/v1" and loaded.cache_policy == f"{ns}/standard"
        assert loaded.policy.enabled_ttls == ("5m", "1h") and loaded.input_per_mtok == Decimal("3.00")
        deployment = await kube.get("apps/v1", "deployments", ns, "llama-proxy")
        service = await kube.get("v1", "services", ns, "llama-proxy")
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

        await kube.roll_out(ns, "llama-proxy")

        async def ready() -> bool:
            return (condition(await get_model(kube, ns, "llama"), "Ready") or {}).get("status") == "True"

        await eventually(ready, what="Ready after the Deployment became available")
        assert (condition(await get_model(kube, ns, "llama"), "Reconciling") or {}).get("status") == "False"

        # A spec change: new config, new checksum on the pod template (a rollout), a new tariff version.
        await kube.patch(API_VERSION, "deployedmodels", ns, "llama",
                            {"spec": {"pricing": {"inputPerMTok": "2.50", "outputPerMTok": "15.00"}}})

        async def rerendered() -> dict[str, Any] | None:
            obj = await get_model(kube, ns, "llama")
            if obj is None or obj.get("status", {}).get("observedGeneration") != obj["metadata"]["generation"]:
                return None
            return obj if obj["status"]["configChecksum"] != status["configChecksum"] else None

        updated = await eventually(rerendered, what="the re-render after a spec change")
        assert updated is not None
        deployment = await kube.get("apps/v1", "deployments", ns, "llama-proxy")
        checksum = deployment["spec"]["template"]["metadata"]["annotations"][CHECKSUM_ANNOTATION]
        assert checksum == updated["status"]["configChecksum"]
        history = await tariffs(pg_dsn, alias)
        assert [(t["input_per_mtok"], t["valid_until"] is None) for t in history] == [
            (Decimal("3.00"), False), (Decimal("2.50"), True)]
        assert updated["status"]["tariffVersion"] == history[1]["version"]

        # A status-only update renders nothing.
        before = (await kube.get("v1", "configmaps", ns, "llama-proxy-config"))["metadata"]["resourceVersion"]
        deployment_rv = deployment["metadata"]["resourceVersion"]
        await kube.patch_status(API_VERSION, "deployedmodels", ns, "llama", {"endpoint": "http://tampered"})
        await kube.create(model("marker", unique("marker"), "standard", ns=ns))  # a later event to wait for
        await eventually(lambda: _has_status(kube, ns, "marker"), what="the later model's reconcile")
        cm_after = await kube.get("v1", "configmaps", ns, "llama-proxy-config")
        assert cm_after["metadata"]["resourceVersion"] == before
        assert (await kube.get("apps/v1", "deployments", ns, "llama-proxy"))["metadata"]["resourceVersion"] == \
            deployment_rv

        # The real controllers made the ReplicaSets (one per rollout) and their pods, owned by the Deployment.
        deployment = await kube.get("apps/v1", "deployments", ns, "llama-proxy")
        async def owned_by(uids: set[str], group_version: str, plural: str) -> set[str]:
            return {o["metadata"]["uid"] for o in await kube.list(group_version, plural, ns)
                    if {r["uid"] for r in o["metadata"].get("ownerReferences", [])} & uids}

        replica_sets = await owned_by({deployment["metadata"]["uid"]}, "apps/v1", "replicasets")
        pods = await owned_by(replica_sets, "v1", "pods")
        assert replica_sets and pods

        # Delete: the tariff closes, the finalizer goes, the garbage collector deletes everything the model owned,
        # down to the Deployment's ReplicaSets and pods.
        await kube.delete(API_VERSION, "deployedmodels", ns, "llama")

        async def gone() -> bool:
            return await get_model(kube, ns, "llama") is None and \
                await kube.get_or_none("apps/v1", "deployments", ns, "llama-proxy") is None and \
                await kube.get_or_none("v1", "configmaps", ns, "llama-proxy-config") is None and \
                await kube.get_or_none("v1", "services", ns, "llama-proxy") is None and \
                not await owned_by({deployment["metadata"]["uid"]}, "apps/v1", "replicasets") and \
                not await owned_by(replica_sets, "v1", "pods")

        await eventually(gone, within=60, what="the model and everything it owned to be deleted")
        assert all(t["valid_until"] is not None for t in await tariffs(pg_dsn, alias))
        events = await eventually(lambda: _events_with(kube, ns, "llama", "Rendered"), what="the Rendered event")
        assert not any(e["reason"].startswith("Handler") for e in events), "kopf's chatter stays out of events"


async def _events_with(kube: Cluster, ns: str, name: str, reason: str) -> list[dict[str, Any]] | None:
    """The object's events once one has ``reason`` (kopf posts events asynchronously)."""
    events = await kube.events(ns, involving=name)
    return events if any(e["reason"] == reason for e in events) else None


async def _has_status(kube: Cluster, ns: str, name: str) -> bool:
    return bool(((await get_model(kube, ns, name)) or {}).get("status", {}).get("observedGeneration"))


async def test_missing_policy_stalls_then_recovers_and_invalid_spec_stalls(
        kube: Cluster, start_operator: StartOperator) -> None:
    ns = await kube.namespace("llm")
    async with start_operator(namespaces=[ns]):
        await kube.create(model("orphan", unique("orphan"), "later", ns=ns))

        async def stalled(name: str, reason: str) -> bool:
            c = condition(await get_model(kube, ns, name), "Stalled") or {}
            return c.get("status") == "True" and c.get("reason") == reason

        await eventually(lambda: stalled("orphan", "CachePolicyNotFound"), what="CachePolicyNotFound")
        assert await kube.get_or_none("apps/v1", "deployments", ns, "orphan-proxy") is None

        # What the schema admits and only the operator can refuse (a bad price is the server's to reject): a
        # sidecar server with no port for the proxy to call.
        bad = model("broken", unique("broken"), "later", ns=ns, server={"name": "vllm", "image": "vllm/vllm:v0.9"})
        del bad["spec"]["upstream"]["url"]
        await kube.create(bad)
        # And one the security baseline refuses: a privileged server reading a Secret the operator does not allow.
        exposed = model("exposed", unique("exposed"), "later", ns=ns, server={
            "name": "vllm", "image": "vllm/vllm:v0.9", "ports": [{"containerPort": 8000}],
            "securityContext": {"privileged": True}, "envFrom": [{"secretRef": {"name": "promptcache-postgres"}}]})
        del exposed["spec"]["upstream"]["url"]
        await kube.create(exposed)
        await kube.create(policy("later", ns=ns))

        async def recovered() -> bool:
            obj = await get_model(kube, ns, "orphan")
            return (condition(obj, "Stalled") or {}).get("status") == "False" and \
                await kube.get_or_none("apps/v1", "deployments", ns, "orphan-proxy") is not None

        await eventually(recovered, what="the orphan to recover once its policy exists")
        await eventually(lambda: stalled("broken", "InvalidSpec"), what="InvalidSpec")
        message = (condition(await get_model(kube, ns, "broken"), "Stalled") or {})["message"]
        assert "containerPort" in message
        assert await kube.get_or_none("v1", "configmaps", ns, "broken-proxy-config") is None
        await eventually(lambda: stalled("exposed", "InvalidSpec"), what="the baseline's InvalidSpec")
        message = (condition(await get_model(kube, ns, "exposed"), "Stalled") or {})["message"]
        assert "spec.server.securityContext.privileged: a privileged server is not allowed" in message
        assert "spec.server.envFrom[0].secretRef: Secret 'promptcache-postgres' is not one the operator lets " \
            "servers read" in message
        assert await kube.get_or_none("apps/v1", "deployments", ns, "exposed-proxy") is None
        assert (await kube.list("v1", "configmaps", ns))  # the operator kept running and rendering


async def test_sidecar_mode_points_the_proxy_at_the_server_over_localhost(
        kube: Cluster, start_operator: StartOperator) -> None:
    ns = await kube.namespace("llm")
    server = {"name": "vllm", "image": "vllm/vllm-openai:v0.9", "args": ["--model", "llama"],
              "ports": [{"containerPort": 8000}]}
    spec = model("side", unique("side"), "standard", ns=ns, server=server)
    del spec["spec"]["upstream"]["url"]
    async with start_operator(namespaces=[ns]):
        await kube.create(policy("standard", ns=ns))
        await kube.create(spec)
        await eventually(lambda: _has_status(kube, ns, "side"), what="the sidecar model's reconcile")
        obj = await get_model(kube, ns, "side")
        assert obj is not None and obj["status"]["mode"] == "sidecar"
        deployment = await kube.get("apps/v1", "deployments", ns, "side-proxy")
        assert [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]] == ["proxy", "vllm"]
        cm = await kube.get("v1", "configmaps", ns, "side-proxy-config")
        upstream = yaml.safe_load(cm["data"]["proxy.yaml"])["models"][0]["upstream"]
        assert upstream["url"] == "http://127.0.0.1:8000/v1"


async def test_startup_applies_migrations_to_an_empty_database(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, empty_pg_dsn: str) -> None:
    ns = await kube.namespace("llm")
    environment = dataclasses.replace(operator_env, database_url=empty_pg_dsn)
    async with start_operator(namespaces=[ns], environment=environment):
        conn = await asyncpg.connect(empty_pg_dsn)
        try:
            applied = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
            assert applied == [m.version for m in schema.available()] == list(range(1, len(applied) + 1))
        finally:
            await conn.close()


async def test_deleting_the_policy_stalls_its_models_and_forgets_their_tariffs(
        kube: Cluster, start_operator: StartOperator) -> None:
    ns = await kube.namespace("llm")
    alias = unique("gone")
    async with start_operator(namespaces=[ns]):
        await kube.create(policy("doomed", ns=ns))
        await kube.create(model("bound", alias, "doomed", ns=ns))

        async def recorded() -> bool:
            obj = await kube.get_or_none(API_VERSION, "cachepolicies", ns, "doomed")
            return alias in ((obj or {}).get("status") or {}).get("tariffVersions", {})

        await eventually(recorded, what="the policy to list the model's tariff")
        await kube.create(model("other", unique("other"), "doomed", ns=ns))
        await eventually(lambda: _has_status(kube, ns, "other"), what="the second model's reconcile")
        await kube.delete(API_VERSION, "deployedmodels", ns, "other")

        async def forgotten() -> bool:
            obj = await kube.get_or_none(API_VERSION, "cachepolicies", ns, "doomed")
            versions = ((obj or {}).get("status") or {}).get("tariffVersions", {})
            return alias in versions and len(versions) == 1

        await eventually(forgotten, what="the deleted model to leave the policy's tariffVersions")
        await kube.delete(API_VERSION, "cachepolicies", ns, "doomed")

        async def stalled() -> bool:
            c = condition(await get_model(kube, ns, "bound"), "Stalled") or {}
            return c.get("status") == "True" and c.get("reason") == "CachePolicyNotFound"

        await eventually(stalled, what="the bound model to stall once its policy is gone")
