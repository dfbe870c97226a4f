"""The operator's RBAC rules (docs/design.md#reconciliation): no wildcards; enough for everything the operator does;
and every verb they grant either used or named here with the reason it is kept.

What the operator needs is not listed by hand: the real operator runs with the chart's ServiceAccount and
ClusterRole against the real API server (authorization mode RBAC) through a model's and a policy's whole life,
cluster-wide (as the chart deploys it) and namespaced (``--namespace``), and the server's audit log says what it
asked for and what it was refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from promptcache.operator.constants import API_VERSION, GROUP

from support.cluster import Cluster, eventually
from support.operator_process import StartOperator, audited
from support.proxy import unique
from support.resources import model, policy

RULES = Path(__file__).resolve().parents[2] / "charts" / "promptcache" / "files" / "rbac-rules.yaml"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}

Access = tuple[str, str, str]
"""(apiGroup, resource[/subresource], verb), as a ClusterRole rule matches a request."""

# What the scenario must make the operator do, or the scenario is broken.
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

# Granted but not used by this scenario, each for a reason; anything else granted and unused fails the test, so an
# unnecessary verb is visible here.
PLAN_REPLAYS = "the PlanReplay runs (tests/handlers/test_planreplay.py, with this identity)"
FINALIZERS = ("checked by the OwnerReferencesPermissionEnforcement admission plugin (enabled in the test API "
              "server, as on OpenShift) when an owned object with blockOwnerDeletion is created; not a request")
KEPT: dict[Access, str] = {
    (GROUP, "planreplays", "get"): PLAN_REPLAYS,
    (GROUP, "planreplays", "patch"): PLAN_REPLAYS,
    (GROUP, "planreplays/status", "patch"): PLAN_REPLAYS,
    ("batch", "jobs", "create"): PLAN_REPLAYS,
    ("batch", "jobs", "get"): PLAN_REPLAYS,
    ("batch", "jobs", "delete"): PLAN_REPLAYS,
    (GROUP, "deployedmodels/finalizers", "update"): FINALIZERS,
    (GROUP, "planreplays/finalizers", "update"): FINALIZERS,
    ("", "namespaces", "list"): "kopf's namespace scanning, with --namespace only",
    ("", "namespaces", "watch"): "kopf's namespace scanning, with --namespace only",
}


def load_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(RULES.read_text())
    assert isinstance(rules, list) and rules, "a non-empty YAML list of rules"
    return rules


def granted(rules: list[dict[str, Any]]) -> set[Access]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def access_of(event: dict[str, Any]) -> Access | None:
    """What the authorizer checked for an audited request; None for a non-resource (discovery) URL."""
    ref = event.get("objectRef")
    if ref is None:
        return None
    resource = f"{ref['resource']}/{ref['subresource']}" if ref.get("subresource") else ref["resource"]
    return ref.get("apiGroup", ""), resource, event["verb"]


def test_rules_are_explicit() -> None:
    for rule in load_rules():
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
        for key in ("apiGroups", "resources", "verbs"):
            values = rule[key]
            assert isinstance(values, list) and values and all(isinstance(v, str) for v in values), rule
            assert not any("*" in v for v in values), f"a wildcard in {key}: {rule}"
        assert set(rule["verbs"]) <= VERBS, rule


async def _life_of_a_model(kube: Cluster, ns: str) -> None:
    """Create a policy and a model, change both, let the Deployment become available, delete both; each step
    awaited, and every branch of the owned objects' convergence taken (created, replaced, patched)."""

    async def reconciled() -> dict[str, Any] | None:
        obj = await kube.get_or_none(API_VERSION, "deployedmodels", ns, "llama")
        status = (obj or {}).get("status") or {}
        if obj is None or status.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        return obj if status.get("configChecksum") else None

    await kube.create(policy("standard", ns=ns))
    await kube.create(model("llama", unique("rbac"), "standard", ns=ns))
    first = await eventually(reconciled, what="the model's first reconcile")
    service = await kube.get("v1", "services", ns, "llama-proxy")

    await kube.patch(API_VERSION, "deployedmodels", ns, "llama",
                     {"spec": {"pricing": {"inputPerMTok": "2.50", "outputPerMTok": "15.00"}}})

    async def rerendered() -> bool:
        obj = await reconciled()
        return obj is not None and obj["status"]["configChecksum"] != first["status"]["configChecksum"]

    await eventually(rerendered, what="the re-render after a spec change (ConfigMap and Deployment replaced)")

    await kube.patch("v1", "services", ns, "llama-proxy",
                     [{"op": "replace", "path": "/spec/ports/0/port", "value": 81}], patch_type="json")
    await kube.patch(API_VERSION, "cachepolicies", ns, "standard", {"spec": {"minPrefixTokens": 2048}})

    async def service_restored() -> bool:
        live = await kube.get("v1", "services", ns, "llama-proxy")
        return [p["port"] for p in live["spec"]["ports"]] == [p["port"] for p in service["spec"]["ports"]]

    await eventually(service_restored, what="the Service patched back after the policy's change")

    await kube.roll_out(ns, "llama-proxy")

    async def ready() -> bool:
        obj = await kube.get(API_VERSION, "deployedmodels", ns, "llama")
        conditions = (obj.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    await eventually(ready, what="Ready once the Deployment is available", within=60)

    for plural, name in (("cachepolicies", "standard"), ("deployedmodels", "llama")):
        await kube.delete(API_VERSION, plural, ns, name)

        async def gone(plural: str = plural, name: str = name) -> bool:
            return await kube.get_or_none(API_VERSION, plural, ns, name) is None

        await eventually(gone, what=f"{plural} {name} to be deleted (its finalizer released)")


@pytest.mark.parametrize("clusterwide", [True, False], ids=["clusterwide", "namespaced"])
async def test_rules_allow_every_request_the_operator_makes_and_grant_nothing_unused(
        kube: Cluster, start_operator: StartOperator, clusterwide: bool) -> None:
    ns = await kube.namespace("rbac")
    since = kube.plane.audit_log.stat().st_size
    async with start_operator(namespaces=None if clusterwide else [ns]):
        await _life_of_a_model(kube, ns)
    # Only this scenario's requests: in its namespace or cluster-scoped (a cluster-wide operator also sees what
    # other tests leave behind while their namespaces terminate).
    events = [e for e in audited(kube.plane.audit_log, since=since)
              if (e.get("objectRef") or {}).get("namespace") in (None, ns)]
    denied = sorted({a for e in events if (e.get("annotations") or {}).get("authorization.k8s.io/decision") == "forbid"
                     if (a := access_of(e)) is not None})
    assert not denied, f"requests the chart's ClusterRole ({RULES.name}) does not allow: {denied}"
    used = {access for access in map(access_of, events) if access is not None}
    assert not EXERCISED - used, f"the scenario did not make the operator do {sorted(EXERCISED - used)}"
    if not clusterwide:
        assert ("", "namespaces", "watch") in used
    assert not used & set(KEPT) - {("", "namespaces", "list"), ("", "namespaces", "watch")}, \
        "kept for a reason the scenario now covers: drop it from KEPT"
    unused = granted(load_rules()) - used - set(KEPT)
    assert not unused, f"granted, never used and not kept for a reason: {sorted(unused)}"
