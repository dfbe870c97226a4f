"""What the rendered config and pod take from the spec (operator/handlers/render.py): a tokenizer's ConfigMap key or
file inside ``spec.tokenizer.volume`` becomes a path under the mount, and what the CRD refuses there the operator
refuses too (an API server that skipped CEL), as InvalidSpec with the reason; ``upstream.cacheSalt`` passes through."""

from __future__ import annotations

import re
from typing import Any

import pytest

from promptcache.operator.errors import SpecError
from promptcache.operator.handlers import manifests, serverpolicy
from promptcache.operator.handlers.render import render

from support.resources import model, policy

PVC = {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}


def rendered(tokenizer: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the proxy config's tokenizer, the Deployment) for a model with ``tokenizer``."""
    spec = model("m", "smol", "p", ns="ns", tokenizer=tokenizer)["spec"]
    out = render("ns", "m", spec, "p", policy("p", ns="ns")["spec"])
    deployment = manifests.deployment("m", "ns", spec, out, manifests.OperatorSettings(proxy_image="img"))
    return dict(out.config.models["smol"].tokenizer or {}), deployment


def test_a_gguf_from_a_volume_is_mounted_and_named_by_its_path_inside() -> None:
    tokenizer, deployment = rendered({"type": "gguf", "volume": PVC, "path": "smollm2/model.gguf"})
    assert tokenizer == {"type": "gguf", "path": "/etc/promptcache/tokenizer/smollm2/model.gguf"}
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "tokenizer", **PVC} in pod["volumes"]
    assert {"name": "tokenizer", "mountPath": "/etc/promptcache/tokenizer", "readOnly": True} in \
        pod["containers"][0]["volumeMounts"]


def test_a_configmap_tokenizer_is_still_its_key() -> None:
    tokenizer, deployment = rendered({"type": "huggingface", "configMapRef": {"name": "tok", "key": "t.json"}})
    assert tokenizer == {"type": "huggingface", "path": "/etc/promptcache/tokenizer/t.json"}
    assert {"name": "tokenizer", "configMap": {"name": "tok"}} in deployment["spec"]["template"]["spec"]["volumes"]


def test_a_bundled_tokenizer_mounts_nothing() -> None:
    tokenizer, deployment = rendered({"type": "tiktoken", "encoding": "cl100k_base"})
    assert tokenizer == {"type": "tiktoken", "encoding": "cl100k_base"}
    assert [v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]] == ["config", "tmp", "spool"]


@pytest.mark.parametrize(("tokenizer", "reason"), [
    ({"type": "gguf", "volume": {}, "path": "m.gguf"}, "spec.tokenizer.volume must be exactly one volume source"),
    ({"type": "gguf", "volume": {**PVC, "hostPath": {"path": "/m"}}, "path": "m.gguf"}, "exactly one volume source"),
    ({"type": "gguf", "volume": {"name": "x"}, "path": "m.gguf"}, "exactly one volume source"),
    ({"type": "gguf", "volume": {"hostPath": "/m"}, "path": "m.gguf"}, "exactly one volume source"),
    ({"type": "gguf", "volume": ["hostPath"], "path": "m.gguf"}, "exactly one volume source"),
    ({"type": "gguf", "volume": PVC, "path": "/etc/passwd"}, "spec.tokenizer.path must be a relative path"),
    ({"type": "gguf", "volume": PVC, "path": "../../etc/passwd"}, "relative path"),
    ({"type": "gguf", "volume": PVC, "path": "a//b"}, "relative path"),
    ({"type": "gguf", "volume": PVC}, "relative path"),
    ({"type": "gguf", "volume": PVC, "path": 7}, "relative path"),
    ({"type": "gguf"}, "tokenizer.path must be a non-empty string"),
])
def test_what_the_crd_refuses_the_operator_refuses(tokenizer: dict[str, Any], reason: str) -> None:
    with pytest.raises(SpecError, match=reason) as caught:
        rendered(tokenizer)
    assert caught.value.reason == "InvalidSpec"


def test_the_cache_salt_reaches_the_proxy_config_only_when_asked_for() -> None:
    spec = model("m", "smol", "p", ns="ns")["spec"]
    assert render("ns", "m", spec, "p", policy("p", ns="ns")["spec"]).config.models["smol"].upstream.cache_salt is None
    spec["upstream"]["cacheSalt"] = "principal"
    rendered = render("ns", "m", spec, "p", policy("p", ns="ns")["spec"])
    assert rendered.config.models["smol"].upstream.cache_salt == "principal"
    assert "cacheSalt: principal" in rendered.yaml


def test_proxy_pods_stay_ready_while_postgres_is_down() -> None:
    """Readiness must not follow Postgres in a cluster (issue 13 item 10): the pods run --degraded-ok, whose /readyz
    tests/http cover; here, that the operator asks for it."""
    _, deployment = rendered({"type": "tiktoken", "encoding": "cl100k_base"})
    [proxy] = deployment["spec"]["template"]["spec"]["containers"]
    assert proxy["args"] == ["proxy", "--config", "/etc/promptcache/proxy.yaml", "--port", "8080",
                             "--no-manage-tariffs", "--degraded-ok", "--spool-dir", "/var/lib/promptcache/spool",
                             "--workers", "1", "--metrics-port", "9090"]
    assert proxy["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                              {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"


@pytest.mark.parametrize(("resources", "workers"), [
    ({}, 1),
    ({"limits": {"memory": "1Gi"}}, 1),
    ({"requests": {"cpu": "250m"}, "limits": {"cpu": "4"}}, 1),  # the request is what the pod is guaranteed
    ({"requests": {"cpu": "1500m"}}, 2),
    ({"requests": {"cpu": 3}}, 3),
    ({"limits": {"cpu": "2"}}, 2),
    ({"requests": {"cpu": "1e9"}}, 64),
    ({"requests": {"cpu": "-1"}}, 1),
])
def test_proxy_workers_follow_the_cpu_the_pod_is_given(resources: dict[str, Any], workers: int) -> None:
    assert manifests.proxy_workers(resources) == workers


def test_a_cpu_figure_that_is_not_a_quantity_is_an_invalid_spec() -> None:
    with pytest.raises(SpecError) as caught:
        manifests.proxy_workers({"requests": {"cpu": "lots"}})
    assert (caught.value.reason, str(caught.value)) == \
        ("InvalidSpec", "spec.proxy.resources cpu 'lots' is not a CPU quantity")


def test_proxy_pods_keep_their_spool_across_container_restarts() -> None:
    """Bills waiting for Postgres live in an emptyDir (issue 13 item 8), mounted where --spool-dir points, sized above
    the proxy's own 1 GiB bound so the proxy refuses rows before the kubelet evicts the pod."""
    _, deployment = rendered({"type": "tiktoken", "encoding": "cl100k_base"})
    pod = deployment["spec"]["template"]["spec"]
    [proxy] = pod["containers"]
    assert {"name": "spool", "mountPath": "/var/lib/promptcache/spool"} in proxy["volumeMounts"]
    assert {"name": "spool", "emptyDir": {"sizeLimit": "1280Mi"}} in pod["volumes"]


SERVER = {"name": "vllm", "image": "vllm/vllm-openai:v0.9", "ports": [{"containerPort": 8000}]}


def sidecar(**server: Any) -> dict[str, Any]:
    spec: dict[str, Any] = model("m", "smol", "p", ns="ns", server={**SERVER, **server})["spec"]
    del spec["upstream"]["url"]
    return spec


@pytest.mark.parametrize(("context", "why"), [
    ({"privileged": True}, "spec.server.securityContext.privileged: a privileged server is not allowed"),
    ({"allowPrivilegeEscalation": True}, "spec.server.securityContext.allowPrivilegeEscalation: must be false"),
    ({"runAsUser": 0}, "spec.server.securityContext.runAsUser: 0 is root"),
    ({"runAsNonRoot": False}, "spec.server.securityContext.runAsNonRoot: must be true"),
    ({"capabilities": {"add": ["SYS_ADMIN"]}}, "spec.server.securityContext.capabilities.add: no capability"),
    ({"seccompProfile": {"type": "Unconfined"}}, "spec.server.securityContext.seccompProfile.type: Unconfined"),
])
def test_the_server_baseline_refuses_what_contradicts_it(context: dict[str, Any], why: str) -> None:
    spec = sidecar(securityContext=context)
    with pytest.raises(SpecError, match=re.escape(why)) as caught:
        serverpolicy.check(spec, serverpolicy.RESTRICTED)
    assert caught.value.reason == "InvalidSpec"
    serverpolicy.check(spec, serverpolicy.UNRESTRICTED)


def test_every_violation_is_named_and_a_hostpath_tokenizer_is_one() -> None:
    spec = sidecar(securityContext={"privileged": True, "runAsUser": 0})
    spec["tokenizer"] = {"type": "gguf", "volume": {"hostPath": {"path": "/models"}}, "path": "m.gguf"}
    with pytest.raises(SpecError) as caught:
        serverpolicy.check(spec, serverpolicy.RESTRICTED)
    assert str(caught.value) == (
        "the security baseline (PROMPTCACHE_SERVER_SECURITY=restricted) refuses "
        "spec.server.securityContext.privileged: a privileged server is not allowed; "
        "spec.server.securityContext.runAsUser: 0 is root; "
        "spec.tokenizer.volume.hostPath: the node's filesystem may not be mounted")


def test_the_baseline_is_filled_in_under_what_the_spec_sets() -> None:
    spec = sidecar(securityContext={"runAsUser": 1000, "readOnlyRootFilesystem": True})
    out = render("ns", "m", spec, "p", policy("p", ns="ns")["spec"])
    settings = manifests.OperatorSettings(proxy_image="img")
    [_, server] = manifests.deployment("m", "ns", spec, out, settings)["spec"]["template"]["spec"]["containers"]
    assert server["securityContext"] == {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "privileged": False,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        "runAsUser": 1000, "readOnlyRootFilesystem": True}
    loose = manifests.OperatorSettings(proxy_image="img", server_security=serverpolicy.UNRESTRICTED)
    [_, as_written] = manifests.deployment("m", "ns", spec, out, loose)["spec"]["template"]["spec"]["containers"]
    assert as_written == spec["server"]


SECRET_REFUSED = "is not one the operator lets servers read (PROMPTCACHE_SERVER_SECRETS)"


def test_a_server_reads_only_the_secrets_the_operator_allows() -> None:
    """The kubelet hands a pod any Secret of its namespace: in restricted mode the server may name only the allowed
    ones (issue 13 item 15), by name or namespace/name; ConfigMaps and plain values are not limited."""
    spec = sidecar(env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                        {"name": "MODE", "value": "fast"},
                        {"name": "DB", "valueFrom": {"secretKeyRef": {"name": "promptcache-postgres", "key": "dsn"}}}],
                   envFrom=[{"configMapRef": {"name": "settings"}}, {"secretRef": {"name": "cloud-creds"}}])
    with pytest.raises(SpecError) as caught:
        serverpolicy.check(spec, serverpolicy.RESTRICTED, "ns", {"hf"})
    assert str(caught.value) == (
        "the security baseline (PROMPTCACHE_SERVER_SECURITY=restricted) refuses "
        f"spec.server.env[2].valueFrom.secretKeyRef: Secret 'promptcache-postgres' {SECRET_REFUSED}; "
        f"spec.server.envFrom[1].secretRef: Secret 'cloud-creds' {SECRET_REFUSED}")
    serverpolicy.check(spec, serverpolicy.RESTRICTED, "ns", {"hf", "ns/promptcache-postgres", "cloud-creds"})
    with pytest.raises(SpecError, match="'promptcache-postgres'"):
        serverpolicy.check(spec, serverpolicy.RESTRICTED, "ns", {"hf", "other/promptcache-postgres", "cloud-creds"})
    serverpolicy.check(spec, serverpolicy.UNRESTRICTED)


def test_a_secret_tokenizer_volume_is_a_secret_read_too() -> None:
    spec = sidecar()
    spec["tokenizer"] = {"type": "gguf", "volume": {"secret": {"secretName": "weights"}}, "path": "m.gguf"}
    with pytest.raises(SpecError) as caught:
        serverpolicy.check(spec, serverpolicy.RESTRICTED, "ns", ())
    assert str(caught.value).endswith(f"spec.tokenizer.volume.secret: Secret 'weights' {SECRET_REFUSED}")
    serverpolicy.check(spec, serverpolicy.RESTRICTED, "ns", ("ns/weights",))


@pytest.mark.parametrize("env", [["not a mapping"], [{"name": "X", "valueFrom": "nope"}], "HF_TOKEN=1", None])
def test_malformed_env_is_left_to_the_api_server(env: Any) -> None:
    """Shapes the CRD's schema refuses are not this check's business, and do not crash it."""
    serverpolicy.check(sidecar(env=env, envFrom=env), serverpolicy.RESTRICTED, "ns", ())


def served(**upstream: Any) -> tuple[tuple[str, ...], str]:
    """(the APIs the rendered config serves, its upstream URL) for a sidecar model with these ``upstream`` fields."""
    spec = sidecar()
    spec["upstream"] = {"model": "llama", **upstream}
    config = render("ns", "m", spec, "p", policy("p", ns="ns")["spec"]).config.models["smol"].upstream
    return config.apis, config.url


def test_one_model_on_several_apis_renders_them_all_on_one_sidecar_url() -> None:
    """The sidecar URL is OpenAI-style whatever the APIs: the proxy drops ``/v1`` for Anthropic's paths."""
    assert served(apis=["openai", "anthropic"]) == (("openai", "anthropic"), "http://127.0.0.1:8000/v1")
    assert served(api="anthropic") == (("anthropic",), "http://127.0.0.1:8000/v1")
    assert served(api="openai-responses") == (("openai-responses",), "http://127.0.0.1:8000/v1")


@pytest.mark.parametrize("upstream", [{}, {"api": "openai", "apis": ["anthropic"]}])
def test_exactly_one_of_api_and_apis(upstream: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match=r"set exactly one of spec\.upstream\.api \(one API\) and spec\.upstream\.apis"):
        served(**upstream)


@pytest.mark.parametrize(("apis", "why"), [
    (["openai", "openai"], "lists an API twice"),
    (["grpc"], "must be one of .* or a list of them, got \\['grpc'\\]"),
    ([], "must be one of .* or a list of them, got \\[\\]"),
])
def test_bad_apis_are_the_proxy_loaders_reason(apis: list[str], why: str) -> None:
    with pytest.raises(SpecError, match=why) as caught:
        served(apis=apis)
    assert caught.value.reason == "InvalidSpec"


def test_each_api_has_the_endpoint_its_sdk_takes() -> None:
    assert {api: manifests.endpoint("m", "ns", api) for api in ("openai", "openai-responses", "anthropic")} == {
        "openai": "http://m-proxy.ns.svc:80/v1", "openai-responses": "http://m-proxy.ns.svc:80/v1",
        "anthropic": "http://m-proxy.ns.svc:80"}
