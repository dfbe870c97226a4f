"""``promptcache operator``'s environment is an entry point (docs/design.md#reconciliation): a missing image or a
malformed number stops it with the variable named, exit 2, before it touches a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from promptcache.operator.handlers.config import EnvironmentError_, OperatorConfig

PROMPTCACHE = str(Path(sys.executable).with_name("promptcache"))


def run_operator(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")}
    return subprocess.run([PROMPTCACHE, "operator", "--liveness=http://127.0.0.1:1/healthz"],
                          env={**base, "KUBECONFIG": "/nonexistent", **env}, capture_output=True, text=True,
                          timeout=60, check=False)


def test_without_an_image_the_operator_refuses_to_start() -> None:
    done = run_operator()
    assert done.returncode == 2
    assert done.stderr.strip() == ("promptcache operator: PROMPTCACHE_PROXY_IMAGE is not set: the image proxy pods "
                                   "and replay Jobs run (the chart sets it from image.repository and image.tag)")


@pytest.mark.parametrize(("name", "raw"), [
    ("PROMPTCACHE_SWEEP_INTERVAL_SECONDS", "soon"),
    ("PROMPTCACHE_SWEEP_GRACE_SECONDS", "-1"),
    ("PROMPTCACHE_LOG_RETENTION_DAYS", "nan"),
    ("PROMPTCACHE_LOG_RETENTION_DAYS", "inf"),
    ("PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS", "1e3"),
    ("PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS", "9" * 5000),
])
def test_a_malformed_number_names_its_variable(name: str, raw: str) -> None:
    with pytest.raises(EnvironmentError_) as caught:
        OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "registry.example.com/promptcache:1", name: raw})
    assert str(caught.value).startswith(f"{name} must be ")
    assert len(str(caught.value)) < 200


def test_a_bad_number_stops_the_process_too() -> None:
    done = run_operator(PROMPTCACHE_PROXY_IMAGE="promptcache:test", PROMPTCACHE_SWEEP_INTERVAL_SECONDS="x")
    assert (done.returncode, done.stderr.strip()) == (
        2, "promptcache operator: PROMPTCACHE_SWEEP_INTERVAL_SECONDS must be a number from 0 to 1000000000, got 'x'")


def test_the_chart_defaults_are_read() -> None:
    config = OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": " promptcache:1 ",
                                      "PROMPTCACHE_INLINE_REPLAY_MAX_REQUESTS": "50000"})
    assert config.manifests.proxy_image == "promptcache:1"
    assert config.inline_replay_max_requests == 50_000
    assert config.housekeeping.interval.total_seconds() == 300


def test_the_scrapers_a_network_policy_admits_are_read() -> None:
    config = OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1",
                                      "PROMPTCACHE_METRICS_NAMESPACE": "monitoring",
                                      "PROMPTCACHE_METRICS_POD_LABELS": '{"app.kubernetes.io/name": "prometheus", '
                                                                        '"example.com/shard": ""}'})
    assert config.manifests.metrics_namespace == "monitoring"
    assert config.manifests.metrics_pod_labels == (("app.kubernetes.io/name", "prometheus"), ("example.com/shard", ""))
    unset = OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1", "PROMPTCACHE_METRICS_NAMESPACE": "",
                                     "PROMPTCACHE_METRICS_POD_LABELS": "{}"})  # the chart's defaults
    assert (unset.manifests.metrics_namespace, unset.manifests.metrics_pod_labels) == (None, ())


@pytest.mark.parametrize(("env", "message"), [
    ({"PROMPTCACHE_METRICS_NAMESPACE": "Monitoring"}, "PROMPTCACHE_METRICS_NAMESPACE must be a namespace name, got "
                                                      "'Monitoring'"),
    ({"PROMPTCACHE_METRICS_NAMESPACE": "m" * 64}, "PROMPTCACHE_METRICS_NAMESPACE must be a namespace name"),
    *[({"PROMPTCACHE_METRICS_NAMESPACE": "monitoring", "PROMPTCACHE_METRICS_POD_LABELS": raw},
       "PROMPTCACHE_METRICS_POD_LABELS must be a JSON object of label keys to values")
      for raw in ("app=prometheus", '["app"]', '{"app": 1}', '{"bad key": "x"}', '{"app": "-x"}',
                  '{"app": "' + "v" * 64 + '"}', '{"' + "k" * 64 + '": "x"}', '{"Example.com/app": "x"}')],
    ({"PROMPTCACHE_METRICS_POD_LABELS": '{"app": "prometheus"}'},
     "PROMPTCACHE_METRICS_POD_LABELS selects pods of the namespace PROMPTCACHE_METRICS_NAMESPACE names, which is not "
     "set"),
])
def test_malformed_scrapers_name_their_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(EnvironmentError_) as caught:
        OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1", **env})
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_secrets_servers_may_read_are_read() -> None:
    config = OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1",
                                      "PROMPTCACHE_SERVER_SECRETS": "hf-token, llm/model.weights,,"})
    assert config.manifests.server_secrets == frozenset({"hf-token", "llm/model.weights"})
    assert OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1",
                                    "PROMPTCACHE_SERVER_SECRETS": ""}).manifests.server_secrets == frozenset()


@pytest.mark.parametrize("raw", ["HF", "a/b/c", "Team/hf", "-hf", "ns/", "/hf", "x" * 254, "caf\u00e9"])
def test_a_malformed_server_secret_names_its_variable(raw: str) -> None:
    with pytest.raises(EnvironmentError_) as caught:
        OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1", "PROMPTCACHE_SERVER_SECRETS": raw})
    assert str(caught.value).startswith("PROMPTCACHE_SERVER_SECRETS: "), str(caught.value)
    assert str(caught.value).endswith("is not a Secret name or namespace/name")


@pytest.mark.parametrize(("env", "message"), [
    *[({"PROMPTCACHE_REDIS_SECRET": raw}, f"PROMPTCACHE_REDIS_SECRET must be SECRET/KEY, got {raw[:70]!r}")
      for raw in ("redis", "redis/", "/url", "Redis/url", "redis/u rl", "redis/" + "k" * 254, "r\u00e9dis/url")],
    ({"PROMPTCACHE_SECRET_SOURCE_NAMESPACE": "Promptcache"},
     "PROMPTCACHE_SECRET_SOURCE_NAMESPACE must be a namespace name, got 'Promptcache'"),
])
def test_malformed_secret_settings_name_their_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(EnvironmentError_) as caught:
        OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1", **env})
    assert str(caught.value) == message


def test_the_secret_settings_reach_the_manifests() -> None:
    config = OperatorConfig.from_env({"PROMPTCACHE_PROXY_IMAGE": "promptcache:1", "PROMPTCACHE_REDIS_SECRET":
                                      "pc-redis/url", "PROMPTCACHE_SECRET_SOURCE_NAMESPACE": "promptcache-system"})
    assert (config.manifests.redis_secret, config.manifests.secret_source) == ("pc-redis/url", "promptcache-system")
