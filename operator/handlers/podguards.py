"""Who may reach a model's proxy pods, and how many of them a drain may take at once (docs/design.md#pod-guards):
the NetworkPolicy and the PodDisruptionBudget the operator keeps beside the Deployment.

In header auth mode the proxy bills whoever a request header names, so any pod that can reach it could bill as
anyone: there the NetworkPolicy is on by default and admits only the gateway (``spec.proxy.networkPolicy.gateway``)
and the Prometheus pods of the operator's settings, the gateway to the API's port only and Prometheus to the
metrics port only (the proxy serves /metrics there alone, ``--metrics-port``). The
PodDisruptionBudget exists while a model runs more than one replica: a drain then takes one pod at a time. Either
one the spec no longer asks for is deleted, so switching it off takes effect.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiException

from promptcache.operator.constants import NAMESPACE_NAME_LABEL
from promptcache.operator.errors import SpecError
from promptcache.operator.handlers.kube import Kube
from promptcache.operator.handlers.manifests import (
    METRICS_PORT,
    PROXY_PORT,
    OperatorSettings,
    labels,
    names,
    replicas,
    selector,
)
from promptcache.operator.handlers.outcome import Stalled

NETWORK_POLICY, BUDGET = "NetworkPolicy", "PodDisruptionBudget"
HEADER_MODE = "header"
_GATEWAY_FIELD = "spec.proxy.networkPolicy.gateway"
_NEEDS_GATEWAY = ("a NetworkPolicy in force (networkPolicy.enabled, true by default with auth.mode header) needs "
                  "networkPolicy.gateway: the peers that may call the proxy")


@dataclass(frozen=True)
class Guards:
    """What should exist for one model: each object, or None where it should not."""

    network_policy: dict[str, Any] | None
    budget: dict[str, Any] | None

    def objects(self) -> list[dict[str, Any]]:
        return [obj for obj in (self.network_policy, self.budget) if obj is not None]


def _network_spec(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    raw = (spec.get("proxy") or {}).get("networkPolicy")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("enabled", False), bool):
        raise SpecError("InvalidSpec", "spec.proxy.networkPolicy must be an object whose enabled is true or false")
    return raw


def in_force(spec: Mapping[str, Any], auth_mode: str) -> bool:
    """``networkPolicy.enabled`` when given, else whether the proxy trusts a header (auth mode header)."""
    enabled = _network_spec(spec).get("enabled")
    return auth_mode == HEADER_MODE if enabled is None else bool(enabled)


def _gateway(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The peers as written (the API server validates them when it takes the NetworkPolicy); their shape checked
    as the CRD does, for a server that skipped its rules."""
    peers = _network_spec(spec).get("gateway") or []
    if not isinstance(peers, list) or not all(isinstance(p, Mapping) for p in peers):
        raise SpecError("InvalidSpec", f"{_GATEWAY_FIELD} must be a list of NetworkPolicy peers")
    if not peers:
        raise SpecError("InvalidSpec", _NEEDS_GATEWAY)
    for i, peer in enumerate(peers):
        kinds = {"podSelector", "namespaceSelector", "ipBlock"} & set(peer)
        if not kinds:
            raise SpecError("InvalidSpec", f"{_GATEWAY_FIELD}[{i}]: a gateway peer needs podSelector, "
                                           "namespaceSelector or ipBlock")
        if "ipBlock" in kinds and len(kinds) > 1:
            raise SpecError("InvalidSpec", f"{_GATEWAY_FIELD}[{i}]: ipBlock cannot be combined with podSelector "
                                           "or namespaceSelector")
    return [copy.deepcopy(dict(peer)) for peer in peers]


def scrapers(settings: OperatorSettings) -> dict[str, Any] | None:
    """The peer of the Prometheus pods that may scrape /metrics, from the operator's settings; None: no one."""
    if not settings.metrics_namespace:
        return None
    peer: dict[str, Any] = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: settings.metrics_namespace}}}
    if settings.metrics_pod_labels:
        peer["podSelector"] = {"matchLabels": dict(settings.metrics_pod_labels)}
    return peer


def network_policy(model: str, namespace: str, spec: Mapping[str, Any], auth_mode: str,
                   settings: OperatorSettings) -> dict[str, Any] | None:
    """Ingress to the API's port from the gateway and to the metrics port from the scrapers, nothing else; egress
    as it was."""
    if not in_force(spec, auth_mode):
        return None
    ingress = [{"from": _gateway(spec), "ports": [{"protocol": "TCP", "port": PROXY_PORT}]}]
    metrics = scrapers(settings)
    if metrics is not None:
        ingress.append({"from": [metrics], "ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": NETWORK_POLICY,
        "metadata": {"name": names(model)["networkpolicy"], "namespace": namespace, "labels": labels(model)},
        "spec": {"podSelector": {"matchLabels": selector(model)}, "policyTypes": ["Ingress"], "ingress": ingress},
    }


def disruption_budget(model: str, namespace: str, spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """One pod at a time for more than one replica. A pod that is not ready may always be evicted: a broken
    rollout must not block a node's drain."""
    count = replicas(spec)
    if isinstance(count, bool) or not isinstance(count, int) or count <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": BUDGET,
        "metadata": {"name": names(model)["poddisruptionbudget"], "namespace": namespace, "labels": labels(model)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(model)},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def guards(model: str, namespace: str, spec: Mapping[str, Any], auth_mode: str,
           settings: OperatorSettings) -> Guards:
    """Raises SpecError (InvalidSpec) for a ``networkPolicy`` the operator cannot use."""
    return Guards(network_policy(model, namespace, spec, auth_mode, settings),
                  disruption_budget(model, namespace, spec))


async def converge(kube: Kube, model: str, namespace: str, owner_uid: str, wanted: Guards) -> list[str]:
    """Create or update what should exist, delete what this model owns and should not; what happened to each.

    The API server is the judge of the peers: a NetworkPolicy it refuses stalls the model (InvalidSpec) with its
    words, before the Deployment changes, so pods never run behind a policy that did not apply."""
    changes = []
    for kind, obj, name in ((NETWORK_POLICY, wanted.network_policy, names(model)["networkpolicy"]),
                            (BUDGET, wanted.budget, names(model)["poddisruptionbudget"])):
        if obj is None:
            changes.append("deleted" if await kube.delete_owned(kind, namespace, name, owner_uid) else "unchanged")
            continue
        try:
            changes.append(await kube.converge(obj))
        except ApiException as exc:
            if exc.status != 422 or kind != NETWORK_POLICY:
                raise
            raise Stalled("InvalidSpec", f"the API server refused the NetworkPolicy: {_refusal(exc)}") from exc
    return changes


def _refusal(exc: ApiException) -> str:
    """The server's message, its field paths named as the DeployedModel's (the gateway is ``ingress[0].from``)."""
    try:
        message = str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        message = str(exc.reason)
    return message.replace("spec.ingress[0].from[", f"{_GATEWAY_FIELD}[")
