"""A model's pod guards against the real API server and controller manager (docs/design.md#pod-guards): the operator,
with the chart's identity, keeps a NetworkPolicy for header auth mode and a PodDisruptionBudget for more than one
replica, deletes them when they are no longer wanted, and stalls a model whose gateway the API server refuses.

The budget is exercised as a drain would: the real disruption controller computes its status and the eviction API
refuses the second of two proxies. The NetworkPolicy is checked as the server stores it; there is no network plugin
here, so what a plugin enforces from it is not tested.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml

from promptcache.operator.constants import API_VERSION

from support.cluster import Cluster, KubeError, eventually
from support.operator_process import OperatorEnvironment, StartOperator, audited
from support.proxy import unique
from support.resources import condition, model, policy

NETWORKING, POLICY = "networking.k8s.io/v1", "policy/v1"
SELECTOR = {"app.kubernetes.io/name": "promptcache-proxy", "promptcache.io/deployedmodel": "llama"}
GATEWAY = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
            "podSelector": {"matchLabels": {"app": "envoy"}}}]
PORT = [{"protocol": "TCP", "port": 8080}]
METRICS = [{"protocol": "TCP", "port": 9090}]
"""The gateway reaches the API's port only, the scrapers the metrics port only."""


async def reconciled(kube: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    obj = await kube.get_or_none(API_VERSION, "deployedmodels", ns, name)
    status = (obj or {}).get("status") or {}
    if obj is None or status.get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    return obj


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    return [(r["kind"], r["uid"], r.get("controller")) for r in obj["metadata"].get("ownerReferences", [])] == [
        ("DeployedModel", owner["metadata"]["uid"], True)]


async def evict(kube: Cluster, ns: str, pod: str) -> None:
    await kube.call("POST", f"/api/v1/namespaces/{ns}/pods/{pod}/eviction", json={
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": ns}})


async def test_header_mode_is_guarded_and_a_drain_takes_one_proxy_at_a_time(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment) -> None:
    ns = await kube.namespace("guards")
    environment = dataclasses.replace(operator_env, extra={
        "PROMPTCACHE_METRICS_NAMESPACE": "monitoring",
        "PROMPTCACHE_METRICS_POD_LABELS": '{"app.kubernetes.io/name": "prometheus"}'})
    proxy = {"replicas": 2, "auth": {"mode": "header", "header": "X-Tenant"}, "networkPolicy": {"gateway": GATEWAY}}
    async with start_operator(namespaces=[ns], environment=environment):
        await kube.create(policy("standard", ns=ns))
        await kube.create(model("llama", unique("guarded"), "standard", ns=ns, proxy=proxy))
        obj = await eventually(lambda: reconciled(kube, ns, "llama"), what="the model's first reconcile")
        assert obj is not None and (condition(obj, "Stalled") or {}).get("status") == "False"

        network = await kube.get(NETWORKING, "networkpolicies", ns, "llama-proxy")
        assert owned_by(network, obj)
        assert network["spec"] == {
            "podSelector": {"matchLabels": SELECTOR},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": GATEWAY, "ports": PORT},
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                           "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
                 "ports": METRICS},
            ],
        }
        config = yaml.safe_load((await kube.get("v1", "configmaps", ns, "llama-proxy-config"))["data"]["proxy.yaml"])
        assert config["auth"] == {"mode": "header", "header": "X-Tenant"}
        budget = await kube.get(POLICY, "poddisruptionbudgets", ns, "llama-proxy")
        assert owned_by(budget, obj)
        assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR},
                                  "unhealthyPodEvictionPolicy": "AlwaysAllow"}

        # A reconcile that changes the config reads the guards and leaves them as they are (no replace each run).
        since = kube.plane.audit_log.stat().st_size
        await kube.patch(API_VERSION, "deployedmodels", ns, "llama",
                         {"spec": {"pricing": {"inputPerMTok": "2.50", "outputPerMTok": "15.00"}}})

        async def rerendered() -> bool:
            now = await reconciled(kube, ns, "llama")
            return now is not None and now["status"]["configChecksum"] != obj["status"]["configChecksum"]

        await eventually(rerendered, what="the re-render after a price change")
        requests = [(e["objectRef"]["resource"], e["verb"]) for e in audited(kube.plane.audit_log, since=since)
                    if (e.get("objectRef") or {}).get("namespace") == ns
                    and e["objectRef"]["resource"] in ("networkpolicies", "poddisruptionbudgets")]
        assert sorted(set(requests)) == [("networkpolicies", "get"), ("poddisruptionbudgets", "get")], requests

        # A drain: with both proxies ready the disruption controller allows one eviction; the replacement is not
        # ready yet (no kubelet), so the second proxy stays.
        await kube.roll_out(ns, "llama-proxy")

        async def budget_counted() -> dict[str, Any] | None:
            status = (await kube.get(POLICY, "poddisruptionbudgets", ns, "llama-proxy")).get("status") or {}
            wanted = {"expectedPods": 2, "currentHealthy": 2, "desiredHealthy": 1, "disruptionsAllowed": 1}
            return status if {k: status.get(k) for k in wanted} == wanted else None

        await eventually(budget_counted, what="the disruption controller to count the two proxies")
        first, second = sorted(p["metadata"]["name"] for p in await kube.list(
            "v1", "pods", ns, label_selector=",".join(f"{k}={v}" for k, v in SELECTOR.items())))
        await evict(kube, ns, first)
        with pytest.raises(KubeError) as refused:
            await evict(kube, ns, second)
        assert refused.value.status == 429 and "disruption budget" in refused.value.message
        assert await kube.get_or_none("v1", "pods", ns, second) is not None

        # Switched off: both go.
        await kube.patch(API_VERSION, "deployedmodels", ns, "llama",
                         {"spec": {"proxy": {"replicas": 1, "networkPolicy": {"enabled": False}}}})

        async def unguarded() -> bool:
            return await reconciled(kube, ns, "llama") is not None and \
                await kube.get_or_none(NETWORKING, "networkpolicies", ns, "llama-proxy") is None and \
                await kube.get_or_none(POLICY, "poddisruptionbudgets", ns, "llama-proxy") is None

        await eventually(unguarded, what="the NetworkPolicy and the budget deleted")


async def test_a_gateway_the_api_server_refuses_stalls_the_model_before_its_pods_exist(
        kube: Cluster, start_operator: StartOperator) -> None:
    """A label key the CRD does not check (the NetworkPolicy's validation is the server's): InvalidSpec with the
    server's words on the model's own field, no Deployment unguarded meanwhile; fixed, the model recovers."""
    ns = await kube.namespace("guards")
    bad = [{"podSelector": {"matchLabels": {"app/team/x": "envoy"}}}]
    async with start_operator(namespaces=[ns]):
        await kube.create(policy("standard", ns=ns))
        await kube.create(model("llama", unique("refused"), "standard", ns=ns,
                                proxy={"replicas": 1, "auth": {"mode": "header"}, "networkPolicy": {"gateway": bad}}))

        async def stalled() -> dict[str, Any] | None:
            c = condition(await reconciled(kube, ns, "llama"), "Stalled") or {}
            return c if c.get("status") == "True" and c.get("reason") == "InvalidSpec" else None

        found = await eventually(stalled, what="InvalidSpec from the server's refusal")
        assert found is not None
        assert found["message"].startswith("the API server refused the NetworkPolicy: ")
        assert "spec.proxy.networkPolicy.gateway[0].podSelector.matchLabels" in found["message"], found["message"]
        assert await kube.get_or_none("apps/v1", "deployments", ns, "llama-proxy") is None

        await kube.patch(API_VERSION, "deployedmodels", ns, "llama",
                         {"spec": {"proxy": {"networkPolicy": {"gateway": GATEWAY}}}})

        async def recovered() -> bool:
            c = condition(await reconciled(kube, ns, "llama"), "Stalled") or {}
            return c.get("status") == "False" and \
                await kube.get_or_none("apps/v1", "deployments", ns, "llama-proxy") is not None

        await eventually(recovered, what="the model to recover once its gateway is valid")
        network = await kube.get(NETWORKING, "networkpolicies", ns, "llama-proxy")
        assert network["spec"]["ingress"] == [{"from": GATEWAY, "ports": PORT}]


async def test_a_policy_of_the_same_name_the_model_does_not_own_is_left_alone(
        kube: Cluster, start_operator: StartOperator) -> None:
    ns = await kube.namespace("guards")
    theirs = {"apiVersion": NETWORKING, "kind": "NetworkPolicy", "metadata": {"name": "llama-proxy", "namespace": ns},
              "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    await kube.create(theirs)
    async with start_operator(namespaces=[ns]):
        await kube.create(policy("standard", ns=ns))
        await kube.create(model("llama", unique("theirs"), "standard", ns=ns))  # api keys: no policy wanted
        await eventually(lambda: reconciled(kube, ns, "llama"), what="the model's reconcile")
        live = await kube.get(NETWORKING, "networkpolicies", ns, "llama-proxy")
        assert live["spec"] == theirs["spec"] and not live["metadata"].get("ownerReferences")
        assert await kube.get_or_none(POLICY, "poddisruptionbudgets", ns, "llama-proxy") is not None
