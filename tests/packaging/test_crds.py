"""The CRDs in crds/ (docs/design.md#custom-resources): what needs no API server.

The API server itself validates: tests/cluster/test_crds_served.py has the session's kube-apiserver reject a broken
object for every rule, enum, pattern and bound, accept the examples, apply the defaults, print the columns and
publish every description. Here, what needs no server:

- the CRDs' names, short names, scope, version and status schema, as the operator and users expect them;
- the CachePolicy spec is the proxy's ``cache`` section: the same keys and enums as the proxy's own parser
  (``promptcache.proxy.domain.policy``), its defaults told in the descriptions as the parser has them, and the
  examples' policies load with that parser;
- the example sets: what each kustomization applies, and that their references resolve within the set.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import V1Volume

from promptcache.operator.constants import API_VERSION, GROUP, VERSION, VOLUME_SOURCES
from promptcache.proxy.domain.policy import AUTOMATIC_MODES, POLICY_KEYS, CachePolicy, policy_from_document
from promptcache.proxy.domain.tiers import TIERS

from support.crds import KINDS, PLURALS, crd, schema, walk

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"
STATUS_FIELDS = {
    "DeployedModel": {"endpoint", "endpoints", "tariffVersion", "configChecksum", "mode", "replicas"},
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


# ================================================================================================ the CRDs


@pytest.mark.parametrize("kind", KINDS)
def test_crd_shape(kind: str) -> None:
    doc = crd(kind)
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["kind"] == "CustomResourceDefinition"
    names = doc["spec"]["names"]
    assert names["kind"] == kind and names["listKind"] == f"{kind}List" and names["singular"] == kind.lower()
    assert names["plural"] == PLURALS[kind]
    assert names["shortNames"] == SHORT_NAMES[kind] and not set(names["shortNames"]) & TAKEN_SHORT_NAMES
    assert names["categories"] == ["promptcache"]
    assert doc["metadata"]["name"] == f"{names['plural']}.{GROUP}"
    assert (CRDS / f"{GROUP}_{names['plural']}.yaml").exists()
    assert doc["spec"]["group"] == GROUP
    assert doc["spec"]["scope"] == "Namespaced"
    (version,) = doc["spec"]["versions"]
    assert version["name"] == VERSION and version["served"] is True and version["storage"] is True
    assert f"{GROUP}/{version['name']}" == API_VERSION
    assert version["subresources"] == {"status": {}}
    root = version["schema"]["openAPIV3Schema"]
    assert root["type"] == "object" and root["required"] == ["spec"]
    assert set(root["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    # The server takes metadata's schema from ObjectMeta and refuses anything more (a description included).
    assert root["properties"]["metadata"] == {"type": "object"}


@pytest.mark.parametrize("kind", KINDS)
def test_every_rule_has_a_message(kind: str) -> None:
    """The server would say "failed rule: <the CEL>" for a rule without one."""
    for path, node in walk(schema(kind)):
        for validation in node.get("x-kubernetes-validations", []):
            assert validation.get("message", "").strip(), f"{kind} {path}: {validation['rule']} has no message"


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


DECIMAL_FIELDS = {
    "DeployedModel": [".spec.pricing.inputPerMTok", ".spec.pricing.outputPerMTok"],
    "CachePolicy": [".spec.readMultiplier", ".spec.writeMultipliers.5m", ".spec.writeMultipliers.1h",
                    ".spec.writeMultipliers.24h"],
    "PlanReplay": [".spec.pricingOverrides.*.inputPerMTok", ".spec.pricingOverrides.*.outputPerMTok",
                   ".spec.policy.readMultiplier", ".spec.policy.writeMultipliers.5m"],
}


@pytest.mark.parametrize(("kind", "path"), [(k, p) for k, paths in DECIMAL_FIELDS.items() for p in paths])
def test_decimals_are_strings_with_the_decimal_pattern(kind: str, path: str) -> None:
    """Never a float (a YAML 0.1 is not 0.1); what the pattern admits, the server shows in tests/cluster."""
    node = dict(walk(schema(kind)))[path]
    assert (node["type"], node["pattern"]) == ("string", r"^[0-9]+(\.[0-9]+)?$")


def test_planreplay_inline_policy_is_the_cachepolicy_spec() -> None:
    """One schema: PlanReplay.spec.policy is CachePolicy.spec, rules included (only the description differs)."""
    policy = schema("PlanReplay")["properties"]["spec"]["properties"]["policy"]
    spec = schema("CachePolicy")["properties"]["spec"]
    assert policy["x-kubernetes-validations"]
    assert {k: v for k, v in policy.items() if k != "description"} == {
        k: v for k, v in spec.items() if k != "description"}


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


def test_a_cachepolicy_has_no_schema_defaults() -> None:
    assert [path for path, node in walk(schema("CachePolicy")) if "default" in node] == []


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
    assert all(o["apiVersion"] == API_VERSION and o["metadata"].get("name") for o in ours)
    assert {o["metadata"]["namespace"] for o in ours} == set(namespaces)
    policies = [o["metadata"]["name"] for o in ours if o["kind"] == "CachePolicy"]
    aliases = [o["spec"]["alias"] for o in ours if o["kind"] == "DeployedModel"]
    assert len(set(policies)) == len(policies) and len(set(aliases)) == len(aliases)
    assert len({(o["kind"], o["metadata"]["name"]) for o in objects}) == len(objects)
    for doc in ours:
        if "cachePolicyRef" in doc["spec"]:
            assert doc["spec"]["cachePolicyRef"]["name"] in policies, doc["metadata"]["name"]
        assert set(doc["spec"].get("models", [])) <= set(aliases), doc["metadata"]["name"]
        assert set(doc["spec"].get("pricingOverrides", {})) <= set(doc["spec"].get("models", [])), doc["metadata"]
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


def test_the_tokenizer_volume_sources_are_the_operators_and_real_pod_volume_sources() -> None:
    volume = dict(walk(schema("DeployedModel")))[".spec.tokenizer.volume"]
    assert tuple(volume["properties"]) == VOLUME_SOURCES
    assert set(VOLUME_SOURCES) <= set(V1Volume.attribute_map.values()) - {"name"}
