"""What the operator renders to guard a model's proxy pods (operator/handlers/podguards.py, docs/design.md#pod-guards):
the NetworkPolicy, in force by default in header auth mode, and the PodDisruptionBudget of a model with more than one
replica; and what it refuses, as InvalidSpec, when an API server skipped the CRD's rules. What the API server makes
of these objects is tests/handlers/test_operator_guards.py's."""

from __future__ import annotations

from typing import Any

import pytest

from promptcache.operator.errors import SpecError
from promptcache.operator.handlers import podguards
from promptcache.operator.handlers.manifests import OperatorSettings
from promptcache.operator.handlers.render import render

from support.resources import model, policy

GATEWAY = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
            "podSelector": {"matchLabels": {"app": "envoy"}}},
           {"ipBlock": {"cidr": "10.8.0.0/16", "except": ["10.8.1.0/24"]}}]
SELECTOR = {"app.kubernetes.io/name": "promptcache-proxy", "promptcache.io/deployedmodel": "llama"}
LABELS = {**SELECTOR, "app.kubernetes.io/instance": "llama", "app.kubernetes.io/managed-by": "promptcache-operator"}
PORT = [{"protocol": "TCP", "port": 8080}]
METRICS = [{"protocol": "TCP", "port": 9090}]
"""The gateway reaches the API's port only, the scrapers the metrics port only."""


def spec_with(**proxy: Any) -> dict[str, Any]:
    spec: dict[str, Any] = model("llama", "llama-70b", "standard", ns="llm")["spec"]
    spec["proxy"] = {**spec["proxy"], **proxy}
    return spec


def guards(spec: dict[str, Any], settings: OperatorSettings | None = None) -> podguards.Guards:
    """As the reconcile computes them: the auth mode is the one the proxy's loader read from the rendered config."""
    rendered = render("llm", "m", spec, "standard", policy("standard", ns="llm")["spec"])
    return podguards.guards("llama", "llm", spec, rendered.config.auth.mode, settings or OperatorSettings())


def test_header_mode_gets_a_policy_admitting_only_the_gateway_and_the_scrapers() -> None:
    settings = OperatorSettings(metrics_namespace="monitoring",
                                metrics_pod_labels=(("app.kubernetes.io/name", "prometheus"),))
    spec = spec_with(auth={"mode": "header", "header": "X-Tenant"}, networkPolicy={"gateway": GATEWAY})
    assert guards(spec, settings).network_policy == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "llama-proxy", "namespace": "llm", "labels": LABELS},
        "spec": {
            "podSelector": {"matchLabels": SELECTOR},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": GATEWAY, "ports": PORT},
                {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                           "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
                 "ports": METRICS},
            ],
        },
    }
    config = render("llm", "m", spec, "standard", policy("standard", ns="llm")["spec"]).config
    assert (config.auth.mode, config.auth.header) == ("header", "x-tenant")


def test_without_scrapers_only_the_gateway_and_a_namespace_alone_selects_all_its_pods() -> None:
    spec = spec_with(auth={"mode": "header"}, networkPolicy={"gateway": GATEWAY[:1]})
    found = guards(spec).network_policy
    assert found is not None and found["spec"]["ingress"] == [{"from": GATEWAY[:1], "ports": PORT}]
    assert podguards.scrapers(OperatorSettings(metrics_namespace="monitoring")) == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


@pytest.mark.parametrize(("proxy", "in_force"), [
    ({}, False),
    ({"auth": {"mode": "apiKeys"}}, False),
    ({"auth": {"mode": "header"}, "networkPolicy": {"gateway": GATEWAY}}, True),
    ({"auth": {"mode": "header"}, "networkPolicy": {"enabled": False}}, False),
    ({"networkPolicy": {"enabled": True, "gateway": GATEWAY}}, True),
    ({"auth": {"mode": "apiKeys"}, "networkPolicy": {"gateway": GATEWAY}}, False),  # peers alone switch nothing on
])
def test_the_policy_is_in_force_by_mode_unless_enabled_says_otherwise(proxy: dict[str, Any], in_force: bool) -> None:
    assert (guards(spec_with(**proxy)).network_policy is not None) is in_force


def test_the_proxy_config_is_unchanged_without_auth() -> None:
    """No auth in the spec, no auth key in the config: upgrading the operator rolls no pods."""
    rendered = render("llm", "m", spec_with(), "standard", policy("standard", ns="llm")["spec"])
    assert "auth" not in rendered.yaml and rendered.config.auth.mode == "apiKeys"


@pytest.mark.parametrize(("replicas", "budget"), [(0, False), (1, False), (2, True), (100, True)])
def test_a_budget_for_more_than_one_replica(replicas: int, budget: bool) -> None:
    found = guards(spec_with(replicas=replicas)).budget
    if not budget:
        assert found is None
        return
    assert found == {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "llama-proxy", "namespace": "llm", "labels": LABELS},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def test_replicas_unset_is_the_deployments_default_of_two() -> None:
    spec = spec_with()
    del spec["proxy"]["replicas"]
    assert guards(spec).budget is not None


@pytest.mark.parametrize(("proxy", "reason"), [
    ({"auth": {"mode": "header"}}, "needs networkPolicy.gateway: the peers that may call the proxy"),
    ({"auth": {"mode": "header"}, "networkPolicy": {"gateway": []}}, "needs networkPolicy.gateway"),
    ({"networkPolicy": {"enabled": True}}, "needs networkPolicy.gateway"),
    ({"networkPolicy": "on"}, "spec.proxy.networkPolicy must be an object whose enabled is true or false"),
    ({"networkPolicy": {"enabled": "yes"}}, "spec.proxy.networkPolicy must be an object whose enabled is true"),
    ({"networkPolicy": {"enabled": True, "gateway": {"podSelector": {}}}},
     "spec.proxy.networkPolicy.gateway must be a list of NetworkPolicy peers"),
    ({"networkPolicy": {"enabled": True, "gateway": ["envoy"]}}, "must be a list of NetworkPolicy peers"),
    ({"networkPolicy": {"enabled": True, "gateway": [GATEWAY[0], {}]}},
     r"spec.proxy.networkPolicy.gateway\[1\]: a gateway peer needs podSelector, namespaceSelector or ipBlock"),
    ({"networkPolicy": {"enabled": True, "gateway": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}},
     r"gateway\[0\]: ipBlock cannot be combined with podSelector or namespaceSelector"),
    ({"auth": {"mode": "mTLS"}}, "auth.mode must be one of"),  # the proxy's loader judges auth
    ({"auth": "header"}, "auth must be a mapping"),
])
def test_what_the_crd_refuses_the_operator_refuses(proxy: dict[str, Any], reason: str) -> None:
    with pytest.raises(SpecError, match=reason) as caught:
        guards(spec_with(**proxy))
    assert caught.value.reason == "InvalidSpec"
