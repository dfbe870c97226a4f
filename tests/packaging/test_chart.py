"""The Helm chart, rendered and linted with helm-python-sdk, validated with kubernetes-validate
(docs/design.md#packaging)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "promptcache"
KUBERNETES = "1.33.0"
# The one value without a default: the image's repository (no public image exists).
MINIMAL_VALUES: dict[str, Any] = {"image": {"repository": "registry.example.com/promptcache"}}
FULL_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example.com/promptcache", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "operator": {"namespaces": ["llm", "llm-staging"], "verbose": True, "serverSecrets": ["hf-token", "llm/weights"],
                 "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}},
    "database": {"existingSecret": "pg-dsn", "secretKey": "url"},
    "redis": {"url": "rediss://redis.llm.svc:6380/1", "prefix": "pc:"},
    "housekeeping": {"sweepIntervalSeconds": 60, "sweepGraceSeconds": 600, "logRetentionDays": 7},
    "replay": {"inlineMaxRequests": 50000, "namespaces": ["llm", "llm-staging"]},
    "migrations": {"hook": True},
    "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}},
                "scrapers": {"namespace": "monitoring", "podLabels": {"app.kubernetes.io/name": "prometheus"}}},
    "serviceAccount": {"create": True, "name": "promptcache-operator"},
    "podAnnotations": {"example.com/team": "ml-platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}],
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    rendered = chart.render(values, name="pc", namespace="promptcache", is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]


def test_chart_crds_are_identical_to_crds_folder() -> None:
    source = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert source == sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    for name in source:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), name


@pytest.mark.parametrize("values", [MINIMAL_VALUES, FULL_VALUES], ids=["defaults", "full"])
def test_lint_is_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace="promptcache", kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [MINIMAL_VALUES, FULL_VALUES], ids=["defaults", "full"])
def test_every_rendered_object_validates_and_every_pod_is_locked_down(values: dict[str, Any]) -> None:
    objects = render(values)
    kinds = sorted(o["kind"] for o in objects)
    expected = ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "Job", "ServiceAccount"]
    if values is FULL_VALUES:  # the ServiceMonitor; in two namespaces the operator's Role and RoleBinding and the
        # replay ServiceAccount and RoleBinding
        expected += ["ServiceMonitor"] + 2 * ["Role", "RoleBinding", "ServiceAccount", "RoleBinding"]
    assert kinds == sorted(expected)
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: no built-in schema to check against
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    for spec in pod_specs(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["runAsNonRoot"] is True
            assert container["resources"]["requests"] and container["resources"]["limits"]


def test_operator_deployment_wiring() -> None:
    objects = render(FULL_VALUES)
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/promptcache:0.1.0-rc1"
    assert container["args"] == ["operator", "--namespace=llm", "--namespace=llm-staging", "--verbose"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PROMPTCACHE_DATABASE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "pg-dsn", "key": "url"}}
    assert env["PROMPTCACHE_DATABASE_SECRET"]["value"] == "pg-dsn/url"
    assert env["PROMPTCACHE_REDIS_URL"]["value"] == "rediss://redis.llm.svc:6380/1"
    assert env["PROMPTCACHE_PROXY_IMAGE"]["value"] == container["image"]
    [job] = [o for o in objects if o["kind"] == "Job"]
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert annotations["argocd.argoproj.io/hook"] == "PreSync"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    assert env["PROMPTCACHE_REPLAY_SERVICE_ACCOUNT"]["value"] == "promptcache-replay"
    assert env["PROMPTCACHE_SERVER_SECRETS"]["value"] == "hf-token,llm/weights"
    assert env["PROMPTCACHE_METRICS_NAMESPACE"]["value"] == "monitoring"
    assert json.loads(env["PROMPTCACHE_METRICS_POD_LABELS"]["value"]) == {"app.kubernetes.io/name": "prometheus"}
    bindings = [o for o in objects if o["kind"] == "RoleBinding" and o["roleRef"]["kind"] == "ClusterRole"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["llm", "llm-staging"]
    assert all(b["roleRef"]["name"] == "pc-promptcache-replay" for b in bindings)


NAMESPACED_RULES = yaml.safe_load((CHART / "files" / "rbac-rules.yaml").read_text())
CLUSTER_RULES = yaml.safe_load((CHART / "files" / "rbac-cluster-rules.yaml").read_text())
OPERATOR_SUBJECT = [{"kind": "ServiceAccount", "name": "promptcache-operator", "namespace": "promptcache"}]


def test_clusterwide_the_operator_has_one_cluster_role_with_every_rule() -> None:
    objects = render({**MINIMAL_VALUES, "serviceAccount": {"create": True, "name": "promptcache-operator"}})
    [role] = [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "pc-promptcache"]
    assert role["rules"] == CLUSTER_RULES + NAMESPACED_RULES
    [binding] = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == "pc-promptcache" and binding["subjects"] == OPERATOR_SUBJECT
    assert not [o for o in objects if o["kind"] == "Role"]


def test_with_namespaces_the_operator_has_a_role_in_each_and_cluster_rules_only_for_kopfs_scanning() -> None:
    objects = render(FULL_VALUES)
    [role] = [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "pc-promptcache"]
    assert role["rules"] == CLUSTER_RULES
    assert {(g, r) for rule in CLUSTER_RULES for g in rule["apiGroups"] for r in rule["resources"]} == {
        ("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")}
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in CLUSTER_RULES)
    roles = [o for o in objects if o["kind"] == "Role"]
    assert [(r["metadata"]["name"], r["metadata"]["namespace"]) for r in roles] == [
        ("pc-promptcache", "llm"), ("pc-promptcache", "llm-staging")]
    assert all(r["rules"] == NAMESPACED_RULES for r in roles)
    bindings = [o for o in objects if o["kind"] == "RoleBinding" and o["roleRef"]["kind"] == "Role"]
    assert [(b["metadata"]["namespace"], b["roleRef"]["name"], b["subjects"]) for b in bindings] == [
        ("llm", "pc-promptcache", OPERATOR_SUBJECT), ("llm-staging", "pc-promptcache", OPERATOR_SUBJECT)]


def test_migrations_hook_and_service_monitor_are_optional() -> None:
    objects = render({**MINIMAL_VALUES, "migrations": {"hook": False}})
    assert "Job" not in {o["kind"] for o in objects} and "ServiceMonitor" not in {o["kind"] for o in objects}


def test_notes_tell_the_user_what_to_apply_next() -> None:
    notes = helm.Chart.load(CHART).render(MINIMAL_VALUES, name="pc", namespace="promptcache", is_install=True)[
        "promptcache/templates/NOTES.txt"]
    assert "kubectl -n promptcache create secret generic promptcache-postgres" in notes
    assert "kubectl apply -k examples/quickstart/" in notes
    named = re.findall(r"examples/[\w./-]*[\w/]", notes)
    assert named and [p for p in named if not (CHART.parents[1] / p).exists()] == []


@pytest.mark.parametrize(("values", "message"), [
    ({"image": {"repository": "registry.example.com/promptcache", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"repository": ""}}, "/image/repository"),
    ({"image": {"repository": "registry.example.com/promptcache:0.1.0"}}, "/image/repository"),  # a tag: image.tag
    ({"image": {"repository": "registry.example.com/promptcache", "tag": "not a tag"}}, "/image/tag"),
    ({"redis": {"url": "http://redis:6379"}}, "/redis/url"),
    ({"database": {"existingSecret": "Not_A_Name"}}, "/database/existingSecret"),
    ({"operator": {"namespaces": ["Bad Namespace"]}}, "/operator/namespaces/0"),
    ({"operator": {"serverSecrets": ["HF_TOKEN"]}}, "/operator/serverSecrets/0"),
    ({"operator": {"serverSecrets": ["a/b/c"]}}, "/operator/serverSecrets/0"),
    ({"operator": {"serverSecrets": "hf-token"}}, "/operator/serverSecrets"),
    ({"securityContext": {"readOnlyRootFilesystem": False, "allowPrivilegeEscalation": False}},
     "/securityContext/readOnlyRootFilesystem"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"housekeeping": {"sweepIntervalSeconds": 1}}, "/housekeeping/sweepIntervalSeconds"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"metrics": {"scrapers": {"namespace": "Monitoring"}}}, "/metrics/scrapers/namespace"),
    ({"metrics": {"scrapers": {"podLabels": {"app": "-prometheus"}}}}, "/metrics/scrapers/podLabels/app"),
    ({"metrics": {"scrapers": {"podLabels": {"bad key": "x"}}}}, "invalid propertyName 'bad key'"),
    ({"metrics": {"scrapers": {"pods": {}}}}, "additional properties 'pods' not allowed"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),
])
def test_values_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    chart = helm.Chart.load(CHART)
    values = {**MINIMAL_VALUES, **values}
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema(chart.merge_values(values))
    with pytest.raises(helm.HelmError):
        chart.render(values, name="pc", namespace="promptcache", is_install=True)


def test_install_without_an_image_fails_at_the_schema_naming_the_value() -> None:
    """No public image exists, so the chart has no default: `helm install` without one stops before rendering."""
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError, match="at '/image': missing property 'repository'"):
        chart.render({}, name="pc", namespace="promptcache", is_install=True)
    image = json.loads((CHART / "values.schema.json").read_text())["properties"]["image"]
    assert image["required"] == ["repository"]
    assert "make image" in image["properties"]["repository"]["description"]


@pytest.mark.parametrize("repository", ["registry.example.com/promptcache", "localhost:5000/promptcache",
                                        "ghcr.io/acme/llm/promptcache", "promptcache"])
def test_image_repositories_that_validate(repository: str) -> None:
    chart = helm.Chart.load(CHART)
    chart.validate_schema(chart.merge_values({"image": {"repository": repository, "tag": "0.1.0-rc1"}}))


def test_the_service_monitor_scrapes_the_metrics_port() -> None:
    """The proxies serve /metrics on their own port (the operator renders --metrics-port 9090, Service port
    ``metrics``), which a model's NetworkPolicy opens to the scrapers alone."""
    [monitor] = [o for o in render(FULL_VALUES) if o["kind"] == "ServiceMonitor"]
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
