"""The chart's two DSN Secrets (docs/design.md#database-roles): the owner's for the operator and the migrations Job,
the proxy Secret for proxy pods and replay Jobs. Followed from the values through the operator's environment to the
pods the operator renders, with the chart's schema refusing what Postgres would."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from promptcache.operator.handlers import manifests
from promptcache.operator.handlers.config import OperatorConfig
from promptcache.operator.handlers.render import render

from support.operator_process import CHART, render_chart
from support.resources import model, policy

IMAGE = {"repository": "registry.example.com/promptcache", "tag": "0.1.0"}
TWO_SECRETS = {"image": IMAGE, "database": {
    "existingSecret": "pg-owner", "secretKey": "url", "proxyRole": "billing_proxy",
    "proxySecret": {"name": "pg-proxy", "key": "dsn"},
}}


def chart_pods(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The chart's one container per workload, by kind: the operator's Deployment and the migrations Job."""
    return {o["kind"]: o["spec"]["template"]["spec"]["containers"][0] for o in render_chart(values)
            if o["kind"] in ("Deployment", "Job")}


def secret_refs(container: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}


def values_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def notes(values: dict[str, Any]) -> str:
    rendered = helm.Chart.load(CHART).render(values, name="pc", namespace="promptcache", is_install=True)
    return str(rendered["promptcache/templates/NOTES.txt"])


def test_the_owner_secret_is_the_operators_and_the_migrations_jobs_only() -> None:
    pods = chart_pods(TWO_SECRETS)
    for kind in ("Deployment", "Job"):
        assert secret_refs(pods[kind]) == {"PROMPTCACHE_DATABASE_URL": {"name": "pg-owner", "key": "url"}}, kind
        assert values_env(pods[kind])["PROMPTCACHE_PROXY_ROLE"] == "billing_proxy", kind
    assert values_env(pods["Deployment"])["PROMPTCACHE_DATABASE_SECRET"] == "pg-proxy/dsn"
    assert "PROMPTCACHE_DATABASE_SECRET" not in values_env(pods["Job"])


def test_proxy_pods_and_replay_jobs_get_the_proxy_secret() -> None:
    """The operator, started with the env the chart gives it, renders the DSN from the proxy Secret."""
    config = OperatorConfig.from_env(values_env(chart_pods(TWO_SECRETS)["Deployment"]))
    assert config.proxy_role == "billing_proxy"
    spec = model("m", "smol", "p", ns="llm")["spec"]
    deployment = manifests.deployment("m", "llm", spec, render("llm", "m", spec, "p", policy("p", ns="llm")["spec"]),
                                      config.manifests)
    job = manifests.replay_job("what-if", "llm", 1, config.manifests)
    for pod in (deployment["spec"]["template"]["spec"], job["spec"]["template"]["spec"]):
        [container] = [c for c in pod["containers"] if c["name"] in ("proxy", "replay")]
        assert secret_refs(container)["PROMPTCACHE_DATABASE_URL"] == {"name": "pg-proxy", "key": "dsn"}


def test_without_a_proxy_secret_it_is_named_like_the_owners_and_the_notes_warn() -> None:
    pods = chart_pods({"image": IMAGE})
    assert values_env(pods["Deployment"])["PROMPTCACHE_DATABASE_SECRET"] == "promptcache-postgres/dsn"
    assert values_env(pods["Deployment"])["PROMPTCACHE_PROXY_ROLE"] == "promptcache_proxy"
    assert "WARNING: database.proxySecret.name is not set" in notes({"image": IMAGE})
    assert values_env(chart_pods({"image": IMAGE, "database": {"existingSecret": "pg-owner", "secretKey": "url",
                                                               "proxySecret": {"name": "pg-proxy"}}})["Deployment"])[
        "PROMPTCACHE_DATABASE_SECRET"] == "pg-proxy/url"


def test_the_notes_say_how_to_make_the_proxy_login() -> None:
    text = notes(TWO_SECRETS)
    assert "WARNING" not in text
    assert "kubectl -n promptcache create secret generic pg-owner \\\n       --from-literal=url=" in text
    assert "CREATE ROLE promptcache_llm LOGIN PASSWORD '…' IN ROLE billing_proxy" in text
    assert "kubectl -n llm create secret generic pg-proxy \\\n       --from-literal=dsn=" in text


@pytest.mark.parametrize(("database", "message"), [
    ({"proxyRole": "pg_proxy"}, "at '/database/proxyRole': 'not' failed"),
    ({"proxyRole": "public"}, "at '/database/proxyRole': 'not' failed"),
    ({"proxyRole": "Proxy"}, "at '/database/proxyRole'"),
    ({"proxyRole": "proxy-role"}, "at '/database/proxyRole'"),
    ({"proxyRole": "a" * 64}, "at '/database/proxyRole'"),
    ({"proxySecret": {"name": "Not_A_Name"}}, "at '/database/proxySecret/name'"),
    ({"proxySecret": {"key": "bad key"}}, "at '/database/proxySecret/key'"),
    ({"proxySecret": {"namespace": "llm"}}, "additional properties 'namespace' not allowed"),
])
def test_the_schema_refuses_what_postgres_or_kubernetes_would(database: dict[str, Any], message: str) -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema(chart.merge_values({"image": IMAGE, "database": database}))
