"""A routed model's replicas from its upstream Service's EndpointSlices (docs/design.md#replica-routing): which
URL names which Service, which endpoints are ready, and the config the proxies get."""

from __future__ import annotations

from typing import Any

import pytest

from promptcache.operator.errors import SpecError
from promptcache.operator.handlers.render import render
from promptcache.operator.handlers.replicas import ServiceRef, by_service, ready_urls, routed, service_ref

from support.resources import model, policy


@pytest.mark.parametrize(("url", "ref"), [
    ("http://vllm:8000/v1", ServiceRef("home", "vllm", 8000, "http", "/v1")),
    ("http://vllm.models/v1/", ServiceRef("models", "vllm", 80, "http", "/v1")),
    ("https://vllm.models.svc/", ServiceRef("models", "vllm", 443, "https", "")),
    ("http://vllm.models.svc.cluster.local:8080", ServiceRef("models", "vllm", 8080, "http", "")),
])
def test_a_url_names_its_service(url: str, ref: ServiceRef) -> None:
    assert service_ref(url, "home") == ref


@pytest.mark.parametrize("url", ["http://10.0.0.7:8000/v1", "http://[fd00::1]:80/v1", "https://api.example.com/v1",
                                 "http://vllm.models.cluster.local/v1", "http://vllm:99999/v1", ""])
def test_a_url_that_names_no_service_is_an_invalid_spec(url: str) -> None:
    with pytest.raises(SpecError) as caught:
        service_ref(url, "home")
    assert caught.value.reason == "InvalidSpec" and "spec." in str(caught.value)


def service(*ports: dict[str, Any]) -> dict[str, Any]:
    return {"spec": {"ports": list(ports)}}


def piece(ports: list[dict[str, Any]], *endpoints: dict[str, Any], kind: str = "IPv4") -> dict[str, Any]:
    return {"addressType": kind, "ports": ports, "endpoints": list(endpoints)}


def endpoint(address: str, **conditions: bool) -> dict[str, Any]:
    return {"addresses": [address], "conditions": conditions}


REF = ServiceRef("models", "vllm", 8000, "http", "/v1")


def test_ready_endpoints_of_the_urls_port_become_replicas() -> None:
    svc = service({"name": "metrics", "port": 9090}, {"name": "http", "port": 8000, "targetPort": "serve"})
    slices = [
        piece([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9090}],
              endpoint("10.0.0.2", ready=True), endpoint("10.0.0.1"),  # no ready condition: ready
              endpoint("10.0.0.3", ready=False), endpoint("10.0.0.4", ready=True, terminating=True)),
        piece([{"name": "http", "port": 8080}], endpoint("fd00::5", ready=True), kind="IPv6"),
        piece([{"name": "http", "port": 8080}], endpoint("vllm.example.com"), kind="FQDN"),
        piece([{"name": "metrics", "port": 9090}], endpoint("10.0.0.6")),  # not serving the URL's port
        {"addressType": "IPv4", "endpoints": [{"addresses": []}], "ports": [{"name": "http", "port": 8080}]},
    ]
    assert ready_urls(REF, svc, slices) == [
        "http://10.0.0.1:8080/v1", "http://10.0.0.2:8080/v1", "http://[fd00::5]:8080/v1"]


def test_an_unnamed_port_and_the_absent_cases() -> None:
    slices = [piece([{"port": 8000}], endpoint("10.0.0.1"))]
    assert ready_urls(REF, service({"port": 8000}), slices) == ["http://10.0.0.1:8000/v1"]
    assert ready_urls(REF, None, slices) == []  # no Service (yet): nothing to map the port by
    assert ready_urls(REF, service({"port": 9000}), slices) == []  # the URL's port is not the Service's
    assert ready_urls(REF, service({"port": 8000}), []) == []


def test_only_a_gateway_with_routing_follows_a_service() -> None:
    spec = model("m", "llama", "p", ns="llm")["spec"]
    assert routed("llm", spec) is None and by_service("llm", "m", spec) is None
    spec["routing"] = {"mode": "affinity"}
    assert routed("llm", spec) == ServiceRef("llm", "vllm", 8000, "http", "/v1")
    assert by_service("ml", "m", spec) == {("llm", "vllm"): ("ml", "m")}
    spec["server"] = {"name": "vllm", "image": "vllm", "ports": [{"containerPort": 8000}]}
    with pytest.raises(SpecError, match=r"spec\.routing needs gateway mode"):
        routed("llm", spec)
    assert by_service("llm", "m", spec) is None


def test_the_rendered_config_routes_and_follows_the_announced_replicas() -> None:
    spec = model("m", "llama", "p", ns="llm", routing={"mode": "roundRobin", "maxImbalance": "1.5"})["spec"]
    upstream = render("llm", "m", spec, "p", policy("p", ns="llm")["spec"]).config.models["llama"]
    assert (upstream.routing.mode, upstream.routing.max_imbalance) == ("roundRobin", 1.5)
    assert (upstream.upstream.replicas_from, upstream.upstream.bases) == ("llm/m", ("http://vllm.llm.svc:8000/v1",))
    spec["routing"] = {"mode": "sticky"}  # what an API server without the schema would let through
    with pytest.raises(SpecError, match=r"routing\.mode must be one of"):
        render("llm", "m", spec, "p", policy("p", ns="llm")["spec"])
