"""The CRDs in crds/ (docs/design.md#custom-resources): structural schemas, the examples validated against them, and
every CEL rule.

No API server runs here, so the checks an API server would make are made by hand:

- the shape: apiextensions.k8s.io/v1, one served and stored v1alpha1, the status subresource, printer columns
  whose paths exist, and a structural schema (every field typed and described, only keys ``JSONSchemaProps``
  knows, none that structural schemas forbid);
- OpenAPI validation: the schema converted to JSON Schema (draft 2020-12) and run with ``jsonschema``;
- ``x-kubernetes-validations``: every rule evaluated with cel-python (``celpy``) with ``self`` bound to the value
  at the rule's node, typed as Kubernetes types it (``format: date-time`` strings are timestamps), after the
  schema's defaults are applied, as the API server does.

The CachePolicy spec is the proxy's ``cache`` section: one schema, checked against the proxy's own parser.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import celpy
import kubernetes.client
import pytest
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from promptcache.operator.constants import API_VERSION, GROUP, VERSION
from promptcache.operator.handlers.conditions import now_rfc3339
from promptcache.operator.handlers.planreplay import result_status
from promptcache.operator.replay.engine import report, simulate
from promptcache.operator.replay.proposal import Proposal
from promptcache.proxy.domain.classify import ChainBlock
from promptcache.proxy.domain.policy import AUTOMATIC_MODES, POLICY_KEYS, CachePolicy, PolicyError, policy_from_document
from promptcache.proxy.domain.tiers import TIERS
from promptcache.proxy.storage.requestlog import LoggedRequest

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"
CRD_FILES = {
    "DeployedModel": "promptcache.io_deployedmodels.yaml",
    "CachePolicy": "promptcache.io_cachepolicies.yaml",
    "PlanReplay": "promptcache.io_planreplays.yaml",
}
KINDS = list(CRD_FILES)
PRINTER_COLUMNS = {
    "DeployedModel": ["Ready", "Alias", "Policy", "Age"],
    "CachePolicy": ["Ready", "Default TTL", "Models", "Age"],
    "PlanReplay": ["Phase", "Savings", "Interval", "Age"],
}
STATUS_FIELDS = {
    "DeployedModel": {"endpoint", "tariffVersion", "configChecksum", "mode"},
    "CachePolicy": {"boundModels", "tariffVersions", "redisApplied", "redisMessage"},
    "PlanReplay": {"phase", "summary", "intervals", "digest", "caveats", "reportConfigMap", "startedAt",
                   "finishedAt"},
}
SHORT_NAMES = {"DeployedModel": ["dm"], "CachePolicy": ["cachepol"], "PlanReplay": ["replay"]}
# kubectl resolves a short name to one resource only, so ours must not be one Kubernetes or a well-known project
# already uses: Kubernetes' own, and Kyverno's (<initials>pol for each of its policy kinds, cpol its ClusterPolicy).
TAKEN_SHORT_NAMES = {
    "cm", "cs", "crd", "crds", "csr", "deploy", "ds", "ep", "ev", "hpa", "ing", "limits", "netpol", "no", "ns", "pc",
    "pdb", "po", "pv", "pvc", "quota", "rc", "rs", "sa", "sc", "sts", "svc",  # Kubernetes
    "ccleanpol", "cephr", "cleanpol", "cpol", "cpolr", "dpol", "ephr", "gctxentry", "gpol", "ivpol", "mpol", "ndpol",
    "ngpol", "nivpol", "nmpol", "nvpol", "pol", "polex", "polr", "ur", "vpol",  # Kyverno
    "cp", "policy", "policies",  # generic enough to clash with something
}

Obj = dict[str, Any]


# ------------------------------------------------------------------------------------------------ loading


@functools.cache
def _crd(kind: str) -> Obj:
    docs = [d for d in yaml.safe_load_all((CRDS / CRD_FILES[kind]).read_text()) if d is not None]
    assert len(docs) == 1, f"{CRD_FILES[kind]} must hold exactly one document"
    doc: Obj = docs[0]
    return doc


def crd(kind: str) -> Obj:
    return copy.deepcopy(_crd(kind))


def schema(kind: str) -> Obj:
    """The openAPIV3Schema of the kind's v1alpha1 version."""
    node: Obj = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return node


def resources(path: Path) -> list[Obj]:
    """The promptcache.io resources in a YAML file (any number of documents)."""
    if path.suffix not in (".yaml", ".yml"):
        return []
    docs = yaml.safe_load_all(path.read_text())
    return [d for d in docs if isinstance(d, dict) and str(d.get("apiVersion", "")).startswith(f"{GROUP}/")]


EXAMPLE_DOCS: list[tuple[str, Obj]] = [
    (f"{path.relative_to(EXAMPLES)}#{i}", doc) for path in sorted(EXAMPLES.rglob("*")) if path.is_file()
    for i, doc in enumerate(resources(path))
]


# ------------------------------------------------------------------------------------------------ schema walking


def walk(node: Obj, path: str = "") -> Iterator[tuple[str, Obj]]:
    """Every schema node under ``node`` with its path (``*``: a map value, ``[]``: a list item)."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")


def child(node: Obj, key: str) -> Obj | None:
    props = node.get("properties", {})
    if key in props:
        sub: Obj = props[key]
        return sub
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def resolve(node: Obj, path: str) -> Obj | None:
    """The schema node at a simple path such as ``.spec.upstream.url`` (list items are stepped into)."""
    for part in [p for p in path.split(".") if p]:
        if node.get("type") == "array":
            node = node["items"]
        found = child(node, part)
        if found is None:
            return None
        node = found
    return node


# Keys structural schemas forbid although JSONSchemaProps has them.
FORBIDDEN_KEYS = {"$ref", "$schema", "definitions", "dependencies", "id", "patternProperties", "additionalItems",
                  "uniqueItems"}
SCHEMA_KEYS = set(kubernetes.client.V1JSONSchemaProps.attribute_map.values()) - FORBIDDEN_KEYS
RULE_KEYS = set(kubernetes.client.V1ValidationRule.attribute_map.values())
COLUMN_KEYS = set(kubernetes.client.V1CustomResourceColumnDefinition.attribute_map.values())
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


# ------------------------------------------------------------------------------------------------ JSON Schema


def to_json_schema(node: Obj) -> Obj:
    """A Kubernetes structural schema as draft 2020-12 JSON Schema.

    ``x-kubernetes-*`` keys are dropped, except that an int-or-string node takes integer or string, a ``set``
    list must hold unique items, and an object with properties and no preserve-unknown-fields allows no other
    keys (the API server would prune them silently; ``kubectl apply`` rejects them under strict field
    validation, and in an example an unknown key is always a mistake). OpenAPI 3.0's boolean
    ``exclusiveMinimum``/``exclusiveMaximum`` become draft 2020-12's numbers.
    """
    out: Obj = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("exclusiveMinimum", "exclusiveMaximum", "nullable"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("additionalProperties", "items", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True:
            out[bound] = out.pop(limit)
    if node.get("nullable") is True and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if "properties" in node and "additionalProperties" not in node and not node.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    return out


RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
FORMATS = FormatChecker(formats=())


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not RFC3339.match(value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    datetime.fromisoformat(value.upper())  # a real date and time, e.g. no 2025-02-30
    return True


@functools.cache
def _validator(kind: str) -> Draft202012Validator:
    converted = to_json_schema(schema(kind))
    Draft202012Validator.check_schema(converted)
    return Draft202012Validator(converted, format_checker=FORMATS)


def schema_errors(doc: Obj) -> list[tuple[str, str, str]]:
    """(path, keyword, message) of every OpenAPI validation error, path like ``.spec.upstream.url``."""
    errors = _validator(doc["kind"]).iter_errors(doc)
    return sorted(("".join(f".{p}" for p in e.absolute_path), str(e.validator), e.message) for e in errors)


def apply_defaults(node: Obj, value: Any) -> Any:
    """``value`` with the schema's defaults filled in, as the API server does before validating."""
    if isinstance(value, dict):
        result = dict(value)
        for name, sub in node.get("properties", {}).items():
            if name not in result and "default" in sub:
                result[name] = copy.deepcopy(sub["default"])
        for name, item in result.items():
            sub_node = child(node, name)
            if sub_node is not None:
                result[name] = apply_defaults(sub_node, item)
        return result
    if isinstance(value, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(node["items"], item) for item in value]
    return value


# ------------------------------------------------------------------------------------------------ CEL

CEL = celpy.Environment()


@functools.cache
def cel_program(rule: str) -> celpy.Runner:
    return CEL.program(CEL.compile(rule))


def to_cel(node: Obj | None, value: Any) -> celtypes.Value:
    """``value`` typed as Kubernetes' CEL sees it at schema ``node``."""
    node = node or {}
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int) and node.get("type") != "number":
        return celtypes.IntType(value)
    if isinstance(value, int | float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.TimestampType(value) if node.get("format") == "date-time" else celtypes.StringType(value)
    if isinstance(value, list):
        items = node.get("items") if isinstance(node.get("items"), dict) else None
        return celtypes.ListType([to_cel(items, item) for item in value])
    if isinstance(value, dict):
        return celtypes.MapType({celtypes.StringType(k): to_cel(child(node, k), v) for k, v in value.items()})
    return json_to_cel(value)


@dataclass(frozen=True)
class RuleResult:
    schema_path: str  # where the rule is declared, e.g. .spec.writeMultipliers.5m
    path: str  # where it was evaluated in the object
    rule: str
    message: str
    ok: bool
    error: str | None = None


def cel_results(node: Obj, value: Any, schema_path: str = "", path: str = "") -> list[RuleResult]:
    """Every rule evaluated on ``value`` and its present descendants (absent fields run no rules)."""
    results: list[RuleResult] = []
    for validation in node.get("x-kubernetes-validations", []):
        rule, message = validation["rule"], validation.get("message", "")
        try:
            outcome = cel_program(rule).evaluate({"self": to_cel(node, value)})
        except (CELEvalError, ValueError) as exc:  # Kubernetes reports an evaluation error as a failed rule
            results.append(RuleResult(schema_path, path, rule, message, False, repr(exc)))
            continue
        if not isinstance(outcome, celtypes.BoolType):
            results.append(RuleResult(schema_path, path, rule, message, False, f"not a bool: {outcome!r}"))
        else:
            results.append(RuleResult(schema_path, path, rule, message, bool(outcome)))
    if isinstance(value, dict):
        props = node.get("properties", {})
        for key, item in value.items():
            sub = child(node, key)
            if sub is not None:
                step = key if key in props else "*"
                results += cel_results(sub, item, f"{schema_path}.{step}", f"{path}.{key}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            results += cel_results(node["items"], item, f"{schema_path}[]", f"{path}[{index}]")
    return results


def evaluate(doc: Obj) -> list[RuleResult]:
    kind_schema = schema(doc["kind"])
    return cel_results(kind_schema, apply_defaults(kind_schema, doc))


def cel_failures(doc: Obj) -> list[RuleResult]:
    return [r for r in evaluate(doc) if not r.ok]


def all_rules() -> list[tuple[str, str, str, str]]:
    """(kind, schema path, rule, message) of every x-kubernetes-validations rule in the CRDs."""
    return [
        (kind, path, v["rule"], v.get("message", ""))
        for kind in KINDS
        for path, node in walk(schema(kind))
        for v in node.get("x-kubernetes-validations", [])
    ]


# ------------------------------------------------------------------------------------------------ test objects


def meta(name: str) -> Obj:
    return {"name": name, "namespace": "llm"}


def base(kind: str) -> Obj:
    """A small valid object of each kind, independent of the examples."""
    if kind == "DeployedModel":
        spec: Obj = {
            "alias": "llama-70b",
            "upstream": {"url": "http://vllm.llm.svc:8000/v1", "model": "meta-llama/Llama-3.3-70B-Instruct",
                         "api": "openai"},
            "tokenizer": {"type": "tiktoken", "encoding": "cl100k_base"},
            "pricing": {"inputPerMTok": "0.60", "outputPerMTok": "2.40"},
            "cachePolicyRef": {"name": "standard"},
        }
    elif kind == "CachePolicy":
        spec = {"enabledTtls": ["5m", "1h"], "defaultTtl": "5m", "writeMultipliers": {"5m": "1.25", "1h": "2"},
                "readMultiplier": "0.1", "automatic": {"mode": "lastBlock", "ttl": "1h"}}
    else:
        spec = {"models": ["llama-70b"], "lastHours": 24, "cachePolicyRef": {"name": "standard"}}
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta("x"), "spec": spec}


DELETE = object()


def with_changes(kind: str, changes: Mapping[str, Any]) -> Obj:
    """The base object with ``changes`` applied: dotted path under spec → new value, or DELETE."""
    doc = base(kind)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        target = doc["spec"]
        for part in parents:
            target = target.setdefault(part, {})
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return doc


# Valid objects beyond the examples, so that every rule is seen to hold on something valid.
EXTRA_VALID: dict[str, Obj] = {
    "sidecar without url": with_changes("DeployedModel", {
        "upstream.url": DELETE, "server": {"name": "vllm", "image": "vllm/vllm-openai:latest", "args": ["--x"]}}),
    "anthropic upstream": with_changes("DeployedModel", {
        "upstream.url": "https://api.example.com", "upstream.api": "anthropic"}),
    "huggingface tokenizer": with_changes("DeployedModel", {
        "tokenizer": {"type": "huggingface", "configMapRef": {"name": "llama-tokenizer"}}}),
    "all tiers": with_changes("CachePolicy", {
        "enabledTtls": ["24h", "5m", "1h"], "defaultTtl": "24h", "readMultiplier": "99.99",
        "writeMultipliers": {"5m": "0", "1h": "2.0", "24h": "99.999"}, "automatic": {"mode": "off", "ttl": "5m"}}),
    "defaults only": with_changes("CachePolicy", {
        "enabledTtls": DELETE, "defaultTtl": DELETE, "writeMultipliers": DELETE, "readMultiplier": DELETE,
        "automatic": DELETE}),
    "inline policy, window, overrides": with_changes("PlanReplay", {
        "models": ["llama-70b", "assistant-mini"], "lastHours": DELETE, "cachePolicyRef": DELETE,
        "window": {"start": "2025-06-01T02:00:00+02:00", "end": "2025-06-01T00:00:01Z"},
        "policy": {"enabledTtls": ["5m", "1h", "24h"], "defaultTtl": "1h",
                   "writeMultipliers": {"5m": "1.25", "1h": "2.0", "24h": "2.5"}, "readMultiplier": "0.1",
                   "automatic": {"mode": "lastUserMessage"}},
        "tierOverride": {"5m": "1h", "1h": "24h"},
        "pricingOverrides": {"assistant-mini": {"inputPerMTok": "0.3", "outputPerMTok": "1.5"}},
        "bootstrap": {"iterations": 100, "confidence": 0.999, "seed": 0, "unit": "request"}}),
}


def valid_objects() -> list[tuple[str, Obj]]:
    return [*EXAMPLE_DOCS, *((f"base {k}", base(k)) for k in KINDS), *EXTRA_VALID.items()]


# ================================================================================================ the CRDs


@pytest.mark.parametrize("kind", KINDS)
def test_crd_shape(kind: str) -> None:
    doc = crd(kind)
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["kind"] == "CustomResourceDefinition"
    names = doc["spec"]["names"]
    assert names["kind"] == kind and names["listKind"] == f"{kind}List" and names["singular"] == kind.lower()
    assert names["shortNames"] == SHORT_NAMES[kind] and not set(names["shortNames"]) & TAKEN_SHORT_NAMES
    assert names["categories"] == ["promptcache"]
    assert doc["metadata"]["name"] == f"{names['plural']}.{GROUP}"
    assert CRD_FILES[kind] == f"{GROUP}_{names['plural']}.yaml"
    assert doc["spec"]["group"] == GROUP
    assert doc["spec"]["scope"] == "Namespaced"
    (version,) = doc["spec"]["versions"]
    assert version["name"] == VERSION and version["served"] is True and version["storage"] is True
    assert version["subresources"] == {"status": {}}
    # Only fields the apiextensions/v1 types have (the API server would drop or reject others).
    assert set(doc["spec"]) <= set(kubernetes.client.V1CustomResourceDefinitionSpec.attribute_map.values())
    assert set(names) <= set(kubernetes.client.V1CustomResourceDefinitionNames.attribute_map.values())
    assert set(version) <= set(kubernetes.client.V1CustomResourceDefinitionVersion.attribute_map.values())
    root = version["schema"]["openAPIV3Schema"]
    assert root["type"] == "object" and root["required"] == ["spec"]
    assert set(root["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert root["properties"]["metadata"] == {"type": "object", "description": "Standard object metadata."}


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns(kind: str) -> None:
    columns = crd(kind)["spec"]["versions"][0]["additionalPrinterColumns"]
    shown = [c["name"] for c in columns if not c.get("priority")]
    assert shown == PRINTER_COLUMNS[kind]
    root = schema(kind)
    for column in columns:
        assert set(column) <= COLUMN_KEYS, column
        assert column["type"] in {"string", "integer", "number", "boolean", "date"}
        assert column["description"]
        path = re.sub(r"\[\?\(.*?\)\]", "", column["jsonPath"])
        if path == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        assert resolve(root, path) is not None, f"{column['name']}: {column['jsonPath']} is not in the schema"
    if kind != "PlanReplay":
        ready = next(c for c in columns if c["name"] == "Ready")
        assert ready["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural_and_described(kind: str) -> None:
    """What `kubectl explain` shows and what the API server requires of a structural schema."""
    problems = []
    for path, node in walk(schema(kind)):
        where = path or "<root>"
        if not str(node.get("description", "")).strip():
            problems.append(f"{where}: no description")
        if node.get("x-kubernetes-int-or-string"):
            if node.get("anyOf", [{"type": "integer"}, {"type": "string"}]) != [{"type": "integer"},
                                                                                {"type": "string"}]:
                problems.append(f"{where}: int-or-string needs anyOf [integer, string] or nothing")
            if "type" in node:
                problems.append(f"{where}: int-or-string must not have a type")
        elif node.get("type") not in TYPES:
            problems.append(f"{where}: no type")
        elif "anyOf" in node or "oneOf" in node or "allOf" in node:
            problems.append(f"{where}: logical junctors only for int-or-string here")
        if set(node) - SCHEMA_KEYS:
            problems.append(f"{where}: keys a structural schema does not allow: {sorted(set(node) - SCHEMA_KEYS)}")
        if node.get("type") == "array" and not isinstance(node.get("items"), dict):
            problems.append(f"{where}: an array needs items")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: properties and additionalProperties are mutually exclusive")
        if node.get("x-kubernetes-preserve-unknown-fields") and node.get("type") != "object":
            problems.append(f"{where}: preserve-unknown-fields only on objects here")
        for required in node.get("required", []):
            if required not in node.get("properties", {}):
                problems.append(f"{where}: required {required!r} is not a property")
        if "enum" in node and node.get("type") == "string" and not all(isinstance(e, str) for e in node["enum"]):
            problems.append(f"{where}: enum values must be strings (quote YAML's off/true/…)")
        if "pattern" in node:
            re.compile(node["pattern"])
        if "default" in node:
            errors = list(Draft202012Validator(to_json_schema(node)).iter_errors(node["default"]))
            if errors:
                problems.append(f"{where}: default {node['default']!r} is invalid: {errors[0].message}")
        list_type = node.get("x-kubernetes-list-type")
        if list_type == "set" and node["items"].get("type") not in {"string", "integer", "number", "boolean"}:
            problems.append(f"{where}: a set needs scalar items")
        if list_type == "map":
            items = node["items"]
            for key in node.get("x-kubernetes-list-map-keys", []):
                if key not in items.get("required", []):
                    problems.append(f"{where}: list-map key {key!r} must be required")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", KINDS)
def test_status_schema(kind: str) -> None:
    status = schema(kind)["properties"]["status"]
    assert set(status["properties"]) == {"observedGeneration", "conditions"} | STATUS_FIELDS[kind]
    assert status["properties"]["observedGeneration"]["type"] == "integer"
    conditions = status["properties"]["conditions"]
    assert conditions["type"] == "array"
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["properties"]) == {"type", "status", "reason", "message", "lastTransitionTime",
                                       "observedGeneration"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert {"type", "status"} <= set(item["required"])
    if kind == "DeployedModel":
        assert status["properties"]["mode"]["enum"] == ["gateway", "sidecar"]
    if kind == "CachePolicy":
        assert status["properties"]["tariffVersions"]["additionalProperties"]["type"] == "integer"
    if kind == "PlanReplay":
        assert status["properties"]["phase"]["enum"] == ["Pending", "Running", "Succeeded", "Failed"]
        summary = status["properties"]["summary"]["properties"]
        for key in ("baselineCost", "projectedCost", "listCost", "savings", "savingsPct", "readTokenRatio", "hitRate"):
            assert summary[key]["type"] == "string", key
        assert summary["requests"]["type"] == "integer"
        assert list(summary["creationCost"]["properties"]) == list(TIERS)
        intervals = status["properties"]["intervals"]["properties"]
        assert set(intervals) == {"projectedCost", "savings", "savingsPct", "hitRate", "readTokenRatio"}
        for interval in intervals.values():
            assert (interval["type"], interval["minItems"], interval["maxItems"]) == ("array", 2, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_status_fields_are_camel_case(kind: str) -> None:
    """Every status field, nested ones too, in lowerCamelCase as in any Kubernetes API (tiers are keys, not words)."""
    fields = [path for path, _ in walk(schema(kind)["properties"]["status"]) if path]
    names = {part for path in fields for part in re.split(r"[.\[\]*]+", path) if part}
    assert sorted(n for n in names if n not in TIERS and not re.fullmatch(r"[a-z][a-zA-Z0-9]*", n)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_status_with_conditions_validates(kind: str) -> None:
    doc = base(kind)
    condition = {"type": "Ready", "status": "True", "reason": "Available", "message": "ok",
                 "lastTransitionTime": "2025-06-01T00:00:00Z", "observedGeneration": 1}
    doc["status"] = {"observedGeneration": 1, "conditions": [condition, {**condition, "type": "Stalled",
                                                                         "status": "False", "reason": ""}]}
    if kind == "PlanReplay":
        doc["status"] |= {"phase": "Succeeded", "summary": {"requests": 10, "savings": "-1.5E-7", "hitRate": "0.3"},
                          "intervals": {"savings": ["-0.2", "0.4"]}, "startedAt": "2025-06-01T00:00:00.123456+00:00"}
    assert schema_errors(doc) == []
    doc["status"]["conditions"][0]["status"] = "Yes"
    assert [e[:2] for e in schema_errors(doc)] == [(".status.conditions.0.status", "enum")]


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


def test_the_status_a_replay_writes_is_what_the_schema_declares() -> None:
    """The operator's status fields from a real result (camelCase, converted in one place) validate with no key
    the schema does not declare: an API server would prune such a key silently, and a column or health check
    reading it would show nothing."""
    result = replay_result()
    fields = result_status(result)
    assert fields["summary"]["savingsPct"] == result["summary"]["savings_pct"]
    assert fields["intervals"]["hitRate"] == result["intervals"]["hit_rate"]
    assert fields["summary"]["creationCost"] == result["summary"]["creation_cost"]
    assert (fields["digest"], fields["caveats"]) == (result["digest"], result["caveats"])
    doc = base("PlanReplay")
    doc["status"] = {"phase": "Succeeded", "observedGeneration": 1, "conditions": [], **fields,
                     "reportConfigMap": "x-report", "startedAt": now_rfc3339(), "finishedAt": now_rfc3339()}
    assert schema_errors(doc) == []
    columns = crd("PlanReplay")["spec"]["versions"][0]["additionalPrinterColumns"]
    for column in columns:
        if column["jsonPath"].startswith(".status."):
            value: Any = doc
            for part in column["jsonPath"].split(".")[1:]:
                value = value[part]
            assert value is not None, column["name"]


DECIMAL_FIELDS = {
    "DeployedModel": [".spec.pricing.inputPerMTok", ".spec.pricing.outputPerMTok"],
    "CachePolicy": [".spec.readMultiplier", ".spec.writeMultipliers.5m", ".spec.writeMultipliers.1h",
                    ".spec.writeMultipliers.24h"],
    "PlanReplay": [".spec.pricingOverrides.*.inputPerMTok", ".spec.pricingOverrides.*.outputPerMTok",
                   ".spec.policy.readMultiplier", ".spec.policy.writeMultipliers.5m"],
}


@pytest.mark.parametrize(("kind", "path"), [(k, p) for k, paths in DECIMAL_FIELDS.items() for p in paths])
def test_decimals_are_strings_with_a_decimal_pattern(kind: str, path: str) -> None:
    node = dict(walk(schema(kind)))[path]
    assert node["type"] == "string"
    pattern = re.compile(node["pattern"])
    for good in ("0", "0.60", "1.25", "12", "99.999"):
        assert pattern.search(good), good
    for bad in ("", "-1", "1e3", ".5", "1.", "one", "1,5", " 1"):
        assert not pattern.search(bad), bad


def test_planreplay_inline_policy_is_the_cachepolicy_spec() -> None:
    """One schema: PlanReplay.spec.policy is CachePolicy.spec, rules included (only the description differs)."""
    policy = schema("PlanReplay")["properties"]["spec"]["properties"]["policy"]
    spec = schema("CachePolicy")["properties"]["spec"]
    assert policy["x-kubernetes-validations"]
    assert {k: v for k, v in policy.items() if k != "description"} == {
        k: v for k, v in spec.items() if k != "description"}


# ================================================================================================ CEL rules


@pytest.mark.parametrize(("kind", "path", "rule", "message"), all_rules())
def test_rule_compiles_and_has_a_message(kind: str, path: str, rule: str, message: str) -> None:
    cel_program(rule)
    assert message.strip(), f"{kind} {path}: {rule} has no message"
    node = dict(walk(schema(kind)))[path]
    for validation in node["x-kubernetes-validations"]:
        assert set(validation) <= RULE_KEYS
        if "fieldPath" in validation:
            assert resolve(node, validation["fieldPath"]) is not None, validation["fieldPath"]


def test_rules_are_evaluated_with_kubernetes_types() -> None:
    """date-time fields are timestamps: offsets compare by instant, not as strings."""
    ok = with_changes("PlanReplay", {"lastHours": DELETE, "window": {"start": "2025-06-01T02:00:00+02:00",
                                                                      "end": "2025-06-01T00:00:01Z"}})
    assert cel_failures(ok) == []
    same = with_changes("PlanReplay", {"lastHours": DELETE, "window": {"start": "2025-06-01T02:00:00+02:00",
                                                                        "end": "2025-06-01T00:00:00Z"}})
    assert [r.message for r in cel_failures(same)] == ["window.start must be before window.end"]


# (id, kind, changes under spec, path of the failing rule's node, message of the rule). Each object passes
# OpenAPI validation, so the CEL rule is what stands between it and the cluster.
CEL_CASES: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("gateway without url", "DeployedModel", {"upstream.url": DELETE}, "",
     "upstream.url is required unless server is set"),
    ("anthropic url with /v1", "DeployedModel",
     {"upstream.api": "anthropic", "upstream.url": "https://api.example.com/v1"}, ".upstream",
     "an anthropic upstream.url must not end in /v1"),
    ("anthropic url with /v1/", "DeployedModel",
     {"upstream.api": "anthropic", "upstream.url": "http://claude-like:8080/v1/"}, ".upstream",
     "an anthropic upstream.url must not end in /v1"),
    ("tiktoken without encoding", "DeployedModel", {"tokenizer.encoding": DELETE}, ".tokenizer",
     "a tiktoken tokenizer needs encoding"),
    ("huggingface without configMapRef", "DeployedModel",
     {"tokenizer": {"type": "huggingface"}}, ".tokenizer", "a huggingface tokenizer needs configMapRef"),
    ("huggingface with encoding", "DeployedModel",
     {"tokenizer": {"type": "huggingface", "encoding": "cl100k_base", "configMapRef": {"name": "tok"}}},
     ".tokenizer", "encoding is for tiktoken only"),
    ("defaultTtl not enabled", "CachePolicy", {"defaultTtl": "24h"}, "", "defaultTtl must be one of enabledTtls"),
    ("automatic.ttl not enabled", "CachePolicy", {"automatic": {"mode": "lastUserMessage", "ttl": "24h"}}, "",
     "automatic.ttl must be one of enabledTtls"),
    ("write multiplier 100", "CachePolicy", {"writeMultipliers.5m": "100"}, ".writeMultipliers.5m",
     "a multiplier must be less than 100"),
    ("write multiplier 1h 150.5", "CachePolicy", {"writeMultipliers.1h": "150.5"}, ".writeMultipliers.1h",
     "a multiplier must be less than 100"),
    ("write multiplier 24h 100.0", "CachePolicy", {"writeMultipliers.24h": "100.0"}, ".writeMultipliers.24h",
     "a multiplier must be less than 100"),
    ("read multiplier 100", "CachePolicy", {"readMultiplier": "100"}, ".readMultiplier",
     "a multiplier must be less than 100"),
    ("window and lastHours", "PlanReplay",
     {"window": {"start": "2025-06-01T00:00:00Z", "end": "2025-06-02T00:00:00Z"}}, "",
     "set exactly one of window and lastHours"),
    ("neither window nor lastHours", "PlanReplay", {"lastHours": DELETE}, "",
     "set exactly one of window and lastHours"),
    ("window backwards", "PlanReplay",
     {"lastHours": DELETE, "window": {"start": "2025-06-02T00:00:00Z", "end": "2025-06-01T00:00:00Z"}},
     ".window", "window.start must be before window.end"),
    ("policy and cachePolicyRef", "PlanReplay", {"policy": {}}, "", "set exactly one of policy and cachePolicyRef"),
    ("neither policy nor cachePolicyRef", "PlanReplay", {"cachePolicyRef": DELETE}, "",
     "set exactly one of policy and cachePolicyRef"),
    ("tierOverride key not a tier", "PlanReplay", {"tierOverride": {"10m": "1h"}}, ".tierOverride",
     "tierOverride keys must be tiers"),
    ("pricingOverrides for another model", "PlanReplay",
     {"pricingOverrides": {"other": {"inputPerMTok": "1", "outputPerMTok": "2"}}}, "",
     "pricingOverrides may only name models listed in models"),
    ("inline policy defaultTtl not enabled", "PlanReplay",
     {"cachePolicyRef": DELETE, "policy": {"enabledTtls": ["1h"], "defaultTtl": "5m"}}, ".policy",
     "defaultTtl must be one of enabledTtls"),
    ("inline policy automatic.ttl not enabled", "PlanReplay",
     {"cachePolicyRef": DELETE, "policy": {"enabledTtls": ["1h"], "automatic": {"mode": "lastBlock", "ttl": "5m"}}},
     ".policy", "automatic.ttl must be one of enabledTtls"),
    ("inline policy write multiplier 24h 100", "PlanReplay",
     {"cachePolicyRef": DELETE, "policy": {"writeMultipliers": {"24h": "100"}}}, ".policy.writeMultipliers.24h",
     "a multiplier must be less than 100"),
    ("inline policy write multiplier 5m 100", "PlanReplay",
     {"cachePolicyRef": DELETE, "policy": {"writeMultipliers": {"5m": "100"}}}, ".policy.writeMultipliers.5m",
     "a multiplier must be less than 100"),
    ("inline policy write multiplier 1h 100", "PlanReplay",
     {"cachePolicyRef": DELETE, "policy": {"writeMultipliers": {"1h": "100"}}}, ".policy.writeMultipliers.1h",
     "a multiplier must be less than 100"),
    ("inline policy read multiplier 100", "PlanReplay",
     {"cachePolicyRef": DELETE, "policy": {"readMultiplier": "100"}}, ".policy.readMultiplier",
     "a multiplier must be less than 100"),
]


@pytest.mark.parametrize(("changes", "kind", "at", "message"), [pytest.param(c, k, a, m, id=i)
                                                                 for i, k, c, a, m in CEL_CASES])
def test_cel_rule_rejects(changes: dict[str, Any], kind: str, at: str, message: str) -> None:
    doc = with_changes(kind, changes)
    assert schema_errors(doc) == [], "the OpenAPI schema already rejects this; the case does not test the rule"
    failures = cel_failures(doc)
    assert [(r.path, r.error) for r in failures] == [(f".spec{at}", None)], failures
    assert failures[0].message.startswith(message)


@pytest.mark.parametrize(("kind", "path", "rule", "message"), all_rules())
def test_every_rule_holds_on_valid_objects_and_fails_on_a_crafted_one(
    kind: str, path: str, rule: str, message: str
) -> None:
    held = [name for name, doc in valid_objects()
            if any(r.schema_path == path and r.rule == rule and r.ok for r in evaluate(doc))]
    assert held, f"{kind} {path}: {rule} is never evaluated on a valid object"
    caught = [case for case, k, changes, _, _ in CEL_CASES if k == kind
              and any(r.schema_path == path and r.rule == rule for r in cel_failures(with_changes(k, changes)))]
    assert caught, f"{kind} {path}: no invalid case fails {rule}"


# ================================================================================================ examples


def kustomize(directory: Path) -> list[Obj]:
    """The objects `kubectl apply -k directory` applies, built as kustomize builds these examples: each resource in
    order (a file, or a directory with its own kustomization), then the kustomization's namespace set on every
    namespaced object. Only the fields the examples use are known; any other fails here."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources"}, kustomization
    objects: list[Obj] = []
    for entry in kustomization["resources"]:
        path = directory / entry
        objects += kustomize(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for obj in objects:
        if "namespace" in kustomization and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


EXAMPLE_SETS = {path.parent.name: path.parent for path in sorted(EXAMPLES.rglob("kustomization.yaml"))}


def test_the_example_sets() -> None:
    """A minimal first set and the full one, each applied with `kubectl apply -k`."""
    assert sorted(EXAMPLE_SETS) == ["full", "quickstart"]
    assert {doc["kind"] for doc in kustomize(EXAMPLE_SETS["full"])} == {"Namespace", *KINDS}
    files = {str(path.relative_to(EXAMPLES)) for path in EXAMPLES.rglob("*.yaml")
             if resources(path) and path.parent != EXAMPLES / "argocd"}
    listed = {str((directory / entry).relative_to(EXAMPLES)) for directory in EXAMPLE_SETS.values()
              for entry in yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
              if not (directory / entry).is_dir()}
    assert files <= listed, "an example resource no kustomization applies"


@pytest.mark.parametrize("name", list(EXAMPLE_SETS))
def test_an_example_set_lists_every_file_beside_it(name: str) -> None:
    directory = EXAMPLE_SETS[name]
    entries = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
    assert sorted(e for e in entries if not (directory / e).is_dir()) == sorted(
        p.name for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_quickstart_is_minimal_and_needs_nothing_else() -> None:
    """A Namespace, a CachePolicy and one gateway-mode DeployedModel: what a fresh cluster with the CRDs takes as it
    is. Whatever the model references (its policy, a Secret, a tokenizer ConfigMap) is in the set or not needed."""
    objects = kustomize(EXAMPLE_SETS["quickstart"])
    assert [o["kind"] for o in objects] == ["Namespace", "CachePolicy", "DeployedModel"]
    namespace, policy, model = objects
    assert {policy["metadata"]["namespace"], model["metadata"]["namespace"]} == {namespace["metadata"]["name"]}
    assert "server" not in model["spec"] and model["spec"]["upstream"]["url"]  # gateway mode
    assert model["spec"]["cachePolicyRef"]["name"] == policy["metadata"]["name"]
    assert "apiKeySecretRef" not in model["spec"]["upstream"]  # no Secret to create (the DSN aside, see its README)
    assert model["spec"]["tokenizer"]["type"] == "tiktoken"  # bundled: no ConfigMap to create


@pytest.mark.parametrize("name", list(EXAMPLE_SETS))
def test_an_example_set_applies_as_a_whole(name: str) -> None:
    """Every object is in the set's one namespace, which the set creates itself; each model's and replay's policy
    and models are in the set."""
    objects = kustomize(EXAMPLE_SETS[name])
    namespaces = [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"]
    assert len(namespaces) == 1 and objects[0]["kind"] == "Namespace"
    ours = [o for o in objects if o["kind"] in KINDS]
    assert {o["metadata"]["namespace"] for o in ours} == set(namespaces)
    policies = [o["metadata"]["name"] for o in ours if o["kind"] == "CachePolicy"]
    aliases = [o["spec"]["alias"] for o in ours if o["kind"] == "DeployedModel"]
    assert len(set(policies)) == len(policies) and len(set(aliases)) == len(aliases)
    assert len({(o["kind"], o["metadata"]["name"]) for o in objects}) == len(objects)
    for doc in ours:
        if "cachePolicyRef" in doc["spec"]:
            assert doc["spec"]["cachePolicyRef"]["name"] in policies, doc["metadata"]["name"]
        assert set(doc["spec"].get("models", [])) <= set(aliases), doc["metadata"]["name"]
    if name == "full":
        assert {d["spec"].get("server") is not None for d in ours if d["kind"] == "DeployedModel"} == {True, False}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
@pytest.mark.parametrize("name", list(EXAMPLE_SETS))
def test_kubectl_kustomize_builds_the_same_set(name: str) -> None:
    built = subprocess.run(["kubectl", "kustomize", str(EXAMPLE_SETS[name])], capture_output=True, text=True,
                           check=True, timeout=60).stdout

    def key(o: Obj) -> tuple[str, str, str]:
        return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]

    assert sorted(yaml.safe_load_all(built), key=key) == sorted(kustomize(EXAMPLE_SETS[name]), key=key)


@pytest.mark.parametrize(("name", "doc"), EXAMPLE_DOCS, ids=[name for name, _ in EXAMPLE_DOCS])
def test_example_validates_against_its_crd(name: str, doc: Obj) -> None:
    assert doc["apiVersion"] == API_VERSION and doc["kind"] in KINDS
    assert doc["metadata"].get("name") and doc["metadata"].get("namespace")
    assert schema_errors(doc) == []
    assert schema_errors(apply_defaults(schema(doc["kind"]), doc)) == []
    assert cel_failures(doc) == []


@pytest.mark.parametrize(("name", "doc"), valid_objects(), ids=[name for name, _ in valid_objects()])
def test_valid_objects_pass(name: str, doc: Obj) -> None:
    assert schema_errors(doc) == []
    assert cel_failures(doc) == []


def test_defaults_are_applied_as_the_api_server_would() -> None:
    model = apply_defaults(schema("DeployedModel"), base("DeployedModel"))["spec"]
    assert model["imageTokens"] == 0
    assert model["proxy"] == {"replicas": 2}
    assert model["upstream"]["forwardCacheControl"] is False
    hf = apply_defaults(schema("DeployedModel"), EXTRA_VALID["huggingface tokenizer"])["spec"]
    assert hf["tokenizer"]["configMapRef"] == {"name": "llama-tokenizer", "key": "tokenizer.json"}
    replay = apply_defaults(schema("PlanReplay"), base("PlanReplay"))["spec"]
    assert replay["bootstrap"] == {"iterations": 2000, "confidence": 0.95, "seed": 0, "unit": "principal"}
    policy = apply_defaults(schema("CachePolicy"), base("CachePolicy"))["spec"]
    assert policy == base("CachePolicy")["spec"], "CachePolicy has no schema defaults: the proxy's parser owns them"


# ================================================================================================ invalid objects

# (id, kind, changes under spec, path of the error, keyword that must report it).
SCHEMA_CASES: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("alias with a space", "DeployedModel", {"alias": "llama 70b"}, ".spec.alias", "pattern"),
    ("alias starting with a dot", "DeployedModel", {"alias": ".llama"}, ".spec.alias", "pattern"),
    ("alias empty", "DeployedModel", {"alias": ""}, ".spec.alias", "pattern"),
    ("no alias", "DeployedModel", {"alias": DELETE}, ".spec", "required"),
    ("url not http", "DeployedModel", {"upstream.url": "ftp://models/v1"}, ".spec.upstream.url", "pattern"),
    ("url without host", "DeployedModel", {"upstream.url": "http:///v1"}, ".spec.upstream.url", "pattern"),
    ("api unknown", "DeployedModel", {"upstream.api": "cohere"}, ".spec.upstream.api", "enum"),
    ("no upstream model", "DeployedModel", {"upstream.model": DELETE}, ".spec.upstream", "required"),
    ("secret ref without key", "DeployedModel", {"upstream.apiKeySecretRef": {"name": "s"}},
     ".spec.upstream.apiKeySecretRef", "required"),
    ("secret name not a DNS name", "DeployedModel", {"upstream.apiKeySecretRef": {"name": "Key_s", "key": "k"}},
     ".spec.upstream.apiKeySecretRef.name", "pattern"),
    ("secret key with a space", "DeployedModel", {"upstream.apiKeySecretRef": {"name": "s", "key": "api key"}},
     ".spec.upstream.apiKeySecretRef.key", "pattern"),
    ("forwardCacheControl a string", "DeployedModel", {"upstream.forwardCacheControl": "yes"},
     ".spec.upstream.forwardCacheControl", "type"),
    ("unknown upstream key", "DeployedModel", {"upstream.apiKeyEnv": "KEY"}, ".spec.upstream",
     "additionalProperties"),
    ("tokenizer type unknown", "DeployedModel", {"tokenizer.type": "sentencepiece"}, ".spec.tokenizer.type", "enum"),
    ("tiktoken encoding unknown", "DeployedModel", {"tokenizer.encoding": "gpt2"}, ".spec.tokenizer.encoding",
     "enum"),
    ("no tokenizer", "DeployedModel", {"tokenizer": DELETE}, ".spec", "required"),
    ("tokenizer without type", "DeployedModel", {"tokenizer": {"encoding": "cl100k_base"}}, ".spec.tokenizer",
     "required"),
    ("configMapRef without name", "DeployedModel",
     {"tokenizer": {"type": "huggingface", "configMapRef": {"key": "tokenizer.json"}}},
     ".spec.tokenizer.configMapRef", "required"),
    ("configMap name not a DNS name", "DeployedModel",
     {"tokenizer": {"type": "huggingface", "configMapRef": {"name": "Tok"}}}, ".spec.tokenizer.configMapRef.name",
     "pattern"),
    ("configMap key with a slash", "DeployedModel",
     {"tokenizer": {"type": "huggingface", "configMapRef": {"name": "tok", "key": "a/tokenizer.json"}}},
     ".spec.tokenizer.configMapRef.key", "pattern"),
    ("price negative", "DeployedModel", {"pricing.inputPerMTok": "-0.1"}, ".spec.pricing.inputPerMTok", "pattern"),
    ("price in exponent form", "DeployedModel", {"pricing.inputPerMTok": "6e-1"}, ".spec.pricing.inputPerMTok",
     "pattern"),
    ("price a YAML float", "DeployedModel", {"pricing.outputPerMTok": 2.4}, ".spec.pricing.outputPerMTok", "type"),
    ("price with a comma", "DeployedModel", {"pricing.outputPerMTok": "2,40"}, ".spec.pricing.outputPerMTok",
     "pattern"),
    ("no output price", "DeployedModel", {"pricing.outputPerMTok": DELETE}, ".spec.pricing", "required"),
    ("no cachePolicyRef", "DeployedModel", {"cachePolicyRef": DELETE}, ".spec", "required"),
    ("cachePolicyRef without name", "DeployedModel", {"cachePolicyRef": {}}, ".spec.cachePolicyRef", "required"),
    ("policy name not a DNS name", "DeployedModel", {"cachePolicyRef.name": "Standard"},
     ".spec.cachePolicyRef.name", "pattern"),
    ("imageTokens negative", "DeployedModel", {"imageTokens": -1}, ".spec.imageTokens", "minimum"),
    ("replicas over 100", "DeployedModel", {"proxy": {"replicas": 101}}, ".spec.proxy.replicas", "maximum"),
    ("replicas negative", "DeployedModel", {"proxy": {"replicas": -1}}, ".spec.proxy.replicas", "minimum"),
    ("cpu not a quantity", "DeployedModel", {"proxy": {"resources": {"requests": {"cpu": "lots"}}}},
     ".spec.proxy.resources.requests.cpu", "pattern"),
    ("memory limit not a quantity", "DeployedModel", {"proxy": {"resources": {"limits": {"memory": "1 GB"}}}},
     ".spec.proxy.resources.limits.memory", "pattern"),
    ("memory a boolean", "DeployedModel", {"proxy": {"resources": {"limits": {"memory": True}}}},
     ".spec.proxy.resources.limits.memory", "anyOf"),
    ("server without image", "DeployedModel", {"server": {"name": "vllm"}}, ".spec.server", "required"),
    ("server name not a DNS label", "DeployedModel", {"server": {"name": "vLLM", "image": "vllm/vllm-openai"}},
     ".spec.server.name", "pattern"),
    ("enabledTtls empty", "CachePolicy", {"enabledTtls": [], "defaultTtl": DELETE, "automatic": DELETE},
     ".spec.enabledTtls", "minItems"),
    ("enabledTtls unknown tier", "CachePolicy", {"enabledTtls": ["5m", "1h", "10m"]}, ".spec.enabledTtls.2",
     "enum"),
    ("enabledTtls duplicate", "CachePolicy", {"enabledTtls": ["5m", "1h", "5m"]}, ".spec.enabledTtls",
     "uniqueItems"),
    ("defaultTtl unknown tier", "CachePolicy", {"defaultTtl": "2h"}, ".spec.defaultTtl", "enum"),
    ("write multiplier not a number", "CachePolicy", {"writeMultipliers.5m": "abc"}, ".spec.writeMultipliers.5m",
     "pattern"),
    ("write multiplier 1h not a number", "CachePolicy", {"writeMultipliers.1h": "two"},
     ".spec.writeMultipliers.1h", "pattern"),
    ("write multiplier 24h with a suffix", "CachePolicy", {"writeMultipliers.24h": "2.5x"},
     ".spec.writeMultipliers.24h", "pattern"),
    ("write multiplier a YAML float", "CachePolicy", {"writeMultipliers.5m": 1.25}, ".spec.writeMultipliers.5m",
     "type"),
    ("write multiplier for an unknown tier", "CachePolicy", {"writeMultipliers.48h": "3"}, ".spec.writeMultipliers",
     "additionalProperties"),
    ("read multiplier negative", "CachePolicy", {"readMultiplier": "-0.1"}, ".spec.readMultiplier", "pattern"),
    ("minPrefixTokens negative", "CachePolicy", {"minPrefixTokens": -1}, ".spec.minPrefixTokens", "minimum"),
    ("maxBreakpoints 0", "CachePolicy", {"maxBreakpoints": 0}, ".spec.maxBreakpoints", "minimum"),
    ("maxBreakpoints 65", "CachePolicy", {"maxBreakpoints": 65}, ".spec.maxBreakpoints", "maximum"),
    ("lookbackBlocks 0", "CachePolicy", {"lookbackBlocks": 0}, ".spec.lookbackBlocks", "minimum"),
    ("lookbackBlocks 1001", "CachePolicy", {"lookbackBlocks": 1001}, ".spec.lookbackBlocks", "maximum"),
    ("automatic mode unknown", "CachePolicy", {"automatic.mode": "always"}, ".spec.automatic.mode", "enum"),
    ("automatic ttl unknown tier", "CachePolicy", {"automatic.ttl": "2h"}, ".spec.automatic.ttl", "enum"),
    ("automatic mode a bare YAML off", "CachePolicy", {"automatic.mode": False}, ".spec.automatic.mode", "type"),
    ("ignorePrefixes with an empty prefix", "CachePolicy", {"ignorePrefixes": ["x:", ""]}, ".spec.ignorePrefixes.1",
     "minLength"),
    ("unknown policy key", "CachePolicy", {"maxTtl": "24h"}, ".spec", "additionalProperties"),
    ("redis maxMemory with a space", "CachePolicy", {"redis": {"maxMemory": "256 mb"}}, ".spec.redis.maxMemory",
     "pattern"),
    ("redis maxMemory in terabytes", "CachePolicy", {"redis": {"maxMemory": "1tb"}}, ".spec.redis.maxMemory",
     "pattern"),
    ("redis eviction policy unknown", "CachePolicy", {"redis": {"evictionPolicy": "lru"}},
     ".spec.redis.evictionPolicy", "enum"),
    ("models missing", "PlanReplay", {"models": DELETE}, ".spec", "required"),
    ("no models", "PlanReplay", {"models": []}, ".spec.models", "minItems"),
    ("model not an alias", "PlanReplay", {"models": ["llama 70b"]}, ".spec.models.0", "pattern"),
    ("duplicate models", "PlanReplay", {"models": ["a", "a"]}, ".spec.models", "uniqueItems"),
    ("lastHours 0", "PlanReplay", {"lastHours": 0}, ".spec.lastHours", "minimum"),
    ("lastHours over a year", "PlanReplay", {"lastHours": 8761}, ".spec.lastHours", "maximum"),
    ("window start not a date-time", "PlanReplay",
     {"lastHours": DELETE, "window": {"start": "yesterday", "end": "2025-06-02T00:00:00Z"}},
     ".spec.window.start", "format"),
    ("window end without a zone", "PlanReplay",
     {"lastHours": DELETE, "window": {"start": "2025-06-01T00:00:00Z", "end": "2025-06-02T00:00:00"}},
     ".spec.window.end", "format"),
    ("window without end", "PlanReplay", {"lastHours": DELETE, "window": {"start": "2025-06-01T00:00:00Z"}},
     ".spec.window", "required"),
    ("cachePolicyRef without name", "PlanReplay", {"cachePolicyRef": {}}, ".spec.cachePolicyRef", "required"),
    ("cachePolicyRef name not a DNS name", "PlanReplay", {"cachePolicyRef": {"name": "my_policy"}},
     ".spec.cachePolicyRef.name", "pattern"),
    ("pricingOverrides input price negative", "PlanReplay", {"pricingOverrides": {"llama-70b": {
        "inputPerMTok": "-1", "outputPerMTok": "2"}}}, ".spec.pricingOverrides.llama-70b.inputPerMTok", "pattern"),
    ("pricingOverrides output price a float", "PlanReplay", {"pricingOverrides": {"llama-70b": {
        "inputPerMTok": "1", "outputPerMTok": "2.x"}}}, ".spec.pricingOverrides.llama-70b.outputPerMTok", "pattern"),
    ("tierOverride to an unknown tier", "PlanReplay", {"tierOverride": {"5m": "2h"}}, ".spec.tierOverride.5m",
     "enum"),
    ("pricingOverrides without output price", "PlanReplay", {"pricingOverrides": {"llama-70b": {
        "inputPerMTok": "1"}}}, ".spec.pricingOverrides.llama-70b", "required"),
    ("iterations 99", "PlanReplay", {"bootstrap": {"iterations": 99}}, ".spec.bootstrap.iterations", "minimum"),
    ("iterations 100001", "PlanReplay", {"bootstrap": {"iterations": 100001}}, ".spec.bootstrap.iterations",
     "maximum"),
    ("confidence 0.5", "PlanReplay", {"bootstrap": {"confidence": 0.5}}, ".spec.bootstrap.confidence",
     "exclusiveMinimum"),
    ("confidence 1", "PlanReplay", {"bootstrap": {"confidence": 1}}, ".spec.bootstrap.confidence", "maximum"),
    ("seed negative", "PlanReplay", {"bootstrap": {"seed": -1}}, ".spec.bootstrap.seed", "minimum"),
    ("unit unknown", "PlanReplay", {"bootstrap": {"unit": "week"}}, ".spec.bootstrap.unit", "enum"),
    ("inline policy bound", "PlanReplay", {"cachePolicyRef": DELETE, "policy": {"maxBreakpoints": 0}},
     ".spec.policy.maxBreakpoints", "minimum"),
    ("inline policy unknown key", "PlanReplay", {"cachePolicyRef": DELETE, "policy": {"ttl": "5m"}},
     ".spec.policy", "additionalProperties"),
]


@pytest.mark.parametrize(("kind", "changes", "at", "keyword"), [pytest.param(k, c, a, w, id=i)
                                                                for i, k, c, a, w in SCHEMA_CASES])
def test_schema_rejects(kind: str, changes: dict[str, Any], at: str, keyword: str) -> None:
    errors = schema_errors(with_changes(kind, changes))
    assert errors, "accepted"
    assert {(path, validator) for path, validator, _ in errors} == {(at, keyword)} or (
        # YAML's bare off is a boolean: both the type and the enum reject it, at the same path.
        {path for path, _, _ in errors} == {at} and keyword in {v for _, v, _ in errors}
    ), errors


def schema_path_of(kind: str, path: str) -> str:
    """The schema path (``*`` for map values, ``[]`` for list items) of an object path like ``.spec.models.0``."""
    node, out = schema(kind), ""
    for part in [p for p in path.split(".") if p]:
        if node.get("type") == "array":
            node, out = node["items"], out + "[]"
        elif part in node.get("properties", {}):
            node, out = node["properties"][part], f"{out}.{part}"
        else:
            node, out = node["additionalProperties"], f"{out}.*"
    return out


CONSTRAINTS = {"enum", "pattern", "minimum", "maximum", "exclusiveMinimum", "minItems", "required"}


def test_every_spec_constraint_has_a_rejecting_case() -> None:
    """Each enum, pattern, bound and required list in the specs is seen to reject something above."""
    exercised = {(kind, schema_path_of(kind, at), keyword) for _, kind, _, at, keyword in SCHEMA_CASES}
    missing = [
        f"{kind} {path} {key}"
        for kind in KINDS
        for path, node in walk(schema(kind)["properties"]["spec"], ".spec")
        if not path.startswith(".spec.policy.")  # the CachePolicy schema, exercised as such
        for key in CONSTRAINTS & set(node)
        if key != "minimum" or "exclusiveMinimum" not in node
        if (kind, path, key) not in exercised
    ]
    assert not missing, "\n".join(missing)


# ================================================================================================ one policy schema


def cachepolicy_spec_keys() -> list[str]:
    return sorted(set(schema("CachePolicy")["properties"]["spec"]["properties"]) - {"redis"})


@pytest.mark.parametrize("key", cachepolicy_spec_keys())
def test_crd_policy_key_is_a_proxy_policy_key(key: str) -> None:
    assert key in POLICY_KEYS


def test_every_proxy_policy_key_is_in_the_crd() -> None:
    assert set(cachepolicy_spec_keys()) == set(POLICY_KEYS)
    spec = schema("CachePolicy")["properties"]["spec"]["properties"]
    assert list(spec["writeMultipliers"]["properties"]) == list(TIERS)
    assert set(spec["automatic"]["properties"]) == {"mode", "ttl"}
    assert tuple(spec["automatic"]["properties"]["mode"]["enum"]) == AUTOMATIC_MODES
    for path, node in walk(schema("CachePolicy")["properties"]["spec"]):
        if path in (".enabledTtls[]", ".defaultTtl", ".automatic.ttl"):
            assert tuple(node["enum"]) == TIERS, path


DEFAULTS = CachePolicy()


@pytest.mark.parametrize(("path", "value"), [
    (".defaultTtl", DEFAULTS.default_ttl),
    (".readMultiplier", DEFAULTS.read_multiplier),
    (".writeMultipliers.5m", DEFAULTS.write_multipliers["5m"]),
    (".writeMultipliers.1h", DEFAULTS.write_multipliers["1h"]),
    (".writeMultipliers.24h", DEFAULTS.write_multipliers["24h"]),
    (".minPrefixTokens", DEFAULTS.min_prefix_tokens),
    (".maxBreakpoints", DEFAULTS.max_breakpoints),
    (".lookbackBlocks", DEFAULTS.lookback_blocks),
    (".automatic.mode", DEFAULTS.automatic_mode),
    (".enabledTtls", ", ".join(DEFAULTS.enabled_ttls)),
])
def test_documented_default_is_the_parsers(path: str, value: object) -> None:
    """The CRD sets no schema defaults for a policy (the parser owns them), so its descriptions must tell them."""
    node = dict(walk(schema("CachePolicy")["properties"]["spec"]))[path]
    assert "default" not in node
    description = node["description"]
    assert f"Defaults to {value}" in description or f"Defaults to all of {value}." in description, description


def policy_specs() -> list[tuple[str, Obj]]:
    specs = [(name, doc["spec"]) for name, doc in EXAMPLE_DOCS if doc["kind"] == "CachePolicy"]
    specs += [(f"{name} policy", doc["spec"]["policy"]) for name, doc in EXAMPLE_DOCS
              if doc["kind"] == "PlanReplay" and "policy" in doc["spec"]]
    return specs


@pytest.mark.parametrize(("name", "spec"), policy_specs(), ids=[name for name, _ in policy_specs()])
def test_example_policy_parses_with_the_proxy_parser(name: str, spec: Obj) -> None:
    policy = CachePolicy.from_spec(spec)
    assert set(policy.enabled_ttls) == set(spec.get("enabledTtls", TIERS))
    assert policy.default_ttl == spec.get("defaultTtl", "5m")
    for tier, multiplier in spec.get("writeMultipliers", {}).items():
        assert policy.write_multipliers[tier] == Decimal(multiplier)
    assert policy.automatic_mode == spec.get("automatic", {}).get("mode", "off")


def test_policy_yaml_is_read_by_the_cli_parser() -> None:
    """examples/quickstart/cachepolicy.yaml is both a CachePolicy resource and the `promptcache hash --policy`
    input."""
    doc = yaml.safe_load((EXAMPLES / "quickstart" / "cachepolicy.yaml").read_text())
    assert policy_from_document(doc) == CachePolicy.from_spec(doc["spec"])


def crd_admits(kind: str, spec: Obj) -> bool:
    doc = {"apiVersion": API_VERSION, "kind": kind, "metadata": meta("p"), "spec": spec}
    return not schema_errors(doc) and not cel_failures(doc)


_tier = st.sampled_from(["5m", "1h", "24h", "10m"])
_multiplier = st.sampled_from(["0", "0.1", "1.25", "2.0", "99.99", "100", "100.0", "250", "-1", "abc", "1e2",
                               "99.9999999999999999999", 1.25, 2, True])
POLICIES = st.fixed_dictionaries({}, optional={
    "enabledTtls": st.lists(_tier, max_size=4),
    "defaultTtl": _tier,
    "writeMultipliers": st.dictionaries(st.sampled_from(["5m", "1h", "24h", "48h"]), _multiplier, max_size=3),
    "readMultiplier": _multiplier,
    "minPrefixTokens": st.sampled_from([-1, 0, 1024, "1024"]),
    "maxBreakpoints": st.integers(-1, 70),
    "lookbackBlocks": st.sampled_from([0, 1, 20, 1000, 1001]),
    "automatic": st.fixed_dictionaries({}, optional={
        "mode": st.sampled_from(["off", "lastBlock", "lastUserMessage", "always", False]), "ttl": _tier}),
    "ignorePrefixes": st.lists(st.sampled_from(["x-billing-nonce:", ""]), max_size=2),
    "redis": st.sampled_from([{"maxMemory": "1gb"}, {"evictionPolicy": "volatile-ttl"}]),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(POLICIES)
def test_whatever_the_crd_admits_the_proxy_can_load(spec: Obj) -> None:
    """The API server is the proxy's gate: a CachePolicy it admits never fails in the proxy's parser, and the
    same spec is admitted inline in a PlanReplay."""
    admitted = crd_admits("CachePolicy", spec)
    event(f"admitted: {admitted}")
    if admitted:
        CachePolicy.from_spec(spec)
        assert crd_admits("PlanReplay", {"models": ["m"], "lastHours": 1, "policy": spec})


def parser_rejects(spec: Obj) -> bool:
    try:
        CachePolicy.from_spec(spec)
    except PolicyError:
        return True
    return False


def test_the_crd_rejects_what_the_parser_rejects_on_the_cross_field_rules() -> None:
    rejected: list[Obj] = [
        {"enabledTtls": ["1h"], "defaultTtl": "5m"},
        {"enabledTtls": ["5m"], "automatic": {"mode": "lastBlock", "ttl": "1h"}},
        {"readMultiplier": "100"},
        {"writeMultipliers": {"24h": "100.0"}},
    ]
    for spec in rejected:
        assert parser_rejects(spec) and not crd_admits("CachePolicy", spec), spec
    accepted: list[Obj] = [
        {},
        {"enabledTtls": ["1h"]},
        {"enabledTtls": ["5m"], "automatic": {"mode": "off", "ttl": "1h"}},
        {"enabledTtls": ["1h"], "automatic": {"mode": "lastBlock"}},
    ]
    for spec in accepted:
        assert not parser_rejects(spec) and crd_admits("CachePolicy", spec), spec
