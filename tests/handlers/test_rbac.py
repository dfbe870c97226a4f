"""The operator's RBAC rules (docs/design.md#reconciliation): no wildcards; enough for everything the operator does;
and every verb they grant either used or named here with the reason it is kept.

What the operator needs is not listed by hand: the real operator runs with the chart's ServiceAccount and RBAC
against the real API server (authorization mode RBAC) through a model's and a policy's whole life, and the server's
audit log says what it asked for and what it was refused: cluster-wide (the chart's default), watching one namespace
(``--namespace``) with that ClusterRole, and in the chart's namespaced mode (``operator.namespaces`` set: a Role in
the namespace and a ClusterRole with kopf's scanning rules only), where the same operator must still do everything
and nothing outside its namespace is granted.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import yaml

from promptcache.operator.constants import API_VERSION, GROUP

from support.cluster import Cluster, eventually
from support.controlplane import SCOPED_RELEASE, SCOPED_USER
from support.operator_process import (
    Identity,
    OperatorEnvironment,
    OperatorProcess,
    StartOperator,
    audited,
    operator_identity,
    running_operator,
)
from support.proxy import unique
from support.resources import model, policy

FILES = Path(__file__).resolve().parents[2] / "charts" / "promptcache" / "files"
RULES = (FILES / "rbac-cluster-rules.yaml", FILES / "rbac-rules.yaml")
"""The cluster-scoped rules and the namespaced ones: a ClusterRole of both, or the first and a Role of the second."""
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
    ("networking.k8s.io", "networkpolicies", "get"),
    ("networking.k8s.io", "networkpolicies", "create"),
    ("networking.k8s.io", "networkpolicies", "update"),
    ("networking.k8s.io", "networkpolicies", "delete"),
    ("policy", "poddisruptionbudgets", "get"),
    ("policy", "poddisruptionbudgets", "create"),
    ("policy", "poddisruptionbudgets", "update"),
    ("policy", "poddisruptionbudgets", "delete"),
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
    found = []
    for path in RULES:
        rules = yaml.safe_load(path.read_text())
        assert isinstance(rules, list) and rules, f"{path.name}: a non-empty YAML list of rules"
        found += rules
    return found


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


GATEWAY = [{"podSelector": {"matchLabels": {"app": "gateway"}}}]


async def _life_of_a_model(kube: Cluster, ns: str) -> None:
    """Create a policy and a model (header auth behind a gateway, two replicas), change both, let the Deployment
    become available, delete both; each step awaited, and every branch of the owned objects' convergence taken
    (created, replaced, patched, deleted once not wanted)."""

    async def reconciled() -> dict[str, Any] | None:
        obj = await kube.get_or_none(API_VERSION, "deployedmodels", ns, "llama")
        status = (obj or {}).get("status") or {}
        if obj is None or status.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        return obj if status.get("configChecksum") else None

    await kube.create(policy("standard", ns=ns))
    await kube.create(model("llama", unique("rbac"), "standard", ns=ns,
                            proxy={"replicas": 2, "auth": {"mode": "header"}, "networkPolicy": {"gateway": GATEWAY}}))
    first = await eventually(reconciled, what="the model's first reconcile")
    service = await kube.get("v1", "services", ns, "llama-proxy")
    budget = await kube.get("policy/v1", "poddisruptionbudgets", ns, "llama-proxy")
    assert (await kube.get("networking.k8s.io/v1", "networkpolicies", ns, "llama-proxy"))["spec"]["ingress"][0][
        "from"] == GATEWAY

    gateway = [{"podSelector": {"matchLabels": {"app": "gateway", "track": "v2"}}}]
    await kube.patch(API_VERSION, "deployedmodels", ns, "llama",
                     {"spec": {"pricing": {"inputPerMTok": "2.50", "outputPerMTok": "15.00"},
                               "proxy": {"networkPolicy": {"gateway": gateway}}}})

    async def rerendered() -> bool:
        obj = await reconciled()
        policy_now = await kube.get("networking.k8s.io/v1", "networkpolicies", ns, "llama-proxy")
        return obj is not None and obj["status"]["configChecksum"] != first["status"]["configChecksum"] and \
            policy_now["spec"]["ingress"][0]["from"] == gateway

    await eventually(rerendered, what="the re-render after a spec change (ConfigMap, Deployment, NetworkPolicy)")

    await kube.patch("v1", "services", ns, "llama-proxy",
                     [{"op": "replace", "path": "/spec/ports/0/port", "value": 81}], patch_type="json")
    await kube.patch("policy/v1", "poddisruptionbudgets", ns, "llama-proxy", {"spec": {"maxUnavailable": 2}})
    await kube.patch(API_VERSION, "cachepolicies", ns, "standard", {"spec": {"minPrefixTokens": 2048}})

    async def restored() -> bool:
        live = await kube.get("v1", "services", ns, "llama-proxy")
        live_budget = await kube.get("policy/v1", "poddisruptionbudgets", ns, "llama-proxy")
        return [p["port"] for p in live["spec"]["ports"]] == [p["port"] for p in service["spec"]["ports"]] and \
            live_budget["spec"] == budget["spec"]

    await eventually(restored, what="the Service patched back and the budget replaced after the policy's change")

    await kube.patch(API_VERSION, "deployedmodels", ns, "llama",
                     {"spec": {"proxy": {"replicas": 1, "networkPolicy": {"enabled": False}}}})

    async def unguarded() -> bool:
        return await reconciled() is not None and \
            await kube.get_or_none("networking.k8s.io/v1", "networkpolicies", ns, "llama-proxy") is None and \
            await kube.get_or_none("policy/v1", "poddisruptionbudgets", ns, "llama-proxy") is None

    await eventually(unguarded, what="the NetworkPolicy and the budget deleted once not wanted")

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


async def allowed(kube: Cluster, user: str, verb: str, group: str, resource: str, namespace: str | None) -> bool:
    """What the API server's authorizer says ``user`` may do (a SubjectAccessReview)."""
    attributes = {"verb": verb, "group": group, "resource": resource, **({"namespace": namespace} if namespace else {})}
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
              "spec": {"user": user, "groups": ["system:serviceaccounts", "system:authenticated"],
                       "resourceAttributes": attributes}}
    answer = await kube.call("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review)
    return bool(answer["status"]["allowed"])


@pytest.mark.parametrize("mode", ["clusterwide", "namespaced", "namespaced-rbac"])
async def test_rules_allow_every_request_the_operator_makes_and_grant_nothing_unused(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, tmp_path: Path,
        mode: str) -> None:
    """clusterwide and namespaced: the chart's default ClusterRole; namespaced-rbac: the chart with
    ``operator.namespaces: [ns]``, whose Role in ``ns`` and scanning-only ClusterRole must be enough."""
    ns = await kube.namespace("rbac")
    user = SCOPED_USER if mode == "namespaced-rbac" else None
    since = kube.plane.audit_log.stat().st_size
    running: AbstractAsyncContextManager[OperatorProcess]
    if mode == "namespaced-rbac":
        identity: Identity = await operator_identity(kube, tmp_path, release=SCOPED_RELEASE, namespaces=[ns])
        assert identity.user == SCOPED_USER
        running = running_operator(identity, operator_env, tmp_path / "operator.log", namespaces=[ns])
    else:
        running = start_operator(namespaces=None if mode == "clusterwide" else [ns])
    async with running:
        await _life_of_a_model(kube, ns)
    # Only this scenario's requests: in its namespace or cluster-scoped (a cluster-wide operator also sees what
    # other tests leave behind while their namespaces terminate).
    events = [e for e in audited(kube.plane.audit_log, *([user] if user else []), since=since)
              if (e.get("objectRef") or {}).get("namespace") in (None, ns)]
    denied = sorted({a for e in events if (e.get("annotations") or {}).get("authorization.k8s.io/decision") == "forbid"
                     if (a := access_of(e)) is not None})
    assert not denied, f"requests the chart's RBAC ({', '.join(p.name for p in RULES)}) does not allow: {denied}"
    used = {access for access in map(access_of, events) if access is not None}
    assert not EXERCISED - used, f"the scenario did not make the operator do {sorted(EXERCISED - used)}"
    if mode != "clusterwide":
        assert ("", "namespaces", "watch") in used
    assert not used & set(KEPT) - {("", "namespaces", "list"), ("", "namespaces", "watch")}, \
        "kept for a reason the scenario now covers: drop it from KEPT"
    unused = granted(load_rules()) - used - set(KEPT)
    assert not unused, f"granted, never used and not kept for a reason: {sorted(unused)}"
    if mode == "namespaced-rbac":  # what it did was granted in ns; elsewhere it may only scan
        other = await kube.namespace("other")
        assert await allowed(kube, SCOPED_USER, "update", "apps", "deployments", ns)
        assert not await allowed(kube, SCOPED_USER, "update", "apps", "deployments", other)
        assert not await allowed(kube, SCOPED_USER, "create", "networking.k8s.io", "networkpolicies", other)
        assert not await allowed(kube, SCOPED_USER, "watch", "promptcache.io", "deployedmodels", None)
        assert await allowed(kube, SCOPED_USER, "watch", "", "namespaces", None)
