"""The CRDs in crds/ with the real API server as their validator (docs/design.md#custom-resources, #testing).

The session's kube-apiserver (``support.controlplane``) installed crds/ before anything else ran; here:

- the CRDs it serves are crds/ as written, Established, and a strict dry-run update finds no field it does not
  know and nothing to warn about;
- every constraint of every schema — each ``x-kubernetes-validations`` rule, enum, pattern, minimum/maximum,
  min/maxLength, min/maxItems, min/maxProperties, required key, date-time format and list-type uniqueness,
  enumerated from the schemas themselves — has a case: a valid object with one change, which the server
  refuses with 422, naming the field and saying the rule's message or its own words for the keyword
  (``test_every_constraint_has_a_rejecting_case`` fails when a constraint has none). Spec cases are dry-run
  creates, status cases dry-run patches of the status subresource;
- valid objects (every example in examples/, boundary values, each rule's passing side) are accepted under
  strict field validation, as ``kubectl apply`` sends them (an unknown key is an error, not silently pruned);
  the quickstart and full sets apply with Debian's ``kubectl apply -k``; the schema defaults are the server's;
- printer columns are read from the server's Table (and ``kubectl get``): readable scalars, Ready with its
  reason and message;
- every field's description is in the OpenAPI v3 document ``kubectl explain`` reads, and ``kubectl explain``
  shows the fields.

The CachePolicy spec is the proxy's ``cache`` section: what the server admits, the proxy's parser loads.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import random
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from promptcache.operator.constants import API_VERSION, GROUP, MODELS, POLICIES, REPLAYS
from promptcache.operator.handlers.conditions import Condition, merge, now_rfc3339, stalled
from promptcache.operator.handlers.planreplay import result_status
from promptcache.operator.replay.engine import report, simulate
from promptcache.operator.replay.proposal import Proposal
from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.policy import CachePolicy, PolicyError
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.requestlog import LoggedRequest

from support.cluster import Cluster, KubeError, connected, eventually, install_crds, object_path
from support.controlplane import ControlPlane
from support.crds import KINDS, PLURALS, crd, schema, walk

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CRDS = "apiextensions.k8s.io/v1"
NOT_CHECKED = "some validation rules were not checked because the object was invalid"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="Debian's kubectl is not installed")

Obj = dict[str, Any]


# ------------------------------------------------------------------------------------------------ the schemas


CRD = {kind: crd(kind) for kind in KINDS}



def described_paths(kind: str) -> Iterator[tuple[str, Obj]]:
    """Every node but metadata's (the server refuses a description there; its schema is ObjectMeta's)."""
    return ((p, n) for p, n in walk(schema(kind)) if p != ".metadata")


def schema_path(kind: str, field_path: str, start: str = "") -> str:
    """The schema path of a server field path: ``spec.models[1]`` → ``.spec.models[]``,
    ``spec.pricingOverrides.a.inputPerMTok`` → ``.spec.pricingOverrides.*.inputPerMTok``."""
    nodes = dict(walk(schema(kind)))
    path = start
    for token in re.findall(r"\[[^\]]*\]|[^.\[\]]+", field_path):
        node = nodes[path]
        if token.startswith("["):
            assert node.get("type") == "array", f"{field_path}: {path} is not a list"
            path += "[]"
        elif token in node.get("properties", {}):
            path += f".{token}"
        else:
            assert isinstance(node.get("additionalProperties"), dict), f"{field_path}: {path} has no {token}"
            path += ".*"
    return path


KEYWORDS = ("enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
            "minProperties", "maxProperties", "format", "x-kubernetes-list-type")


@dataclass(frozen=True, order=True)
class Constraint:
    kind: str
    path: str  # the schema node that declares it
    key: str  # a keyword, required:<property> or rule:<CEL>

    def __str__(self) -> str:
        return f"{self.kind} {self.path or '<root>'} {self.key}"


def constraints() -> list[Constraint]:
    """Every constraint the schemas declare (integer formats, which bound nothing here, left out)."""
    found = []
    for kind in KINDS:
        for path, node in described_paths(kind):
            found += [Constraint(kind, path, k) for k in KEYWORDS
                      if k in node and not (k == "format" and node.get("type") != "string")]
            found += [Constraint(kind, path, f"required:{name}") for name in node.get("required", [])]
            found += [Constraint(kind, path, f"rule:{v['rule']}") for v in node.get("x-kubernetes-validations", [])]
    return found


@functools.cache
def rules() -> dict[tuple[str, str], list[tuple[str, Constraint]]]:
    """(kind, schema path the server reports a failure at: the node's plus its fieldPath) → (message, rule)."""
    found: dict[tuple[str, str], list[tuple[str, Constraint]]] = {}
    for kind in KINDS:
        for path, node in described_paths(kind):
            for v in node.get("x-kubernetes-validations", []):
                reported = schema_path(kind, v.get("fieldPath", "").lstrip("."), path)
                rule = Constraint(kind, path, f"rule:{v['rule']}")
                found.setdefault((kind, reported), []).append((v["message"], rule))
    return found


def rule_at(kind: str, path: str, message: str) -> tuple[str, Constraint]:
    """The one rule reported at ``path`` whose message starts with ``message``."""
    matches = [(m, c) for m, c in rules().get((kind, path), []) if m.startswith(message)]
    assert len(matches) == 1, f"{len(matches)} rules of {kind} report {message!r} at {path}"
    return matches[0]


# ------------------------------------------------------------------------------------------------ objects


DELETE: Any = object()


def base_spec(kind: str) -> Obj:
    """A small valid spec of each kind, independent of the examples."""
    if kind == "DeployedModel":
        return {
            "alias": "llama-70b",
            "upstream": {"url": "http://vllm.llm.svc:8000/v1", "model": "meta-llama/Llama-3.3-70B-Instruct",
                         "api": "openai"},
            "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
            "pricing": {"inputPerMTok": "0.60", "outputPerMTok": "2.40"},
            "cachePolicyRef": {"name": "standard"},
        }
    if kind == "CachePolicy":
        return {"enabledTtls": ["5m", "1h"], "defaultTtl": "5m", "writeMultipliers": {"5m": "1.25", "1h": "2"},
                "readMultiplier": "0.1", "automatic": {"mode": "lastBlock", "ttl": "1h"}}
    return {"models": ["llama-70b"], "lastHours": 24, "cachePolicyRef": {"name": "standard"}}


def condition(type_: str = "Ready", **fields: Any) -> Obj:
    return {"type": type_, "status": "True", "reason": "Available", "message": "ok",
            "lastTransitionTime": "2025-06-01T00:00:00Z", "observedGeneration": 1, **fields}


def base_status(kind: str) -> Obj:
    """A valid status of each kind, every field set."""
    common: Obj = {"observedGeneration": 1,
                   "conditions": [condition(), condition("Stalled", status="False", reason="", message="")]}
    if kind == "DeployedModel":
        return {**common, "endpoint": "http://llama-proxy.crds.svc:80/v1", "tariffVersion": 3,
                "endpoints": {"openai": "http://llama-proxy.crds.svc:80/v1", "anthropic": "http://llama-proxy.crds.svc:80"},
                "configChecksum": "sha256:0f", "mode": "gateway",
                "replicas": ["http://10.0.0.7:8000/v1", "http://[fd00::7]:8000/v1"]}
    if kind == "CachePolicy":
        return {**common, "boundModels": ["llama-70b"], "tariffVersions": {"llama-70b": 3}, "redisApplied": True,
                "redisMessage": "maxmemory 256mb"}
    interval = ["-0.2", "0.4"]
    return {**common, "phase": "Succeeded",
            "summary": {"requests": 10, "baselineCost": "1.0", "projectedCost": "0.9", "listCost": "2",
                        "savings": "0.1", "savingsPct": "10", "readTokenRatio": "0.5", "hitRate": "0.3",
                        "creationCost": {"5m": "0.01", "1h": "0", "24h": "0"}},
            "intervals": dict.fromkeys(("projectedCost", "savings", "savingsPct", "hitRate", "readTokenRatio"),
                                       interval),
            "digest": "ab" * 32, "caveats": ["few clusters"], "reportConfigMap": "x-report",
            "startedAt": "2025-06-01T00:00:00.123456+00:00", "finishedAt": "2025-06-01T00:01:00Z"}


def resource(kind: str, namespace: str, name: str = "x", spec: Obj | None = None) -> Obj:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": copy.deepcopy(spec if spec is not None else base_spec(kind))}


def changed(doc: Obj, changes: Mapping[str, Any]) -> Obj:
    """``doc`` with ``changes`` applied: a dotted path (numbers index lists) → a new value, or DELETE."""
    doc = copy.deepcopy(doc)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
        key: Any = int(last) if isinstance(target, list) else last
        if value is DELETE:
            del target[key]
        else:
            target[key] = copy.deepcopy(value)
    return doc


async def submit(cluster: Cluster, doc: Mapping[str, Any], *, dry_run: bool = True) -> Obj:
    """POST with strict field validation (what kubectl apply sends): an unknown field is an error."""
    params = {"fieldValidation": "Strict", **({"dryRun": "All"} if dry_run else {})}
    path = object_path(API_VERSION, PLURALS[doc["kind"]], doc["metadata"]["namespace"])
    result: Obj = await cluster.call("POST", path, json=dict(doc), params=params)
    return result


async def patch_status(cluster: Cluster, doc: Mapping[str, Any], *, dry_run: bool = True) -> Obj:
    """Merge ``doc``'s status into the live object's through the status subresource."""
    meta = doc["metadata"]
    params = {"fieldValidation": "Strict", **({"dryRun": "All"} if dry_run else {})}
    path = object_path(API_VERSION, PLURALS[doc["kind"]], meta["namespace"], meta["name"], "status")
    result: Obj = await cluster.call("PATCH", path, data=json.dumps({"status": doc["status"]}), params=params,
                                     headers={"Content-Type": "application/merge-patch+json"})
    return result


def kubectl(plane: ControlPlane, *args: str, cache: Path) -> str:
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, f"--kubeconfig={plane.admin_kubeconfig}", f"--cache-dir={cache}", *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


# ------------------------------------------------------------------------------------------------ fixtures


def served_as_written(live: Obj, doc: Obj) -> bool:
    return all(live["spec"].get(k) == v for k, v in doc["spec"].items())


@pytest.fixture(scope="module")
async def cluster(control_plane: ControlPlane) -> AsyncIterator[Cluster]:
    """The API server for this module, serving crds/ as written (re-installed if a test left another version)."""
    async with connected(control_plane) as c:
        lives = [await c.get(CRDS, "customresourcedefinitions", None, doc["metadata"]["name"]) for doc in CRD.values()]
        if not all(served_as_written(live, doc) for live, doc in zip(lives, CRD.values(), strict=True)):
            await install_crds(c)

            async def columns() -> bool:
                for kind in KINDS:
                    table = await c.table(API_VERSION, PLURALS[kind], "default")
                    wanted = [col["name"] for col in CRD[kind]["spec"]["versions"][0]["additionalPrinterColumns"]]
                    if [d["name"] for d in table["columnDefinitions"]][1:] != wanted:
                        return False
                return True

            await eventually(columns, what="the CRDs of crds/ to be served")
        yield c


@pytest.fixture(scope="module")
async def namespace(cluster: Cluster) -> str:
    """The module's namespace, holding one live object of each kind named ``base`` (status cases patch them)."""
    ns = await cluster.namespace("crds")
    for kind in KINDS:
        await submit(cluster, resource(kind, ns, "base"), dry_run=False)
    return ns


# ================================================================================================ the CRDs


async def test_the_crds_are_served_established_and_known_to_the_server(cluster: Cluster) -> None:
    for kind, doc in CRD.items():
        name = doc["metadata"]["name"]
        live = await cluster.get(CRDS, "customresourcedefinitions", None, name)
        assert served_as_written(live, doc), kind
        conditions = {c["type"]: c["status"] for c in live["status"]["conditions"]}
        assert conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True", conditions
        assert live["status"]["acceptedNames"]["shortNames"] == doc["spec"]["names"]["shortNames"]
        # A strict dry-run update: the server rejects a field the apiextensions types do not have, and warns
        # about anything it would drop or question.
        body = {**doc, "metadata": {**doc["metadata"], "resourceVersion": live["metadata"]["resourceVersion"]}}
        url = cluster.url + object_path(CRDS, "customresourcedefinitions", None, name)
        async with cluster.session.put(url, json=body, params={"dryRun": "All", "fieldValidation": "Strict"}) as r:
            assert r.status == 200, await r.text()
            assert r.headers.getall("Warning", []) == [], kind


async def test_a_crd_with_an_unknown_field_is_refused(cluster: Cluster) -> None:
    """What the strict update above would say about a typo in a CRD."""
    doc = copy.deepcopy(CRD["PlanReplay"])
    doc["spec"]["versions"][0]["printerColumns"] = []
    live = await cluster.get(CRDS, "customresourcedefinitions", None, doc["metadata"]["name"])
    doc["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
    with pytest.raises(KubeError) as caught:
        await cluster.call("PUT", object_path(CRDS, "customresourcedefinitions", None, doc["metadata"]["name"]),
                           json=doc, params={"dryRun": "All", "fieldValidation": "Strict"})
    assert 'unknown field "spec.versions[0].printerColumns"' in caught.value.message


# ================================================================================================ rejections


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    changes: Mapping[str, Any]  # dotted paths from the object's root
    field: str  # the field the server must name, e.g. spec.models[1]
    keyword: str  # the schema keyword that rejects it, or "rule"
    message: str = ""  # a rule's message
    extra: bool = False  # a keyword (type) the completeness check does not ask for

    @property
    def status(self) -> bool:
        return self.field.startswith("status")

    def constraint(self) -> Constraint:
        path = schema_path(self.kind, self.field)
        if self.keyword == "rule":
            return rule_at(self.kind, path, self.message)[1]
        if self.keyword == "required":
            parent, _, name = path.rpartition(".")
            return Constraint(self.kind, parent, f"required:{name}")
        if self.keyword == "x-kubernetes-list-type":  # a duplicate is reported at its index
            assert path.endswith("[]"), self.field
            return Constraint(self.kind, path[:-2], self.keyword)
        return Constraint(self.kind, path, self.keyword)

    def says(self) -> list[str]:
        """What the server's message for the field must contain."""
        if self.keyword == "rule":
            return [rule_at(self.kind, schema_path(self.kind, self.field), self.message)[0]]
        constraint = self.constraint()
        node = dict(walk(schema(self.kind)))[constraint.path]
        value = node.get(self.keyword)
        if self.keyword == "enum":
            return ["Unsupported value", f"supported values: {', '.join(json.dumps(v) for v in node['enum'])}"]
        return [{
            "pattern": f"should match '{value}'",
            "minimum": f"should be greater than or equal to {value}",
            "maximum": f"should be less than or equal to {value}",
            "minLength": f"should be at least {value} chars long",
            "maxLength": f"Too long: may not be more than {value} bytes",
            "minItems": f"should have at least {value} items",
            "maxItems": f"must have at most {value} item",  # "items" unless 1
            "minProperties": f"should have at least {value} properties",
            "maxProperties": f"must have at most {value} item",
            "required": "Required value",
            "format": f"must be of type {value}",
            "x-kubernetes-list-type": "Duplicate value",
            "type": f"must be of type {node.get('type')}",
        }[self.keyword]]


Row = tuple[Any, ...]


def spec_cases(kind: str, rows: list[Row]) -> list[Case]:
    """(name, changes under spec, field under spec, keyword[, rule message]) → cases of ``kind``."""
    return [Case(f"{kind}: {row[0]}", kind, {f"spec.{k}": v for k, v in row[1].items()},
                 f"spec.{row[2]}" if row[2] else "spec", row[3], row[4] if len(row) > 4 else "",
                 extra=row[3] == "type") for row in rows]


MULTIPLIER = "a multiplier must be less than 100"

NEEDS_GATEWAY = "a NetworkPolicy in force (networkPolicy.enabled, true by default with auth.mode header) needs"
PEER = "proxy.networkPolicy.gateway[0]"


def gateway(*peers: Obj) -> Obj:
    """``spec.proxy`` in header mode with these gateway peers."""
    return {"auth": {"mode": "header"}, "networkPolicy": {"gateway": list(peers)}}


def header(name: str) -> Obj:
    """``spec.proxy`` in header mode behind a gateway, the principal in header ``name``."""
    proxy = gateway({"podSelector": {}})
    proxy["auth"]["header"] = name
    return proxy


def selector_cases(key: str) -> list[Row]:
    """The label selector's constraints, under a gateway peer's ``key`` (podSelector or namespaceSelector)."""
    at = f"{PEER}.{key}"

    def peer(**selector: Any) -> Obj:
        return gateway({key: selector})

    def requirement(**fields: Any) -> Obj:
        return peer(matchExpressions=[{"key": "app", "operator": "In", "values": ["envoy"], **fields}])

    return [
        (f"{key}: 33 matchLabels", peer(matchLabels={f"k{i}": "v" for i in range(33)}), f"{at}.matchLabels",
         "maxProperties"),
        (f"{key}: a label value of 64 characters", peer(matchLabels={"app": "v" * 64}), f"{at}.matchLabels.app",
         "maxLength"),
        (f"{key}: 17 requirements", peer(matchExpressions=[{"key": f"k{i}", "operator": "Exists"} for i in range(17)]),
         f"{at}.matchExpressions", "maxItems"),
        (f"{key}: a requirement without key", peer(matchExpressions=[{"operator": "Exists"}]),
         f"{at}.matchExpressions[0].key", "required"),
        (f"{key}: a requirement without operator", peer(matchExpressions=[{"key": "app"}]),
         f"{at}.matchExpressions[0].operator", "required"),
        (f"{key}: an empty requirement key", requirement(key=""), f"{at}.matchExpressions[0].key", "minLength"),
        (f"{key}: a requirement key too long", requirement(key="k" * 318), f"{at}.matchExpressions[0].key",
         "maxLength"),
        (f"{key}: operator Equals", requirement(operator="Equals"), f"{at}.matchExpressions[0].operator", "enum"),
        (f"{key}: 65 values", requirement(values=[f"v{i}" for i in range(65)]), f"{at}.matchExpressions[0].values",
         "maxItems"),
        (f"{key}: a value of 64 characters", requirement(values=["v" * 64]), f"{at}.matchExpressions[0].values[0]",
         "maxLength"),
        (f"{key}: In without values", requirement(values=DELETE), f"{at}.matchExpressions[0]", "rule",
         "In and NotIn need values"),
        (f"{key}: NotIn with no values", requirement(operator="NotIn", values=[]), f"{at}.matchExpressions[0]",
         "rule", "In and NotIn need values"),
        (f"{key}: Exists with values", requirement(operator="Exists"), f"{at}.matchExpressions[0]", "rule",
         "In and NotIn need values"),
    ]


def drop_deleted(doc: Any) -> Any:
    """``doc`` without the keys set to DELETE (a case builds whole objects, not dotted changes)."""
    if isinstance(doc, dict):
        return {k: drop_deleted(v) for k, v in doc.items() if v is not DELETE}
    if isinstance(doc, list):
        return [drop_deleted(v) for v in doc]
    return doc


# (name, spec.proxy, field under spec, keyword[, rule message])
NETWORK_CASES: list[Row] = [(name, drop_deleted(proxy), *rest) for name, proxy, *rest in [*[
    ("auth mode unknown", {"auth": {"mode": "mTLS"}}, "proxy.auth.mode", "enum"),
    ("auth header with a space", header("x principal"), "proxy.auth.header", "pattern"),
    ("auth header empty", header(""), "proxy.auth.header", "pattern"),
    ("auth header too long", header("x" * 129), "proxy.auth.header", "maxLength"),
    ("header mode without a gateway", {"auth": {"mode": "header"}}, "proxy", "rule", NEEDS_GATEWAY),
    ("header mode with no gateway peer", gateway(), "proxy", "rule", NEEDS_GATEWAY),
    ("a policy enabled without a gateway", {"networkPolicy": {"enabled": True}}, "proxy", "rule", NEEDS_GATEWAY),
    ("17 gateway peers", gateway(*[{"podSelector": {}}] * 17), "proxy.networkPolicy.gateway", "maxItems"),
    ("an empty gateway peer", gateway({}), PEER, "rule",
     "a gateway peer needs podSelector, namespaceSelector or ipBlock"),
    ("ipBlock with a podSelector", gateway({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}),
     PEER, "rule", "ipBlock cannot be combined"),
    ("ipBlock with a namespaceSelector", gateway({"ipBlock": {"cidr": "10.0.0.0/8"}, "namespaceSelector": {}}),
     PEER, "rule", "ipBlock cannot be combined"),
    ("ipBlock without cidr", gateway({"ipBlock": {"except": ["10.1.0.0/16"]}}), f"{PEER}.ipBlock.cidr", "required"),
    ("cidr not a CIDR", gateway({"ipBlock": {"cidr": "10.0.0.1"}}), f"{PEER}.ipBlock.cidr",
     "rule", "must be a CIDR"),
    ("cidr too long", gateway({"ipBlock": {"cidr": "f" * 44}}), f"{PEER}.ipBlock.cidr",
     "maxLength"),
    ("17 except ranges", gateway({"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{i}.0.0/16" for i in range(17)]}}),
     f"{PEER}.ipBlock.except", "maxItems"),
    ("an except range not a CIDR", gateway({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/33"]}}),
     f"{PEER}.ipBlock.except[0]", "rule", "must be a CIDR"),
    ("an except range too long", gateway({"ipBlock": {"cidr": "10.0.0.0/8", "except": ["f" * 44]}}),
     f"{PEER}.ipBlock.except[0]", "maxLength"),
    ("enabled a string", {"networkPolicy": {"enabled": "yes", "gateway": [{"podSelector": {}}]}},
     "proxy.networkPolicy.enabled", "type"),
], *selector_cases("podSelector"), *selector_cases("namespaceSelector")]]

ONE_API = "set exactly one of upstream.api (one API) and upstream.apis (several)"

DEPLOYED_MODEL = spec_cases("DeployedModel", [
    ("alias with a space", {"alias": "llama 70b"}, "alias", "pattern"),
    ("alias starting with a dot", {"alias": ".llama"}, "alias", "pattern"),
    ("alias of 129 characters", {"alias": "a" * 129}, "alias", "maxLength"),
    ("no alias", {"alias": DELETE}, "alias", "required"),
    ("no upstream", {"upstream": DELETE}, "upstream", "required"),
    ("no tokenizer", {"tokenizer": DELETE}, "tokenizer", "required"),
    ("no pricing", {"pricing": DELETE}, "pricing", "required"),
    ("no cachePolicyRef", {"cachePolicyRef": DELETE}, "cachePolicyRef", "required"),
    ("gateway without url", {"upstream.url": DELETE}, "upstream.url", "rule",
     "upstream.url is required unless server is set"),
    ("url not http", {"upstream.url": "ftp://models/v1"}, "upstream.url", "pattern"),
    ("url without host", {"upstream.url": "http:///v1"}, "upstream.url", "pattern"),
    ("url too long", {"upstream.url": "http://vllm/" + "v" * 2048}, "upstream.url", "maxLength"),
    ("no upstream model", {"upstream.model": DELETE}, "upstream.model", "required"),
    ("upstream model empty", {"upstream.model": ""}, "upstream.model", "minLength"),
    ("upstream model too long", {"upstream.model": "m" * 257}, "upstream.model", "maxLength"),
    ("no upstream api", {"upstream.api": DELETE}, "upstream.api", "rule", ONE_API),
    ("both api and apis", {"upstream.apis": ["openai"]}, "upstream.api", "rule", ONE_API),
    ("api unknown", {"upstream.api": "cohere"}, "upstream.api", "enum"),
    ("apis empty", {"upstream.api": DELETE, "upstream.apis": []}, "upstream.apis", "minItems"),
    ("apis of four", {"upstream.api": DELETE, "upstream.apis": ["openai", "anthropic", "openai-responses", "openai"]},
     "upstream.apis", "maxItems"),
    ("apis naming one twice", {"upstream.api": DELETE, "upstream.apis": ["anthropic", "anthropic"]},
     "upstream.apis[1]", "x-kubernetes-list-type"),
    ("apis unknown", {"upstream.api": DELETE, "upstream.apis": ["openai", "grpc"]}, "upstream.apis[1]", "enum"),
    ("secret ref without name", {"upstream.apiKeySecretRef": {"key": "k"}}, "upstream.apiKeySecretRef.name",
     "required"),
    ("secret ref without key", {"upstream.apiKeySecretRef": {"name": "s"}}, "upstream.apiKeySecretRef.key",
     "required"),
    ("secret name not a DNS name", {"upstream.apiKeySecretRef": {"name": "Key_s", "key": "k"}},
     "upstream.apiKeySecretRef.name", "pattern"),
    ("secret name empty", {"upstream.apiKeySecretRef": {"name": "", "key": "k"}}, "upstream.apiKeySecretRef.name",
     "minLength"),
    ("secret name too long", {"upstream.apiKeySecretRef": {"name": "s" * 254, "key": "k"}},
     "upstream.apiKeySecretRef.name", "maxLength"),
    ("secret key with a space", {"upstream.apiKeySecretRef": {"name": "s", "key": "api key"}},
     "upstream.apiKeySecretRef.key", "pattern"),
    ("secret key empty", {"upstream.apiKeySecretRef": {"name": "s", "key": ""}}, "upstream.apiKeySecretRef.key",
     "minLength"),
    ("secret key too long", {"upstream.apiKeySecretRef": {"name": "s", "key": "k" * 254}},
     "upstream.apiKeySecretRef.key", "maxLength"),
    ("forwardCacheControl a string", {"upstream.forwardCacheControl": "yes"}, "upstream.forwardCacheControl",
     "type"),
    ("cacheSalt unknown", {"upstream.cacheSalt": "request"}, "upstream.cacheSalt", "enum"),
    ("routing mode unknown", {"routing": {"mode": "random"}}, "routing.mode", "enum"),
    ("routing imbalance not a decimal", {"routing": {"maxImbalance": "1,5"}}, "routing.maxImbalance", "pattern"),
    ("routing imbalance too long", {"routing": {"maxImbalance": "1." + "0" * 31}}, "routing.maxImbalance",
     "maxLength"),
    ("routing imbalance below 1", {"routing": {"maxImbalance": "0.9"}}, "routing.maxImbalance", "rule",
     "maxImbalance must be from 1 to 100"),
    ("routing in sidecar mode", {"routing": {}, "upstream.url": DELETE, "server": {
        "name": "vllm", "image": "vllm/vllm-openai", "ports": [{"containerPort": 8000}]}}, "routing", "rule",
     "routing needs gateway mode: a sidecar proxy has one server, its own"),
    ("tokenizer without type", {"tokenizer": {"encoding": "cl100k_base"}}, "tokenizer.type", "required"),
    ("tokenizer type unknown", {"tokenizer.type": "sentencepiece"}, "tokenizer.type", "enum"),
    ("tiktoken encoding unknown", {"tokenizer.encoding": "gpt2"}, "tokenizer.encoding", "enum"),
    ("tiktoken without encoding", {"tokenizer.encoding": DELETE}, "tokenizer.encoding", "rule",
     "a tiktoken tokenizer needs encoding"),
    ("huggingface without a file", {"tokenizer": {"type": "huggingface"}}, "tokenizer.configMapRef", "rule",
     "a huggingface tokenizer needs configMapRef or volume (where its tokenizer.json is)"),
    ("huggingface with encoding",
     {"tokenizer": {"type": "huggingface", "encoding": "cl100k_base", "configMapRef": {"name": "tok"}}},
     "tokenizer.encoding", "rule", "encoding is for tiktoken only; a huggingface or gguf tokenizer is a file"),
    ("gguf without volume", {"tokenizer": {"type": "gguf"}}, "tokenizer.volume", "rule",
     "a gguf tokenizer needs volume and path (the model's .gguf file; a ConfigMap is too small)"),
    ("configMapRef and volume", {"tokenizer": {"type": "huggingface", "configMapRef": {"name": "tok"},
                                               "volume": {"persistentVolumeClaim": {"claimName": "m"}},
                                               "path": "tokenizer.json"}},
     "tokenizer.volume", "rule", "configMapRef and volume are alternatives; give one"),
    ("volume without path", {"tokenizer": {"type": "gguf", "volume": {"persistentVolumeClaim": {"claimName": "m"}}}},
     "tokenizer.path", "rule", "volume and path go together (path is the file inside the volume)"),
    ("volume of two sources", {"tokenizer": {"type": "gguf", "path": "m.gguf", "volume": {
        "persistentVolumeClaim": {"claimName": "m"}, "hostPath": {"path": "/models"}}}},
     "tokenizer.volume", "maxProperties"),
    ("volume of no source", {"tokenizer": {"type": "gguf", "path": "m.gguf", "volume": {}}}, "tokenizer.volume",
     "minProperties"),
    *[(f"tokenizer path {name}", {"tokenizer": {"type": "gguf", "path": path, "volume": {"hostPath": {
        "path": "/models"}}}}, "tokenizer.path", keyword) for name, path, keyword in (
        ("absolute", "/models/m.gguf", "pattern"), ("with ..", "a/../m.gguf", "pattern"),
        ("with .", "./m.gguf", "pattern"), ("with //", "a//m.gguf", "pattern"), ("ending in /", "a/", "pattern"),
        ("empty", "", "minLength"), ("too long", "m" * 1025, "maxLength"))],
    ("configMapRef without name", {"tokenizer": {"type": "huggingface", "configMapRef": {"key": "tokenizer.json"}}},
     "tokenizer.configMapRef.name", "required"),
    ("configMap name not a DNS name", {"tokenizer": {"type": "huggingface", "configMapRef": {"name": "Tok"}}},
     "tokenizer.configMapRef.name", "pattern"),
    ("configMap name empty", {"tokenizer": {"type": "huggingface", "configMapRef": {"name": ""}}},
     "tokenizer.configMapRef.name", "minLength"),
    ("configMap name too long", {"tokenizer": {"type": "huggingface", "configMapRef": {"name": "t" * 254}}},
     "tokenizer.configMapRef.name", "maxLength"),
    ("configMap key with a slash",
     {"tokenizer": {"type": "huggingface", "configMapRef": {"name": "tok", "key": "a/tokenizer.json"}}},
     "tokenizer.configMapRef.key", "pattern"),
    ("configMap key empty", {"tokenizer": {"type": "huggingface", "configMapRef": {"name": "tok", "key": ""}}},
     "tokenizer.configMapRef.key", "minLength"),
    ("configMap key too long",
     {"tokenizer": {"type": "huggingface", "configMapRef": {"name": "tok", "key": "k" * 254}}},
     "tokenizer.configMapRef.key", "maxLength"),
    ("no input price", {"pricing.inputPerMTok": DELETE}, "pricing.inputPerMTok", "required"),
    ("no output price", {"pricing.outputPerMTok": DELETE}, "pricing.outputPerMTok", "required"),
    ("input price negative", {"pricing.inputPerMTok": "-0.1"}, "pricing.inputPerMTok", "pattern"),
    ("input price in exponent form", {"pricing.inputPerMTok": "6e-1"}, "pricing.inputPerMTok", "pattern"),
    ("input price too long", {"pricing.inputPerMTok": "1" * 33}, "pricing.inputPerMTok", "maxLength"),
    ("output price with a comma", {"pricing.outputPerMTok": "2,40"}, "pricing.outputPerMTok", "pattern"),
    ("output price a YAML float", {"pricing.outputPerMTok": 2.4}, "pricing.outputPerMTok", "type"),
    ("output price too long", {"pricing.outputPerMTok": "2" * 33}, "pricing.outputPerMTok", "maxLength"),
    ("cachePolicyRef without name", {"cachePolicyRef": {}}, "cachePolicyRef.name", "required"),
    ("policy name not a DNS name", {"cachePolicyRef.name": "Standard"}, "cachePolicyRef.name", "pattern"),
    ("policy name empty", {"cachePolicyRef.name": ""}, "cachePolicyRef.name", "minLength"),
    ("policy name too long", {"cachePolicyRef.name": "p" * 254}, "cachePolicyRef.name", "maxLength"),
    ("imageTokens negative", {"imageTokens": -1}, "imageTokens", "minimum"),
    ("replicas negative", {"proxy": {"replicas": -1}}, "proxy.replicas", "minimum"),
    ("replicas over 100", {"proxy": {"replicas": 101}}, "proxy.replicas", "maximum"),
    ("proxy image empty", {"proxy": {"image": ""}}, "proxy.image", "minLength"),
    ("proxy image too long", {"proxy": {"image": "i" * 1025}}, "proxy.image", "maxLength"),
    ("cpu request not a quantity", {"proxy": {"resources": {"requests": {"cpu": "lots"}}}},
     "proxy.resources.requests.cpu", "pattern"),
    ("memory limit not a quantity", {"proxy": {"resources": {"limits": {"memory": "1 GB"}}}},
     "proxy.resources.limits.memory", "pattern"),
    ("server without name", {"server": {"image": "vllm/vllm-openai"}}, "server.name", "required"),
    ("server without image", {"server": {"name": "vllm"}}, "server.image", "required"),
    ("server name not a DNS label", {"server": {"name": "vLLM", "image": "vllm/vllm-openai"}}, "server.name",
     "pattern"),
    ("server name empty", {"server": {"name": "", "image": "vllm/vllm-openai"}}, "server.name", "minLength"),
    ("server name too long", {"server": {"name": "v" * 64, "image": "vllm/vllm-openai"}}, "server.name",
     "maxLength"),
    ("server image empty", {"server": {"name": "vllm", "image": ""}}, "server.image", "minLength"),
    ("server image too long", {"server": {"name": "vllm", "image": "i" * 1025}}, "server.image", "maxLength"),
    *[(name, {"proxy": proxy}, *rest) for name, proxy, *rest in NETWORK_CASES],
])

# Under the CachePolicy's spec; the same cases run under a PlanReplay's inline spec.policy.
POLICY_CASES: list[Row] = [
    ("defaultTtl not enabled", {"defaultTtl": "24h"}, "defaultTtl", "rule", "defaultTtl must be one of enabledTtls"),
    ("automatic.ttl not enabled", {"automatic": {"mode": "lastUserMessage", "ttl": "24h"}}, "automatic.ttl", "rule",
     "automatic.ttl must be one of enabledTtls when automatic.mode is not off"),
    ("enabledTtls empty", {"enabledTtls": [], "defaultTtl": DELETE, "automatic": DELETE}, "enabledTtls",
     "minItems"),
    ("four enabledTtls", {"enabledTtls": ["5m", "1h", "24h", "5m"]}, "enabledTtls", "maxItems"),
    ("enabledTtls with a duplicate", {"enabledTtls": ["5m", "1h", "5m"]}, "enabledTtls[2]",
     "x-kubernetes-list-type"),
    ("enabledTtls with an unknown tier", {"enabledTtls": ["5m", "10m"]}, "enabledTtls[1]", "enum"),
    ("defaultTtl unknown", {"defaultTtl": "2h"}, "defaultTtl", "enum"),
    *[case for tier in TIERS for case in [
        (f"write multiplier {tier} not a number", {f"writeMultipliers.{tier}": "abc"}, f"writeMultipliers.{tier}",
         "pattern"),
        (f"write multiplier {tier} too long", {f"writeMultipliers.{tier}": "1" * 33}, f"writeMultipliers.{tier}",
         "maxLength"),
        (f"write multiplier {tier} 100", {f"writeMultipliers.{tier}": "100"}, f"writeMultipliers.{tier}", "rule",
         MULTIPLIER),
    ]],
    ("write multiplier 1h 150.5", {"writeMultipliers.1h": "150.5"}, "writeMultipliers.1h", "rule", MULTIPLIER),
    ("write multiplier 24h 100.0", {"writeMultipliers.24h": "100.0"}, "writeMultipliers.24h", "rule", MULTIPLIER),
    ("write multiplier a YAML float", {"writeMultipliers.5m": 1.25}, "writeMultipliers.5m", "type"),
    ("read multiplier negative", {"readMultiplier": "-0.1"}, "readMultiplier", "pattern"),
    ("read multiplier too long", {"readMultiplier": "0." + "1" * 31}, "readMultiplier", "maxLength"),
    ("read multiplier 100", {"readMultiplier": "100"}, "readMultiplier", "rule", MULTIPLIER),
    ("minPrefixTokens negative", {"minPrefixTokens": -1}, "minPrefixTokens", "minimum"),
    ("maxBreakpoints 0", {"maxBreakpoints": 0}, "maxBreakpoints", "minimum"),
    ("maxBreakpoints 65", {"maxBreakpoints": 65}, "maxBreakpoints", "maximum"),
    ("lookbackBlocks 0", {"lookbackBlocks": 0}, "lookbackBlocks", "minimum"),
    ("lookbackBlocks 1001", {"lookbackBlocks": 1001}, "lookbackBlocks", "maximum"),
    ("automatic mode unknown", {"automatic.mode": "always"}, "automatic.mode", "enum"),
    ("automatic mode a bare YAML off", {"automatic.mode": False}, "automatic.mode", "type"),
    ("automatic ttl unknown", {"automatic.ttl": "2h"}, "automatic.ttl", "enum"),
    ("an empty ignore prefix", {"ignorePrefixes": ["x-billing-nonce:", ""]}, "ignorePrefixes[1]", "minLength"),
    ("redis maxMemory with a space", {"redis": {"maxMemory": "256 mb"}}, "redis.maxMemory", "pattern"),
    ("redis maxMemory in terabytes", {"redis": {"maxMemory": "1tb"}}, "redis.maxMemory", "pattern"),
    ("redis maxMemory too long", {"redis": {"maxMemory": "1" * 33}}, "redis.maxMemory", "maxLength"),
    ("redis eviction policy unknown", {"redis": {"evictionPolicy": "lru"}}, "redis.evictionPolicy", "enum"),
]

CACHE_POLICY = spec_cases("CachePolicy", POLICY_CASES)

TIER_OVERRIDE = "tierOverride keys must be tiers: 5m, 1h or 24h"
CONFIDENCE = "confidence must be in (0.5, 0.999]"

PLAN_REPLAY = spec_cases("PlanReplay", [
    ("no models", {"models": DELETE}, "models", "required"),
    ("models empty", {"models": []}, "models", "minItems"),
    ("101 models", {"models": [f"m{i}" for i in range(101)]}, "models", "maxItems"),
    ("a model twice", {"models": ["a", "a"]}, "models[1]", "x-kubernetes-list-type"),
    ("model not an alias", {"models": ["llama 70b"]}, "models[0]", "pattern"),
    ("model alias too long", {"models": ["a" * 129]}, "models[0]", "maxLength"),
    ("window and lastHours", {"window": {"start": "2025-06-01T00:00:00Z", "end": "2025-06-02T00:00:00Z"}}, "",
     "rule", "set exactly one of window and lastHours"),
    ("neither window nor lastHours", {"lastHours": DELETE}, "", "rule", "set exactly one of window and lastHours"),
    ("window without start", {"lastHours": DELETE, "window": {"end": "2025-06-02T00:00:00Z"}}, "window.start",
     "required"),
    ("window without end", {"lastHours": DELETE, "window": {"start": "2025-06-01T00:00:00Z"}}, "window.end",
     "required"),
    ("window backwards",
     {"lastHours": DELETE, "window": {"start": "2025-06-02T00:00:00Z", "end": "2025-06-01T00:00:00Z"}}, "window",
     "rule", "window.start must be before window.end"),
    ("window empty across zones",  # the same instant: compared as timestamps, not strings
     {"lastHours": DELETE, "window": {"start": "2025-06-01T02:00:00+02:00", "end": "2025-06-01T00:00:00Z"}},
     "window", "rule", "window.start must be before window.end"),
    ("window start not a date-time",
     {"lastHours": DELETE, "window": {"start": "yesterday", "end": "2025-06-02T00:00:00Z"}}, "window.start",
     "format"),
    ("window end without a zone",
     {"lastHours": DELETE, "window": {"start": "2025-06-01T00:00:00Z", "end": "2025-06-02T00:00:00"}}, "window.end",
     "format"),
    ("lastHours 0", {"lastHours": 0}, "lastHours", "minimum"),
    ("lastHours over a year", {"lastHours": 8761}, "lastHours", "maximum"),
    ("parallelism 0", {"parallelism": 0}, "parallelism", "minimum"),
    ("parallelism over 64", {"parallelism": 65}, "parallelism", "maximum"),
    ("policy and cachePolicyRef", {"policy": {}}, "", "rule", "set exactly one of policy and cachePolicyRef"),
    ("neither policy nor cachePolicyRef", {"cachePolicyRef": DELETE}, "", "rule",
     "set exactly one of policy and cachePolicyRef"),
    ("cachePolicyRef without name", {"cachePolicyRef": {}}, "cachePolicyRef.name", "required"),
    ("cachePolicyRef name not a DNS name", {"cachePolicyRef": {"name": "my_policy"}}, "cachePolicyRef.name",
     "pattern"),
    ("cachePolicyRef name empty", {"cachePolicyRef": {"name": ""}}, "cachePolicyRef.name", "minLength"),
    ("cachePolicyRef name too long", {"cachePolicyRef": {"name": "p" * 254}}, "cachePolicyRef.name", "maxLength"),
    ("tierOverride key not a tier", {"tierOverride": {"10m": "1h"}}, "tierOverride", "rule", TIER_OVERRIDE),
    ("tierOverride to an unknown tier", {"tierOverride": {"5m": "2h"}}, "tierOverride.5m", "enum"),
    ("four tierOverrides", {"tierOverride": {"5m": "1h", "1h": "24h", "24h": "5m", "10m": "5m"}}, "tierOverride",
     "maxProperties"),
    ("pricingOverrides for a model not replayed",
     {"pricingOverrides": {"other": {"inputPerMTok": "1", "outputPerMTok": "2"}}}, "pricingOverrides", "rule",
     "pricingOverrides may only name models listed in models"),
    ("101 pricingOverrides",
     {"pricingOverrides": {f"m{i}": {"inputPerMTok": "1", "outputPerMTok": "2"} for i in range(101)}},
     "pricingOverrides", "maxProperties"),
    ("pricingOverrides without input price", {"pricingOverrides": {"llama-70b": {"outputPerMTok": "2"}}},
     "pricingOverrides.llama-70b.inputPerMTok", "required"),
    ("pricingOverrides without output price", {"pricingOverrides": {"llama-70b": {"inputPerMTok": "1"}}},
     "pricingOverrides.llama-70b.outputPerMTok", "required"),
    ("pricingOverrides input price negative",
     {"pricingOverrides": {"llama-70b": {"inputPerMTok": "-1", "outputPerMTok": "2"}}},
     "pricingOverrides.llama-70b.inputPerMTok", "pattern"),
    ("pricingOverrides input price too long",
     {"pricingOverrides": {"llama-70b": {"inputPerMTok": "1" * 33, "outputPerMTok": "2"}}},
     "pricingOverrides.llama-70b.inputPerMTok", "maxLength"),
    ("pricingOverrides output price not a decimal",
     {"pricingOverrides": {"llama-70b": {"inputPerMTok": "1", "outputPerMTok": "2.x"}}},
     "pricingOverrides.llama-70b.outputPerMTok", "pattern"),
    ("pricingOverrides output price too long",
     {"pricingOverrides": {"llama-70b": {"inputPerMTok": "1", "outputPerMTok": "2" * 33}}},
     "pricingOverrides.llama-70b.outputPerMTok", "maxLength"),
    ("iterations 99", {"bootstrap": {"iterations": 99}}, "bootstrap.iterations", "minimum"),
    ("iterations 100001", {"bootstrap": {"iterations": 100001}}, "bootstrap.iterations", "maximum"),
    ("confidence 0.5", {"bootstrap": {"confidence": 0.5}}, "bootstrap.confidence", "rule", CONFIDENCE),
    ("confidence 0", {"bootstrap": {"confidence": 0}}, "bootstrap.confidence", "rule", CONFIDENCE),
    ("confidence 0.9995", {"bootstrap": {"confidence": 0.9995}}, "bootstrap.confidence", "rule", CONFIDENCE),
    ("confidence 1", {"bootstrap": {"confidence": 1}}, "bootstrap.confidence", "rule", CONFIDENCE),
    ("seed negative", {"bootstrap": {"seed": -1}}, "bootstrap.seed", "minimum"),
    ("unit unknown", {"bootstrap": {"unit": "week"}}, "bootstrap.unit", "enum"),
])

# The CachePolicy cases again, under a PlanReplay's inline policy (one schema, checked as such in packaging).
INLINE_POLICY = [
    Case(f"PlanReplay: inline policy: {case.name.removeprefix('CachePolicy: ')}", "PlanReplay",
         {"spec.cachePolicyRef": DELETE, "spec.policy": base_spec("CachePolicy"),
          **{k.replace("spec.", "spec.policy.", 1): v for k, v in case.changes.items()}},
         case.field.replace("spec", "spec.policy", 1), case.keyword, case.message, case.extra)
    for case in CACHE_POLICY
]

ROOT_CASES = [Case(f"{kind}: no spec", kind, {"spec": DELETE}, "spec", "required") for kind in KINDS]


def status_cases(kind: str, rows: list[Row]) -> list[Case]:
    """(name, changes under status, field under status, keyword) → cases of ``kind``'s status."""
    return [Case(f"{kind} status: {name}", kind, {f"status.{k}": v for k, v in changes.items()}, f"status.{at}",
                 keyword) for name, changes, at, keyword in rows]


CONDITION_CASES: list[Row] = [
    ("observedGeneration negative", {"observedGeneration": -1}, "observedGeneration", "minimum"),
    ("17 conditions", {"conditions": [condition(f"Type{i}") for i in range(17)]}, "conditions", "maxItems"),
    ("a condition type twice", {"conditions": [condition(), condition(status="False")]}, "conditions[1]",
     "x-kubernetes-list-type"),
    ("a condition without type", {"conditions.0.type": DELETE}, "conditions[0].type", "required"),
    ("a condition without status", {"conditions.0.status": DELETE}, "conditions[0].status", "required"),
    ("condition type not CamelCase", {"conditions.0.type": "Ready!"}, "conditions[0].type", "pattern"),
    ("condition type empty", {"conditions.0.type": ""}, "conditions[0].type", "minLength"),
    ("condition type too long", {"conditions.0.type": "R" * 317}, "conditions[0].type", "maxLength"),
    ("condition status Yes", {"conditions.0.status": "Yes"}, "conditions[0].status", "enum"),
    ("condition reason with a space", {"conditions.0.reason": "not ok"}, "conditions[0].reason", "pattern"),
    ("condition reason too long", {"conditions.0.reason": "R" * 1025}, "conditions[0].reason", "maxLength"),
    ("condition message too long", {"conditions.0.message": "m" * 32769}, "conditions[0].message", "maxLength"),
    ("condition lastTransitionTime not a time", {"conditions.0.lastTransitionTime": "now"},
     "conditions[0].lastTransitionTime", "format"),
    ("condition observedGeneration negative", {"conditions.0.observedGeneration": -1},
     "conditions[0].observedGeneration", "minimum"),
]

STATUS = [
    *(case for kind in KINDS for case in status_cases(kind, CONDITION_CASES)),
    *status_cases("DeployedModel", [
        ("tariffVersion negative", {"tariffVersion": -1}, "tariffVersion", "minimum"),
        ("mode unknown", {"mode": "hybrid"}, "mode", "enum"),
        ("replicas over 1024", {"replicas": [f"http://10.0.{i // 256}.{i % 256}:80" for i in range(1025)]},
         "replicas", "maxItems"),
        ("a replica URL too long", {"replicas": ["http://h/" + "p" * 2040]}, "replicas[0]", "maxLength"),
    ]),
    *status_cases("CachePolicy", [
        ("a tariff version negative", {"tariffVersions": {"llama-70b": -1}}, "tariffVersions.llama-70b", "minimum"),
    ]),
    *status_cases("PlanReplay", [
        ("phase unknown", {"phase": "Done"}, "phase", "enum"),
        ("requests negative", {"summary.requests": -1}, "summary.requests", "minimum"),
        ("startedAt not a time", {"startedAt": "2025-06-01"}, "startedAt", "format"),
        ("finishedAt not a time", {"finishedAt": "soon"}, "finishedAt", "format"),
        *[case for name in ("projectedCost", "savings", "savingsPct", "hitRate", "readTokenRatio") for case in [
            (f"{name} interval of one bound", {f"intervals.{name}": ["1"]}, f"intervals.{name}", "minItems"),
            (f"{name} interval of three bounds", {f"intervals.{name}": ["1", "2", "3"]}, f"intervals.{name}",
             "maxItems"),
        ]],
    ]),
]

CASES = [*ROOT_CASES, *DEPLOYED_MODEL, *CACHE_POLICY, *PLAN_REPLAY, *INLINE_POLICY, *STATUS]


def test_every_constraint_has_a_rejecting_case() -> None:
    """Each rule, enum, pattern, bound, length, count, required key, format and list-type the schemas declare is
    the one some case above breaks; and every case breaks a constraint the schemas declare."""
    names = [case.name for case in CASES]
    assert len(set(names)) == len(names), "case names must be unique"
    declared = set(constraints())
    exercised = {case.constraint() for case in CASES if not case.extra}
    assert exercised <= declared, sorted(map(str, exercised - declared))
    missing = sorted(declared - exercised)
    assert not missing, "constraints no case breaks:\n" + "\n".join(map(str, missing))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_the_server_rejects(cluster: Cluster, namespace: str, case: Case) -> None:
    """The server's 422 names the field and says why: the rule's message, or its words for the keyword."""
    doc = resource(case.kind, namespace, "base")
    if case.status:
        doc["status"] = base_status(case.kind)
    doc = changed(doc, case.changes)
    with pytest.raises(KubeError) as caught:
        await (patch_status(cluster, doc) if case.status else submit(cluster, doc))
    error = caught.value
    assert error.status == 422, error.message
    causes = [c for c in error.body["details"]["causes"] if NOT_CHECKED not in c["message"]]
    says = case.says()
    assert any(c.get("field") == case.field and all(s in c["message"] for s in says) for c in causes), (says, causes)
    assert f"{case.field}: " in error.message and all(s in error.message for s in says), error.message
    if case.keyword == "rule":  # the OpenAPI schema passes: the rule is what stands between it and the cluster
        assert len(causes) == 1, causes
    else:  # nothing else in the object fails: the case breaks one thing
        assert all(c.get("field") == case.field or str(c.get("field")).startswith((f"{case.field}.",
                   f"{case.field}[")) for c in causes), causes


# ================================================================================================ acceptance


# Valid objects beyond the examples: the passing side of each rule and the inclusive side of each bound.
VALID: list[tuple[str, str, dict[str, Any]]] = [
    ("sidecar without url", "DeployedModel", {"upstream.url": DELETE, "server": {
        "name": "vllm", "image": "vllm/vllm-openai:latest", "args": ["--port=8000"],
        "ports": [{"containerPort": 8000}], "resources": {"limits": {"nvidia.com/gpu": 1}}}}),
    ("anthropic url without /v1", "DeployedModel", {"upstream.url": "https://api.example.com",
                                                    "upstream.api": "anthropic"}),
    ("anthropic url with /v1", "DeployedModel", {"upstream.url": "http://claude-like:8080/v1/",
                                                 "upstream.api": "anthropic"}),
    ("responses api", "DeployedModel", {"upstream.api": "openai-responses"}),
    ("one model on three apis", "DeployedModel", {"upstream.api": DELETE,
                                                  "upstream.apis": ["openai", "anthropic", "openai-responses"]}),
    ("huggingface tokenizer", "DeployedModel", {"tokenizer": {"type": "huggingface",
                                                              "configMapRef": {"name": "llama-tokenizer"}}}),
    ("gguf from a volume", "DeployedModel", {"tokenizer": {
        "type": "gguf", "volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        "path": "smollm2/..SmolLM2-135M-Instruct.Q4_1.gguf"}}),
    ("huggingface from an image volume", "DeployedModel", {"tokenizer": {
        "type": "huggingface", "volume": {"image": {"reference": "registry.example.com/tok:1"}},
        "path": ".hidden/tokenizer.json"}}),
    ("tiktoken from a ConfigMap", "DeployedModel", {"tokenizer": {
        "type": "tiktoken", "encoding": "o200k_base", "configMapRef": {"name": "enc", "key": "o200k_base.tiktoken"}}}),
    ("alias of 128 characters", "DeployedModel", {"alias": "a" * 128}),
    ("zero replicas", "DeployedModel", {"proxy": {"replicas": 0}}),
    ("100 replicas and quantities", "DeployedModel", {"proxy": {"replicas": 100, "resources": {
        "requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": 2, "memory": "1.5Gi"}}}}),
    ("a secret key", "DeployedModel", {"upstream.apiKeySecretRef": {"name": "upstream.key", "key": "api_key-1.x"}}),
    ("a cache salt per principal", "DeployedModel", {"upstream.cacheSalt": "principal"}),
    ("routing at its bounds", "DeployedModel", {"routing": {"mode": "roundRobin", "maxImbalance": "100"}}),
    ("routing by default", "DeployedModel", {"routing": {"maxImbalance": "1"}}),
    ("header mode behind a gateway, every peer kind", "DeployedModel", {"proxy": {
        "auth": {"mode": "header", "header": "X-Tenant_ID.v2"}, "networkPolicy": {"gateway": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}},
             "podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["debug"]},
                                                  {"key": "tier", "operator": "Exists"},
                                                  {"key": "canary", "operator": "DoesNotExist", "values": []}]}},
            {"podSelector": {}},
            {"ipBlock": {"cidr": "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"}},
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": [f"10.{i}.0.0/16" for i in range(16)]}}]}}}),
    ("header mode with its policy off", "DeployedModel", {"proxy": {"auth": {"mode": "header"},
                                                                    "networkPolicy": {"enabled": False}}}),
    ("api keys behind a policy", "DeployedModel", {"proxy": {"auth": {"mode": "apiKeys"}, "networkPolicy": {
        "enabled": True, "gateway": [{"namespaceSelector": {}}] * 16}}}),
    ("selector bounds", "DeployedModel", {"proxy": {"auth": {"mode": "header", "header": "h" * 128}, "networkPolicy": {
        "gateway": [{"podSelector": {
            "matchLabels": {**{f"k{i}": "v" * 63 for i in range(31)}, "example.com/" + "k" * 63: ""},
            "matchExpressions": [{"key": "k" * 317, "operator": "In", "values": ["v" * 63] * 64}] * 16}}]}}}),
    ("every policy key at a bound", "CachePolicy", {
        "enabledTtls": ["24h", "5m", "1h"], "defaultTtl": "24h", "readMultiplier": "99.99",
        "writeMultipliers": {"5m": "0", "1h": "2.0", "24h": "99.999"}, "automatic": {"mode": "lastUserMessage"},
        "minPrefixTokens": 0, "maxBreakpoints": 64, "lookbackBlocks": 1000, "ignorePrefixes": ["x"],
        "redis": {"maxMemory": "0", "evictionPolicy": "noeviction"}}),
    ("small bounds", "CachePolicy", {"maxBreakpoints": 1, "lookbackBlocks": 1, "redis": {"maxMemory": "2GB"}}),
    ("automatic off with a tier not enabled", "CachePolicy", {"enabledTtls": ["5m"], "defaultTtl": "5m",
                                                              "automatic": {"mode": "off", "ttl": "1h"}}),
    ("defaultTtl without enabledTtls", "CachePolicy", {"enabledTtls": DELETE, "defaultTtl": "24h"}),
    ("an empty policy", "CachePolicy", {"enabledTtls": DELETE, "defaultTtl": DELETE, "writeMultipliers": DELETE,
                                        "readMultiplier": DELETE, "automatic": DELETE}),
    ("a window across zones", "PlanReplay", {"lastHours": DELETE, "window": {
        "start": "2025-06-01T02:00:00+02:00", "end": "2025-06-01T00:00:01Z"}}),
    ("a year of 100 models", "PlanReplay", {"lastHours": 8760, "models": [f"m{i}" for i in range(100)]}),
    ("an inline policy, overrides, bounds", "PlanReplay", {
        "models": ["llama-70b", "assistant-mini"], "lastHours": 1, "cachePolicyRef": DELETE,
        "policy": {"enabledTtls": ["5m", "1h", "24h"], "defaultTtl": "1h", "automatic": {"mode": "lastBlock"}},
        "tierOverride": {"5m": "1h", "1h": "24h", "24h": "24h"},
        "pricingOverrides": {"assistant-mini": {"inputPerMTok": "0.3", "outputPerMTok": "1.5"}},
        "bootstrap": {"iterations": 100, "confidence": 0.999, "seed": 0, "unit": "request"}}),
    ("bootstrap upper bounds", "PlanReplay", {"bootstrap": {"iterations": 100000, "confidence": 0.5001,
                                                            "unit": "day"}}),
]


@pytest.mark.parametrize(("name", "kind", "changes"), VALID, ids=[name for name, _, _ in VALID])
async def test_the_server_accepts(cluster: Cluster, namespace: str, name: str, kind: str,
                                  changes: dict[str, Any]) -> None:
    doc = changed(resource(kind, namespace), {f"spec.{k}": v for k, v in changes.items()})
    created = await submit(cluster, doc)
    assert contains(created["spec"], doc["spec"])


async def test_a_valid_status_is_accepted_whole(cluster: Cluster, namespace: str) -> None:
    """Every status field the schemas declare, patched for real and read back as written (none pruned)."""
    for kind in KINDS:
        doc = {**resource(kind, namespace, "base"), "status": base_status(kind)}
        await patch_status(cluster, doc, dry_run=False)
        live = await cluster.get(API_VERSION, PLURALS[kind], namespace, "base")
        assert live["status"] == base_status(kind), kind
        await cluster.patch(API_VERSION, PLURALS[kind], namespace, "base", {"status": None}, subresource="status")


def contains(big: Any, small: Any) -> bool:
    """Whether ``small`` is in ``big`` key by key (the server may add defaults, never drop or change a value)."""
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and contains(big[k], v) for k, v in small.items())
    return bool(big == small)


async def test_an_unknown_field_is_an_error_under_strict_validation(cluster: Cluster, namespace: str) -> None:
    """What kubectl apply (strict by default) says; without strict validation the server would prune the key
    silently. The model server's container spec is passed through as given."""
    for kind, key in (("DeployedModel", "apiKeyEnv"), ("CachePolicy", "maxTtl"), ("PlanReplay", "proposal")):
        with pytest.raises(KubeError) as caught:
            await submit(cluster, changed(resource(kind, namespace), {f"spec.{key}": "x"}))
        assert caught.value.status == 400 and f'unknown field "spec.{key}"' in caught.value.message
    with pytest.raises(KubeError) as caught:
        await submit(cluster, changed(resource("CachePolicy", namespace), {"spec.writeMultipliers.48h": "3"}))
    assert 'unknown field "spec.writeMultipliers.48h"' in caught.value.message
    sidecar = changed(resource("DeployedModel", namespace), {"spec.server": {
        "name": "vllm", "image": "vllm/vllm-openai", "env": [{"name": "A", "value": "b"}], "anything": {"x": 1}}})
    assert (await submit(cluster, sidecar))["spec"]["server"]["anything"] == {"x": 1}


DECIMAL_FIELDS = {
    "DeployedModel": ["pricing.inputPerMTok", "pricing.outputPerMTok"],
    "CachePolicy": ["readMultiplier", "writeMultipliers.5m", "writeMultipliers.1h", "writeMultipliers.24h"],
    "PlanReplay": ["pricingOverrides.llama-70b.inputPerMTok", "pricingOverrides.llama-70b.outputPerMTok"],
}
GOOD_DECIMALS = ("0", "0.60", "1.25", "12", "99.999")
BAD_DECIMALS = ("", "-1", "1e3", ".5", "1.", "one", "1,5", " 1", "0x10")


@pytest.mark.parametrize(("kind", "path"), [(k, p) for k, paths in DECIMAL_FIELDS.items() for p in paths])
async def test_decimals_are_decimal_strings(cluster: Cluster, namespace: str, kind: str, path: str) -> None:
    doc = resource(kind, namespace)
    if kind == "PlanReplay":
        doc["spec"]["pricingOverrides"] = {"llama-70b": {"inputPerMTok": "1", "outputPerMTok": "2"}}
    for good in GOOD_DECIMALS:
        await submit(cluster, changed(doc, {f"spec.{path}": good}))
    for bad in BAD_DECIMALS:
        with pytest.raises(KubeError) as caught:
            await submit(cluster, changed(doc, {f"spec.{path}": bad}))
        assert "should match" in caught.value.message, (bad, caught.value.message)


# ================================================================================================ defaults


DEFAULTS = {
    "DeployedModel": {".spec.imageTokens": 0, ".spec.proxy": {"replicas": 2}, ".spec.proxy.replicas": 2,
                      ".spec.upstream.forwardCacheControl": False,
                      ".spec.tokenizer.configMapRef.key": "tokenizer.json"},
    "PlanReplay": {".spec.bootstrap": {"iterations": 2000, "confidence": 0.95, "seed": 0, "unit": "principal"},
                   ".spec.bootstrap.iterations": 2000, ".spec.bootstrap.confidence": 0.95, ".spec.bootstrap.seed": 0,
                   ".spec.bootstrap.unit": "principal", ".spec.parallelism": 1},
    "CachePolicy": {},  # no schema defaults: the proxy's parser owns them (tests/packaging/test_crds.py)
}


def at(doc: Obj, path: str) -> Any:
    value: Any = doc
    for part in path.strip(".").split("."):
        value = value[part]
    return value


async def test_the_server_applies_the_schema_defaults(cluster: Cluster, namespace: str) -> None:
    """Created for real without the defaulted fields and read back. Every default the schemas declare is here."""
    declared = {kind: {path for path, node in walk(schema(kind)) if "default" in node} for kind in KINDS}
    assert declared == {kind: set(paths) for kind, paths in DEFAULTS.items()}
    hf = changed(resource("DeployedModel", namespace, "defaults"),
                 {"spec.tokenizer": {"type": "huggingface", "configMapRef": {"name": "tok"}}})
    for doc in (hf, resource("PlanReplay", namespace, "defaults"), resource("CachePolicy", namespace, "defaults")):
        await submit(cluster, doc, dry_run=False)
        live = await cluster.get(API_VERSION, PLURALS[doc["kind"]], namespace, "defaults")
        for path, value in DEFAULTS[doc["kind"]].items():
            assert at(live, path) == value, path
        if doc["kind"] == "CachePolicy":
            assert live["spec"] == doc["spec"]
    # A value given is kept, and a default inside a given object still applies.
    doc = changed(resource("DeployedModel", namespace, "kept"), {"spec.proxy": {"image": "p:1"}, "spec.imageTokens": 5})
    created = await submit(cluster, doc)
    assert created["spec"]["proxy"] == {"image": "p:1", "replicas": 2} and created["spec"]["imageTokens"] == 5


# ================================================================================================ status subresource


async def test_the_status_subresource_keeps_spec_and_status_apart(cluster: Cluster, namespace: str) -> None:
    """Status sent with the object is dropped, spec sent to /status is ignored, and a status change leaves the
    generation alone: only the operator, through /status, writes status."""
    doc = {**resource("DeployedModel", namespace, "sub"), "status": base_status("DeployedModel")}
    created = await submit(cluster, doc, dry_run=False)
    assert "status" not in created and created["metadata"]["generation"] == 1
    await cluster.patch(API_VERSION, MODELS, namespace, "sub", {"status": {"mode": "sidecar"}})
    assert "status" not in await cluster.get(API_VERSION, MODELS, namespace, "sub")
    await cluster.patch(API_VERSION, MODELS, namespace, "sub", {"spec": {"imageTokens": 9}, "status": {
        "mode": "sidecar"}}, subresource="status")
    live = await cluster.get(API_VERSION, MODELS, namespace, "sub")
    assert live["status"] == {"mode": "sidecar"} and live["spec"]["imageTokens"] == 0
    assert live["metadata"]["generation"] == 1


async def test_the_status_a_replay_writes_is_what_the_schema_declares(cluster: Cluster, namespace: str) -> None:
    """The operator's status fields from a real result (camelCase, converted in one place) are stored as written:
    a key the schema does not declare would be pruned, and a column or health check reading it would show
    nothing."""
    result = replay_result()
    fields = result_status(result)
    assert fields["summary"]["savingsPct"] == result["summary"]["savings_pct"]
    assert fields["intervals"]["hitRate"] == result["intervals"]["hit_rate"]
    assert fields["summary"]["creationCost"] == result["summary"]["creation_cost"]
    assert (fields["digest"], fields["caveats"]) == (result["digest"], result["caveats"])
    status = {"phase": "Succeeded", "observedGeneration": 1, **fields, "reportConfigMap": "r",
              "startedAt": now_rfc3339(), "finishedAt": now_rfc3339(),
              "conditions": merge(None, [Condition("Ready", True, "Succeeded", "done")], 1)}
    await patch_status(cluster, {**resource("PlanReplay", namespace, "base"), "status": status}, dry_run=False)
    live = await cluster.get(API_VERSION, REPLAYS, namespace, "base")
    assert live["status"] == status
    await cluster.patch(API_VERSION, REPLAYS, namespace, "base", {"status": None}, subresource="status")


def replay_result() -> dict[str, Any]:
    """A real replay result: two principals ask the same 1000-token system prompt (5m) twice, a minute apart."""
    chain = (ChainBlock(hashlib.sha256(b"system").digest()[:16], 1000, "system", "5m"),
             ChainBlock(hashlib.sha256(b"question").digest()[:16], 1010, "user", None))
    t0 = datetime(2025, 6, 1, tzinfo=UTC)
    requests = [
        LoggedRequest(id=f"r{i}", ts=t0 + timedelta(minutes=i), principal=("alice", "bob")[i % 2], model="m",
                      tokenizer_version="words@test", api="openai", status=200, prompt_tokens=1010,
                      completion_tokens=10, read_tokens=0, creation_tokens=dict.fromkeys(TIERS, 0),
                      input_per_mtok=Decimal(1), output_per_mtok=Decimal(2), billed_cost=Decimal("0.00103"),
                      list_cost=Decimal("0.00103"), chain=chain)
        for i in range(4)]
    spec = {"minPrefixTokens": 0}
    proposal = Proposal(CachePolicy.from_spec(spec), spec, {}, {})
    return report(simulate(requests, proposal), proposal, iterations=100).result


# ================================================================================================ examples


def example_documents() -> list[tuple[str, Obj]]:
    found = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)):
            if str(doc.get("apiVersion", "")).startswith(f"{GROUP}/"):
                found.append((f"{path.relative_to(EXAMPLES)}#{i}", doc))
    return found


EXAMPLE_DOCS = example_documents()


@pytest.fixture(scope="module")
async def examples_namespace(cluster: Cluster) -> str:
    return await cluster.namespace("examples")


@pytest.mark.parametrize(("name", "doc"), EXAMPLE_DOCS, ids=[name for name, _ in EXAMPLE_DOCS])
async def test_every_example_is_created(cluster: Cluster, examples_namespace: str, name: str, doc: Obj) -> None:
    """Created for real, strict, in a fresh namespace; stored as written (nothing pruned)."""
    assert doc["kind"] in KINDS
    doc = {**doc, "metadata": {**doc["metadata"], "namespace": examples_namespace}}
    await submit(cluster, doc, dry_run=False)
    live = await cluster.get(API_VERSION, PLURALS[doc["kind"]], examples_namespace, doc["metadata"]["name"])
    assert contains(live["spec"], doc["spec"])


def test_the_examples_cover_every_kind() -> None:
    assert {doc["kind"] for _, doc in EXAMPLE_DOCS} == set(KINDS)
    assert {name.split("/")[0] for name, _ in EXAMPLE_DOCS} == {"quickstart", "full"}


@needs_kubectl
async def test_the_example_sets_apply_with_kubectl(cluster: Cluster, tmp_path: Path) -> None:
    """`kubectl apply -k examples/quickstart/` on a cluster with the CRDs, then `kubectl apply -k examples/full/`
    over it, as the README says; the Namespace llm is deleted after."""
    if await cluster.get_or_none("v1", "namespaces", None, "llm") is not None:
        await cluster.forget("llm")
        await eventually(lambda: _gone(cluster, "llm"), within=60, what="a leftover namespace llm to go")
    try:
        out = await asyncio.to_thread(kubectl, cluster.plane, "apply", "-k", str(EXAMPLES / "quickstart"),
                                      cache=tmp_path)
        assert sorted(out.split("\n")[:-1]) == ["cachepolicy.promptcache.io/standard created",
                                                "deployedmodel.promptcache.io/llama created", "namespace/llm created"]
        out = await asyncio.to_thread(kubectl, cluster.plane, "apply", "-k", str(EXAMPLES / "full"), cache=tmp_path)
        lines = sorted(out.split("\n")[:-1])
        assert [line for line in lines if line.endswith("unchanged")] == [
            "cachepolicy.promptcache.io/standard unchanged", "deployedmodel.promptcache.io/llama unchanged",
            "namespace/llm unchanged"], out
        assert len([line for line in lines if line.endswith(" created")]) == 6, out
        listed = {plural: sorted(o["metadata"]["name"] for o in await cluster.list(API_VERSION, plural, "llm"))
                  for plural in PLURALS.values()}
        assert listed == {MODELS: ["assistant-mini", "llama", "llama-3-1-8b", "smollm2"],
                          POLICIES: ["extended", "standard"],
                          REPLAYS: ["assistant-mini-extended", "cheaper-reads"]}
    finally:
        await cluster.forget("llm")


async def _gone(cluster: Cluster, name: str) -> bool:
    return await cluster.get_or_none("v1", "namespaces", None, name) is None


# ================================================================================================ the proxy's gate


def random_policy(rng: random.Random) -> Obj:
    """A CachePolicy spec, valid or not, from the values where the CRD and the parser could disagree."""
    tiers = ["5m", "1h", "24h", "10m"]
    multipliers: list[Any] = ["0", "0.1", "1.25", "2.0", "99.99", "100", "100.0", "250", "-1", "abc", "1e2",
                              "99.9999999999999", 1.25, 2, True]
    modes: list[Any] = ["off", "lastBlock", "lastUserMessage", "always", False]
    automatic: Obj = {}
    if rng.random() < 0.7:
        automatic["mode"] = rng.choice(modes)
    if rng.random() < 0.7:
        automatic["ttl"] = rng.choice(tiers)
    candidates: Obj = {
        "enabledTtls": rng.sample(tiers, rng.randint(0, 3)) + rng.choice([[], [], ["5m"]]),
        "defaultTtl": rng.choice(tiers),
        "writeMultipliers": {t: rng.choice(multipliers) for t in rng.sample(["5m", "1h", "24h", "48h"],
                                                                             rng.randint(0, 3))},
        "readMultiplier": rng.choice(multipliers),
        "minPrefixTokens": rng.choice([-1, 0, 1024, "1024"]),
        "maxBreakpoints": rng.randint(-1, 70),
        "lookbackBlocks": rng.choice([0, 1, 20, 1000, 1001]),
        "automatic": automatic,
        "ignorePrefixes": rng.sample(["x-billing-nonce:", "", "y"], rng.randint(0, 2)),
        "redis": rng.choice([{"maxMemory": "1gb"}, {"evictionPolicy": "volatile-ttl"}]),
    }
    return {key: value for key, value in candidates.items() if rng.random() < 0.4}


async def test_whatever_the_server_admits_the_proxy_can_load(cluster: Cluster, namespace: str) -> None:
    """The API server is the proxy's gate: a CachePolicy it admits never fails in the proxy's parser, and the
    same spec is admitted inline in a PlanReplay. 300 specs drawn with a fixed seed."""
    rng = random.Random(20250601)
    admitted = 0
    for _ in range(300):
        spec = random_policy(rng)
        try:
            await submit(cluster, resource("CachePolicy", namespace, spec=spec))
        except KubeError as e:
            assert e.status in (400, 422), e.message
            continue
        admitted += 1
        CachePolicy.from_spec(spec)
        await submit(cluster, changed(resource("PlanReplay", namespace), {"spec.cachePolicyRef": DELETE,
                                                                          "spec.policy": spec}))
    assert 30 <= admitted <= 270, f"{admitted} of 300 admitted: the draw tests little"


def parser_rejects(spec: Obj) -> bool:
    try:
        CachePolicy.from_spec(spec)
    except PolicyError:
        return True
    return False


async def test_the_server_and_the_parser_agree_on_the_cross_field_rules(cluster: Cluster, namespace: str) -> None:
    rejected: list[Obj] = [
        {"enabledTtls": ["1h"], "defaultTtl": "5m"},
        {"enabledTtls": ["5m"], "automatic": {"mode": "lastBlock", "ttl": "1h"}},
        {"readMultiplier": "100"},
        {"writeMultipliers": {"24h": "100.0"}},
    ]
    for spec in rejected:
        assert parser_rejects(spec), spec
        with pytest.raises(KubeError):
            await submit(cluster, resource("CachePolicy", namespace, spec=spec))
    accepted: list[Obj] = [
        {},
        {"enabledTtls": ["1h"]},
        {"enabledTtls": ["5m"], "automatic": {"mode": "off", "ttl": "1h"}},
        {"enabledTtls": ["1h"], "automatic": {"mode": "lastBlock"}},
    ]
    for spec in accepted:
        assert not parser_rejects(spec), spec
        await submit(cluster, resource("CachePolicy", namespace, spec=spec))


# ================================================================================================ printer columns


COLUMNS = {  # (name, priority): priority 1 is shown by kubectl get -o wide
    "DeployedModel": [("Ready", 0), ("Reason", 0), ("Alias", 0), ("Policy", 0), ("Mode", 1), ("Endpoint", 1),
                      ("Message", 1), ("Age", 0)],
    "CachePolicy": [("Ready", 0), ("Reason", 0), ("Default TTL", 0), ("Message", 0), ("Age", 0)],
    "PlanReplay": [("Phase", 0), ("Savings", 0), ("Savings %", 1), ("Low", 0), ("High", 0), ("Message", 1),
                   ("Age", 0)],
}


def readable(cell: Any) -> bool:
    """A scalar a person reads: no list or object, nor one printed as JSON."""
    if cell is None or isinstance(cell, bool | int | float):
        return True
    if not isinstance(cell, str) or cell.startswith(("[", "{")):
        return False
    try:
        return not isinstance(json.loads(cell), list | dict)
    except ValueError:
        return True


@pytest.fixture(scope="module")
async def with_status(cluster: Cluster) -> tuple[str, dict[str, dict[str, Obj]]]:
    """A namespace of objects whose statuses are what the operator writes (its own condition builders and a
    real replay result): name → status, per kind."""
    ns = await cluster.namespace("columns")
    ready = merge(None, [Condition("Ready", True, "DeploymentAvailable", "2/2 proxy replicas available"),
                         Condition("Reconciling", False, "DeploymentAvailable"),
                         Condition("Stalled", False, "DeploymentAvailable")], 1)
    missing = merge(None, stalled("CachePolicyNotFound", 'CachePolicy "premium" does not exist in this namespace'),
                    1)
    applied = merge(None, [Condition("Ready", True, "Applied", "bound to 2 model(s)"),
                           Condition("Reconciling", False, "Applied"), Condition("Stalled", False, "Applied"),
                           Condition("RedisConfigured", False, "ConfigRefused", "CONFIG SET is disabled")], 1)
    result = replay_result()
    low, high = result["intervals"]["savings"]
    succeeded = merge(None, [Condition("Ready", True, "Succeeded", f"projected savings {result['summary']['savings']}"
                                       f" USD, 0.95 interval [{low}, {high}]")], 1)
    statuses: dict[str, dict[str, Obj]] = {
        "DeployedModel": {
            "ready": {"observedGeneration": 1, "conditions": ready, "mode": "gateway", "tariffVersion": 1,
                      "endpoint": f"http://ready-proxy.{ns}.svc:80/v1", "configChecksum": "sha256:ab"},
            "stalled": {"observedGeneration": 1, "conditions": missing},
            "new": {},
        },
        "CachePolicy": {
            "standard": {"observedGeneration": 1, "conditions": applied, "boundModels": ["ready", "stalled"],
                         "tariffVersions": {"ready": 1, "stalled": 2}, "redisApplied": False,
                         "redisMessage": "CONFIG SET is disabled"},
            "new": {},
        },
        "PlanReplay": {
            "done": {"phase": "Succeeded", "observedGeneration": 1, "conditions": succeeded,
                     **result_status(result), "startedAt": now_rfc3339(), "finishedAt": now_rfc3339()},
            "new": {},
        },
    }
    for kind, objects in statuses.items():
        for name, status in objects.items():
            doc = resource(kind, ns, name)
            await submit(cluster, doc, dry_run=False)
            if status:
                await patch_status(cluster, {**doc, "status": status}, dry_run=False)
    return ns, statuses


@pytest.mark.parametrize("kind", KINDS)
async def test_the_table_shows_readable_columns(cluster: Cluster, with_status: tuple[str, dict[str, dict[str, Obj]]],
                                                kind: str) -> None:
    """The server's Table (what kubectl get prints): the columns, each cell a readable scalar, Ready with its
    reason and message."""
    ns, statuses = with_status
    table = await cluster.table(API_VERSION, PLURALS[kind], ns)
    names = [d["name"] for d in table["columnDefinitions"]]
    assert [(d["name"], d["priority"]) for d in table["columnDefinitions"]][1:] == COLUMNS[kind]
    assert all(d["description"] for d in table["columnDefinitions"])
    rows = {row["cells"][0]: dict(zip(names, row["cells"], strict=True)) for row in table["rows"]}
    assert set(rows) == set(statuses[kind])
    for name, row in rows.items():
        assert all(readable(cell) for cell in row.values()), (name, row)
        status = statuses[kind][name]
        ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), None)
        if kind != "PlanReplay":
            assert row["Ready"] == (ready or {}).get("status") and row["Reason"] == (ready or {}).get("reason")
        assert row["Message"] == (ready["message"] if ready else None)
    if kind == "DeployedModel":
        assert rows["ready"]["Ready"] == "True" and rows["ready"]["Reason"] == "DeploymentAvailable"
        assert rows["stalled"]["Ready"] == "False" and rows["stalled"]["Reason"] == "CachePolicyNotFound"
        assert (rows["ready"]["Alias"], rows["ready"]["Policy"], rows["ready"]["Mode"]) == (
            "llama-70b", "standard", "gateway")
        assert rows["ready"]["Endpoint"] == statuses[kind]["ready"]["endpoint"]
    if kind == "CachePolicy":
        assert (rows["standard"]["Reason"], rows["standard"]["Message"]) == ("Applied", "bound to 2 model(s)")
        assert rows["standard"]["Default TTL"] == "5m"
    if kind == "PlanReplay":
        done = statuses[kind]["done"]
        assert (rows["done"]["Phase"], rows["done"]["Savings"], rows["done"]["Savings %"]) == (
            "Succeeded", done["summary"]["savings"], done["summary"]["savingsPct"])
        assert [rows["done"]["Low"], rows["done"]["High"]] == done["intervals"]["savings"]
        assert rows["new"]["Phase"] is None and rows["new"]["Low"] is None


@needs_kubectl
async def test_kubectl_get_prints_them(cluster: Cluster, with_status: tuple[str, dict[str, dict[str, Obj]]],
                                       tmp_path: Path) -> None:
    """Debian's kubectl against the server: the short names, Ready and Reason by default, the message with -o
    wide, no JSON anywhere."""
    ns, _ = with_status
    plain = await asyncio.to_thread(kubectl, cluster.plane, "get", "dm,cachepol,replay", "-n", ns, cache=tmp_path)
    wide = await asyncio.to_thread(kubectl, cluster.plane, "get", "dm,cachepol,replay", "-n", ns, "-o", "wide",
                                   cache=tmp_path)
    headers = [line.split() for line in plain.splitlines() if line.startswith("NAME")]
    assert headers == [
        ["NAME", "READY", "REASON", "ALIAS", "POLICY", "AGE"],
        ["NAME", "READY", "REASON", "DEFAULT", "TTL", "MESSAGE", "AGE"],
        ["NAME", "PHASE", "SAVINGS", "LOW", "HIGH", "AGE"],
    ], plain
    wide_headers = [line.split() for line in wide.splitlines() if line.startswith("NAME")]
    assert wide_headers[0] == ["NAME", "READY", "REASON", "ALIAS", "POLICY", "MODE", "ENDPOINT", "MESSAGE", "AGE"]
    assert wide_headers[2] == ["NAME", "PHASE", "SAVINGS", "SAVINGS", "%", "LOW", "HIGH", "MESSAGE", "AGE"]
    assert "2/2 proxy replicas available" in wide and "2/2 proxy replicas available" not in plain
    assert "bound to 2 model(s)" in plain
    for text in (plain, wide):
        assert '["' not in text and "{" not in text, text


# ================================================================================================ kubectl explain


def normalized(text: str) -> str:
    return " ".join(text.split())


async def test_every_field_is_described_in_the_openapi_kubectl_explain_reads(cluster: Cluster) -> None:
    """The server's OpenAPI v3 document of the group (what kubectl explain shows) has every field of every
    schema, spec and status, with its description."""
    document = await cluster.call("GET", f"/openapi/v3/apis/{API_VERSION}")
    published = document["components"]["schemas"]
    problems = []
    for kind in KINDS:
        root = published[f"io.promptcache.{API_VERSION.split('/')[1]}.{kind}"]
        for path, node in described_paths(kind):
            if path.startswith(".metadata"):
                continue
            description = node.get("description", "").strip()
            if not description:
                problems.append(f"{kind} {path or '<root>'}: no description in crds/")
            served = published_node(root, path)
            if served is None:
                problems.append(f"{kind} {path}: not in the server's OpenAPI")
            elif path in (".apiVersion", ".kind"):  # the server publishes its own, standard descriptions
                if not served.get("description", "").strip():
                    problems.append(f"{kind} {path}: no description served")
            elif normalized(served.get("description", "")) != normalized(description):
                problems.append(f"{kind} {path}: the server describes it as {served.get('description')!r}")
    assert not problems, "\n".join(problems)


def published_node(root: Obj, path: str) -> Obj | None:
    node: Obj | None = root
    for token in re.findall(r"\[\]|\.\*|\.[^.\[]+", path):
        if node is None:
            return None
        if token == "[]":
            node = node.get("items")
        elif token == ".*":
            extra = node.get("additionalProperties")
            node = extra if isinstance(extra, dict) else None
        else:
            node = node.get("properties", {}).get(token[1:])
    return node


def explained_fields(text: str) -> set[str]:
    """The field paths ``kubectl explain --recursive`` lists (two spaces of indent per level)."""
    paths: set[str] = set()
    stack: list[str] = []
    for line in text.split("FIELDS:", 1)[1].splitlines():
        match = re.match(r"^( *)(\S+)\t<", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2 - 1
        stack[depth:] = [match.group(2)]
        paths.add("." + ".".join(stack))
    return paths


@needs_kubectl
@pytest.mark.parametrize(("kind", "leaf"), [("DeployedModel", "spec.upstream.url"),
                                            ("CachePolicy", "spec.redis.evictionPolicy"),
                                            ("PlanReplay", "status.summary.savingsPct")])
async def test_kubectl_explain_shows_the_fields_and_their_descriptions(cluster: Cluster, tmp_path: Path,
                                                                       kind: str, leaf: str) -> None:
    """One ``kubectl explain --recursive`` per kind lists exactly the schema's fields (metadata's are
    ObjectMeta's), and a field's explain prints its description."""
    plural = PLURALS[kind]
    out = await asyncio.to_thread(kubectl, cluster.plane, "explain", plural, "--recursive",
                                  f"--api-version={API_VERSION}", cache=tmp_path)
    fields = {p for p in explained_fields(out) if not p.startswith(".metadata.")}
    expected = {re.sub(r"\[\]|\.\*", "", path) for path, _ in walk(schema(kind)) if path}
    expected = {p for p in expected if not p.startswith(".metadata.")}
    assert fields == expected, (sorted(fields - expected), sorted(expected - fields))
    out = await asyncio.to_thread(kubectl, cluster.plane, "explain", f"{plural}.{leaf}",
                                  f"--api-version={API_VERSION}", cache=tmp_path)
    description = out.split("DESCRIPTION:", 1)[1].split("FIELDS:")[0]
    assert normalized(description) == normalized(at(schema(kind), ".properties." + leaf.replace(
        ".", ".properties."))["description"])
