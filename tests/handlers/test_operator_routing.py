"""Routing over a Service's ready endpoints (docs/design.md#replica-routing): the operator, as a process with the
chart's identity, against the real API server, follows a routed model's upstream Service through its EndpointSlices
and announces the ready endpoints on Redis, where a proxy picks them up; status shows them. The slices are made
by hand (there is no kubelet to make endpoints ready), under a manager label of their own so the controller
manager's EndpointSlice controller leaves them alone."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml

from promptcache.operator.constants import API_VERSION
from promptcache.proxy import policybus

from support.cluster import Cluster, eventually
from support.operator_process import OperatorEnvironment, StartOperator
from support.proxy import model_config, running_proxy, unique
from support.resources import condition, model, policy


def service(ns: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "vllm", "namespace": ns},
            "spec": {"ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8000, "targetPort": 8080}]}}


def endpoint_slice(ns: str, name: str, *endpoints: tuple[str, bool]) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {
                "kubernetes.io/service-name": "vllm", "endpointslice.kubernetes.io/managed-by": "promptcache-tests"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": ready}} for address, ready in endpoints]}


async def replicas_of(kube: Cluster, ns: str, name: str) -> list[str] | None:
    obj = await kube.get_or_none(API_VERSION, "deployedmodels", ns, name)
    return ((obj or {}).get("status") or {}).get("replicas")


async def test_a_routed_model_follows_its_services_ready_endpoints(
        kube: Cluster, start_operator: StartOperator, operator_env: OperatorEnvironment, tmp_path: Path,
        pg_dsn: str, word_tokenizer: Path) -> None:
    ns = await kube.namespace("route")
    bus = aioredis.Redis.from_url(operator_env.redis_url or "")
    stored = policybus.replicas_key(operator_env.redis_prefix, f"{ns}/llama")
    try:
        await kube.create(service(ns))
        await kube.create(endpoint_slice(ns, "vllm-a", ("10.0.0.1", True), ("10.0.0.2", True), ("10.0.0.3", False)))
        # A proxy following the model's announcements, as the operator's rendered config makes its proxies do.
        followed = model_config("chat", f"http://vllm.{ns}.svc:8000/v1", "openai", word_tokenizer)
        followed["upstream"]["replicasFrom"] = f"{ns}/llama"
        async with start_operator(namespaces=[ns]), \
                running_proxy({"models": [followed]}, tmp_path, pg_dsn, operator_env.redis_url,
                              redis_prefix=operator_env.redis_prefix) as proxy:
            router = proxy.server.proxy.runtimes.models["chat"].router
            await kube.create(policy("standard", ns=ns))
            await kube.create(model("llama", unique("llama"), "standard", ns=ns, routing={"mode": "affinity"},
                                    upstream={"url": f"http://vllm.{ns}.svc:8000/v1", "model": "llama",
                                              "api": "openai"}))
            first = ["http://10.0.0.1:8080/v1", "http://10.0.0.2:8080/v1"]

            async def announced(urls: list[str]) -> bool:
                """In status, on Redis and in the proxy, which calls the Service itself while none is ready."""
                raw = await bus.get(stored)
                return raw is not None and json.loads(raw)["urls"] == urls and \
                    await replicas_of(kube, ns, "llama") == urls and \
                    list(router.urls) == (urls or [f"http://vllm.{ns}.svc:8000/v1"])

            await eventually(lambda: announced(first), what="the first replicas, in status, on Redis, in the proxy")
            cm = await kube.get("v1", "configmaps", ns, "llama-proxy-config")
            rendered = yaml.safe_load(cm["data"]["proxy.yaml"])["models"][0]
            assert rendered["routing"] == {"mode": "affinity"} and rendered["upstream"]["replicasFrom"] == f"{ns}/llama"
            assert "replicas" not in rendered["upstream"]  # out of the file: a scale-up does not roll the proxies
            checksum = cm["metadata"]["resourceVersion"]

            # Scale-up and a readiness flip: a second slice, one endpoint ready now, one gone.
            started = time.monotonic()
            await kube.create(endpoint_slice(ns, "vllm-b", ("10.0.1.9", True)))
            await kube.patch("discovery.k8s.io/v1", "endpointslices", ns, "vllm-a",
                             {"endpoints": [{"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                                            {"addresses": ["10.0.0.3"], "conditions": {"ready": True}}]})
            second = ["http://10.0.0.3:8080/v1", "http://10.0.1.9:8080/v1"]
            await eventually(lambda: announced(second), what="the replicas after scaling")
            assert time.monotonic() - started < 5, "the proxy did not follow within seconds"
            assert (await kube.get("v1", "configmaps", ns, "llama-proxy-config"))["metadata"]["resourceVersion"] \
                == checksum

            # Scale to zero: nothing ready, the proxies fall back to the Service URL.
            await kube.delete("discovery.k8s.io/v1", "endpointslices", ns, "vllm-a")
            await kube.delete("discovery.k8s.io/v1", "endpointslices", ns, "vllm-b")
            await eventually(lambda: announced([]), what="no replicas")
            events = await kube.events(ns, involving="llama")
            assert "2 ready endpoints of Service " + f"{ns}/vllm" in [e["message"] for e in events
                                                                      if e["reason"] == "ReplicasChanged"]
    finally:
        await bus.aclose()


async def test_routing_over_a_url_that_names_no_service_stalls(
        kube: Cluster, start_operator: StartOperator) -> None:
    ns = await kube.namespace("route")
    async with start_operator(namespaces=[ns]):
        await kube.create(policy("standard", ns=ns))
        await kube.create(model("ext", unique("ext"), "standard", ns=ns, routing={"mode": "roundRobin"},
                                upstream={"url": "http://10.1.2.3:8000/v1", "model": "llama", "api": "openai"}))

        async def stalled() -> dict[str, Any] | None:
            c = condition(await kube.get_or_none(API_VERSION, "deployedmodels", ns, "ext"), "Stalled") or {}
            return c if c.get("status") == "True" else None

        c = await eventually(stalled, what="InvalidSpec")
        assert c is not None and c["reason"] == "InvalidSpec"
        assert c["message"] == ("spec.routing follows the Service spec.upstream.url names "
                                "(http://NAME.NAMESPACE.svc:PORT/...), and 'http://10.1.2.3:8000/v1' names none")
        assert await kube.get_or_none("apps/v1", "deployments", ns, "ext-proxy") is None
