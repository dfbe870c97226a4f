"""The kube harness itself: kopf's real loop against the kmock emulator (docs/design.md#testing), with a throwaway
registry.

The handlers stand in for the operator's: they write through the ``kubernetes`` client found the way kopf finds
its cluster (in-cluster, else ``$KUBECONFIG``), patch the status, post events, and keep kopf's progress in
annotations under ``promptcache.io`` (docs/design.md#reconciliation). The test drives the emulator over plain HTTP and
reads it back.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

import kopf
import kubernetes
import pytest

from promptcache.operator.handlers.kube import load_configuration

from support.apiserver import (
    DEPLOYED_MODELS,
    GROUP,
    GROUP_VERSION,
    VERSION,
    EmulatedCluster,
    KubeError,
    emulated_cluster,
    eventually,
    running_operator,
)

NS = "team-a"
PLURAL = "deployedmodels"


def kube_api() -> kubernetes.client.ApiClient:
    """An API client configured the way the operator finds its cluster (in-cluster, else ``$KUBECONFIG``)."""
    return kubernetes.client.ApiClient(load_configuration())


def render_config_map(namespace: str, name: str, spec: dict[str, Any], owner: kopf.Body) -> None:
    """Create or replace the model's ConfigMap (level-based: whatever is there is converged)."""
    body = kubernetes.client.V1ConfigMap.from_dict({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-proxy", "namespace": namespace,
                     "ownerReferences": [kopf.build_owner_reference(owner)]},
        "data": {"alias": str(spec.get("alias")), "replicas": str(spec.get("replicas"))},
    })
    assert body is not None
    with kube_api() as client:
        core = kubernetes.client.CoreV1Api(client)
        try:
            core.create_namespaced_config_map(namespace, body)
        except kubernetes.client.ApiException as e:
            if e.status != 409:
                raise
            core.replace_namespaced_config_map(f"{name}-proxy", namespace, body)


class Recorder:
    """What the handlers did, in order; appended from kopf's thread, read from the test's."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.seen_versions: dict[str, set[str]] = {}
        self.slow_started = threading.Event()
        self.slow_may_finish = threading.Event()

    def count(self, what: str, name: str) -> int:
        return self.calls.count((what, name))


def make_registry(rec: Recorder) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = "promptcache.io/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="promptcache.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="promptcache.io", key="last-handled-configuration")

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def saw(name: str, meta: kopf.Meta, **_: Any) -> None:
        rec.seen_versions.setdefault(name, set()).add(str(meta.get("resourceVersion")))

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    async def created(name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body, patch: kopf.Patch,
                      **_: Any) -> None:
        assert namespace is not None
        rec.calls.append(("create", name))
        if name.startswith("slow"):
            rec.slow_started.set()
            if not rec.slow_may_finish.is_set():
                await asyncio.sleep(60)  # killed here
        await asyncio.to_thread(render_config_map, namespace, name, dict(spec), body)
        patch.status["phase"] = "Ready"
        patch.status["observedGeneration"] = body.meta.get("generation")
        kopf.info(body, reason="Rendered", message=f"ConfigMap {name}-proxy rendered")

    @kopf.on.update(GROUP, VERSION, PLURAL, registry=registry)
    async def updated(name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body, patch: kopf.Patch,
                      **_: Any) -> None:
        assert namespace is not None
        rec.calls.append(("update", name))
        await asyncio.to_thread(render_config_map, namespace, name, dict(spec), body)
        patch.status["observedGeneration"] = body.meta.get("generation")

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    def resumed(name: str, **_: Any) -> None:
        rec.calls.append(("resume", name))

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def deleted(name: str, **_: Any) -> None:
        rec.calls.append(("delete", name))

    return registry


def model(name: str, alias: str, replicas: int = 1) -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "DeployedModel", "metadata": {"name": name, "namespace": NS},
            "spec": {"alias": alias, "replicas": replicas}}


async def get_model(cluster: EmulatedCluster, name: str) -> dict[str, Any]:
    return await cluster.get(GROUP_VERSION, PLURAL, NS, name)


async def settled(cluster: EmulatedCluster, rec: Recorder, name: str) -> None:
    """Make a status-only change and wait until kopf's event handler has seen it. kopf handles one object's events
    one after another, so by then the cycles of all the earlier events, their change handlers included, are over:
    a handler that has not run yet will not run for them."""
    marker = await cluster.patch_status(GROUP_VERSION, PLURAL, NS, name, {"marker": os.urandom(4).hex()})
    version = marker["metadata"]["resourceVersion"]
    await eventually(lambda: version in rec.seen_versions.get(name, set()), what=f"kopf to see {name}@{version}")


async def with_status(cluster: EmulatedCluster, name: str, field: str) -> dict[str, Any] | None:
    obj = await get_model(cluster, name)
    return obj if field in obj.get("status", {}) else None


async def observed(cluster: EmulatedCluster, name: str, generation: int) -> bool:
    obj = await get_model(cluster, name)
    return bool(obj.get("status", {}).get("observedGeneration") == generation)


async def test_operator_reconciles_against_the_emulator() -> None:
    rec = Recorder()
    registry = make_registry(rec)
    async with emulated_cluster(namespaces=["default", NS]) as cluster:
        async with running_operator(cluster, registry=registry, namespaces=[NS], watching=[DEPLOYED_MODELS]):
            # Create: the handler runs once, writes a ConfigMap through the API client, patches the status.
            await cluster.create(model("m1", "claude"))
            m1 = await eventually(lambda: with_status(cluster, "m1", "phase"), what="m1's status")
            assert m1["status"]["phase"] == "Ready"
            assert m1["status"]["observedGeneration"] == 1
            cm = await cluster.get("v1", "configmaps", NS, "m1-proxy")
            assert cm["data"] == {"alias": "claude", "replicas": "1"}
            assert cm["metadata"]["ownerReferences"][0]["uid"] == m1["metadata"]["uid"]
            assert rec.calls == [("create", "m1")]

            # Our own finalizer and annotation prefix (docs/design.md#reconciliation), none of kopf's defaults.
            assert m1["metadata"]["finalizers"] == ["promptcache.io/finalizer"]
            annotations = m1["metadata"]["annotations"]
            assert "promptcache.io/last-handled-configuration" in annotations
            assert all(key.startswith("promptcache.io/") for key in annotations), annotations

            # The handler's event reached the emulator.
            events = await eventually(lambda: cluster.events(NS, involving="m1"), what="m1's event")
            assert [(e["reason"], e["type"], e["message"]) for e in events] == [
                ("Rendered", "Normal", "ConfigMap m1-proxy rendered")]

            # A spec change runs the update handler, which converges the ConfigMap.
            await cluster.patch(GROUP_VERSION, PLURAL, NS, "m1", {"spec": {"replicas": 3}})
            await eventually(lambda: observed(cluster, "m1", 2), what="observedGeneration 2")
            assert (await cluster.get("v1", "configmaps", NS, "m1-proxy"))["data"]["replicas"] == "3"
            assert rec.calls == [("create", "m1"), ("update", "m1")]

            # A status-only change is no change of the object for its handlers.
            patched = await cluster.patch_status(GROUP_VERSION, PLURAL, NS, "m1", {"external": "touched"})
            assert patched["metadata"]["generation"] == 2
            await settled(cluster, rec, "m1")
            assert rec.calls == [("create", "m1"), ("update", "m1")]

        # Restarted, the operator resumes m1 and re-runs nothing: the progress is in m1's annotations.
        async with running_operator(cluster, registry=registry, namespaces=[NS], watching=[DEPLOYED_MODELS]) as op:
            await eventually(lambda: rec.count("resume", "m1") == 1, what="the resume handler")
            await settled(cluster, rec, "m1")
            assert rec.calls == [("create", "m1"), ("update", "m1"), ("resume", "m1")]

            # Killed in the middle of a handler ...
            await cluster.create(model("slow1", "gpt"))
            await eventually(rec.slow_started.is_set, what="the slow handler to start")
            await op.kill()
            assert not op.running
        slow1 = await get_model(cluster, "slow1")
        assert "status" not in slow1
        assert await cluster.get_or_none("v1", "configmaps", NS, "slow1-proxy") is None

        # ... the operator runs it again after a restart.
        rec.slow_may_finish.set()
        async with running_operator(cluster, registry=registry, namespaces=[NS], watching=[DEPLOYED_MODELS]):
            await eventually(lambda: with_status(cluster, "slow1", "phase"), what="slow1's status")
            assert rec.count("create", "slow1") == 2
            assert (await cluster.get("v1", "configmaps", NS, "slow1-proxy"))["data"]["alias"] == "gpt"

            # Deletion runs the delete handler behind our finalizer; the owned ConfigMap is garbage-collected.
            await cluster.delete(GROUP_VERSION, PLURAL, NS, "m1")
            await eventually(lambda: _gone(cluster, GROUP_VERSION, PLURAL, "m1"), what="m1 to go")
            assert rec.count("delete", "m1") == 1
            assert await cluster.get_or_none("v1", "configmaps", NS, "m1-proxy") is None
        assert rec.count("create", "m1") == 1 and rec.count("update", "m1") == 1


async def _gone(cluster: EmulatedCluster, group_version: str, plural: str, name: str) -> bool:
    return await cluster.get_or_none(group_version, plural, NS, name) is None


async def test_emulator_semantics() -> None:
    """What the operator's code may rely on from the emulator (and what a real API server does likewise)."""
    async with emulated_cluster(namespaces=[NS]) as cluster:
        created = await cluster.create({**model("m", "a"), "status": {"phase": "dropped"}})
        meta = created["metadata"]
        assert meta["generation"] == 1 and meta["uid"] and meta["resourceVersion"] and meta["creationTimestamp"]
        assert "status" not in created  # the status subresource: not writable on create

        # Writes to the object leave the status alone; writes to /status change only the status.
        after = await cluster.patch(GROUP_VERSION, PLURAL, NS, "m", {"spec": {"replicas": 2}, "status": {"x": 1}})
        assert after["metadata"]["generation"] == 2 and "status" not in after
        after = await cluster.patch_status(GROUP_VERSION, PLURAL, NS, "m", {"x": 1})
        assert after["status"] == {"x": 1} and after["metadata"]["generation"] == 2
        after = await cluster.patch(GROUP_VERSION, PLURAL, NS, "m", {"spec": {"replicas": 9}, "status": {"x": 2}},
                                    subresource="status")
        assert after["spec"]["replicas"] == 2 and after["status"] == {"x": 2}

        # Optimistic concurrency: a stale resourceVersion is a 409 (merge) or a 422 (JSON patch test op).
        stale = meta["resourceVersion"]
        with pytest.raises(KubeError) as conflict:
            await cluster.patch(GROUP_VERSION, PLURAL, NS, "m", {"metadata": {"resourceVersion": stale}})
        assert conflict.value.status == 409
        with pytest.raises(KubeError) as invalid:
            await cluster.patch(GROUP_VERSION, PLURAL, NS, "m", [
                {"op": "test", "path": "/metadata/resourceVersion", "value": stale},
                {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
            ], patch_type="json")
        assert invalid.value.status == 422
        with pytest.raises(KubeError) as unsupported:
            await cluster.patch(GROUP_VERSION, PLURAL, NS, "m", {"spec": {}}, patch_type="strategic")
        assert unsupported.value.status == 415
        with pytest.raises(KubeError) as duplicate:
            await cluster.create(model("m", "b"))
        assert duplicate.value.status == 409

        # generateName: five characters of the API server's alphabet, drawn again when taken, so even
        # a namespace full of kopf's events gets no 409 (KEP-4420).
        generated = [(await cluster.create({"apiVersion": "v1", "kind": "Event", "metadata": {
            "generateName": "kopf-event-", "namespace": NS}}))["metadata"]["name"] for _ in range(300)]
        assert len(set(generated)) == 300
        assert all(len(n) == len("kopf-event-") + 5 and set(n[11:]) <= set("bcdfghjklmnpqrstvwxz2456789")
                   for n in generated)

        # Label selectors.
        await cluster.patch(GROUP_VERSION, PLURAL, NS, "m", {"metadata": {"labels": {"tier": "gold"}}})
        await cluster.create(model("n", "b"))
        names = [o["metadata"]["name"] for o in await cluster.list(GROUP_VERSION, PLURAL, NS,
                                                                     label_selector="tier in (gold,silver)")]
        assert names == ["m"]
        names = [o["metadata"]["name"] for o in await cluster.list(GROUP_VERSION, PLURAL, label_selector="!tier")]
        assert names == ["n"]

        # Finalizers hold a deletion; ownerReferences garbage-collect the dependants once the owner is gone.
        owner = await cluster.patch(GROUP_VERSION, PLURAL, NS, "m", {"metadata": {"finalizers": ["x/y"]}})
        await cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "m-cm", "namespace": NS, "ownerReferences": [{
                "apiVersion": GROUP_VERSION, "kind": "DeployedModel", "name": "m", "uid": owner["metadata"]["uid"]}]}})
        deleting = await cluster.delete(GROUP_VERSION, PLURAL, NS, "m")
        assert deleting["metadata"]["deletionTimestamp"]
        assert await cluster.get_or_none("v1", "configmaps", NS, "m-cm") is not None
        await cluster.patch(GROUP_VERSION, PLURAL, NS, "m", {"metadata": {"finalizers": None}})
        assert await cluster.get_or_none(GROUP_VERSION, PLURAL, NS, "m") is None
        assert await cluster.get_or_none("v1", "configmaps", NS, "m-cm") is None

        # A watch resumed from a resourceVersion gets what happened after it, in order; timeoutSeconds ends it.
        url = f"{cluster.url}/apis/{GROUP_VERSION}/namespaces/{NS}/{PLURAL}"
        params = {"watch": "true", "resourceVersion": meta["resourceVersion"], "timeoutSeconds": "0.2"}
        async with cluster.session.get(url, params=params) as response:
            events = [json.loads(line) for line in (await response.text()).splitlines()]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
            ("MODIFIED", "m"), ("MODIFIED", "m"), ("MODIFIED", "m"), ("MODIFIED", "m"),  # spec, status x2, labels
            ("ADDED", "n"),
            ("MODIFIED", "m"), ("MODIFIED", "m"), ("DELETED", "m"),  # finalizer, deletion mark, finalizer gone
        ]
        versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        assert versions == sorted(versions)
