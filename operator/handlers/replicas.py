"""docs/design.md#replica-routing: a routed model's upstream Service, followed through its EndpointSlices.

With ``spec.routing`` set, ``upstream.url`` names a Service in the cluster. The operator turns the ready endpoints of
its EndpointSlices into replica base URLs (the URL's scheme and path, each endpoint's address and the port the
Service's port maps to), announces them on Redis, where the model's proxies follow them within a second, and shows
them in ``status.replicas``. They stay out of the rendered config: a scale-up must not roll the proxies.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import kopf
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from promptcache.operator.constants import MODELS
from promptcache.operator.errors import SpecError
from promptcache.operator.handlers.kube import Kube
from promptcache.proxy import policybus

SLICE_ADDRESS_TYPES = ("IPv4", "IPv6")


@dataclass(frozen=True)
class ServiceRef:
    """The Service ``upstream.url`` names, and how to call one of its endpoints like it."""

    namespace: str
    name: str
    port: int
    scheme: str
    path: str


def service_ref(url: str, namespace: str) -> ServiceRef:
    """The Service of ``http(s)://NAME[.NAMESPACE[.svc[.DOMAIN]]][:PORT]/PATH``, a bare name being in ``namespace``;
    SpecError for anything else (an IP, a name outside the cluster)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        host = ""
    labels = host.split(".") if host else []
    if not labels or (len(labels) > 2 and labels[2] != "svc"):
        raise SpecError("InvalidSpec", f"spec.routing follows the Service spec.upstream.url names "
                                       f"(http://NAME.NAMESPACE.svc:PORT/...), and {url!r} names none")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise SpecError("InvalidSpec", f"spec.upstream.url has an invalid port: {url!r}") from None
    return ServiceRef(labels[1] if len(labels) > 1 else namespace, labels[0], port, parts.scheme,
                      parts.path.rstrip("/"))


def routed(namespace: str, spec: Mapping[str, Any]) -> ServiceRef | None:
    """The Service a model follows, when it routes; None when it does not. SpecError for routing in sidecar mode
    (each proxy has one server, its own) or over a URL that names no Service."""
    if not spec.get("routing"):
        return None
    if spec.get("server"):
        raise SpecError("InvalidSpec", "spec.routing needs gateway mode: a sidecar proxy has one server, its own")
    url = (spec.get("upstream") or {}).get("url")
    return service_ref(url if isinstance(url, str) else "", namespace)


def by_service(namespace: str, name: str, spec: Mapping[str, Any]) -> dict[tuple[str, str], tuple[str, str]] | None:
    """The index entry of a routed model: its Service, to the model (a bad spec indexes nothing; its reconcile
    stalls it)."""
    try:
        ref = routed(namespace, spec)
    except SpecError:
        return None
    return None if ref is None else {(ref.namespace, ref.name): (namespace, name)}


def ready_urls(ref: ServiceRef, service: Mapping[str, Any] | None, slices: Iterable[Mapping[str, Any]]) -> list[str]:
    """The base URL of each ready endpoint serving the URL's Service port, sorted. None without the Service (its
    port's name is what picks the endpoint port), or for a port the Service does not have."""
    ports = ((service or {}).get("spec") or {}).get("ports") or []
    wanted = next((p for p in ports if isinstance(p, Mapping) and p.get("port") == ref.port), None)
    if wanted is None:
        return []
    name = wanted.get("name") or ""
    urls: set[str] = set()
    for piece in slices:
        if piece.get("addressType") not in SLICE_ADDRESS_TYPES:
            continue
        target = next((p.get("port") for p in piece.get("ports") or []
                       if isinstance(p, Mapping) and (p.get("name") or "") == name), None)
        if not isinstance(target, int):
            continue
        for endpoint in piece.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            addresses = endpoint.get("addresses") or []
            # Kubernetes: a ready condition left out means ready; a terminating endpoint is not.
            if conditions.get("ready") is False or conditions.get("terminating") is True or not addresses:
                continue
            host = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
            urls.add(f"{ref.scheme}://{host}:{target}{ref.path}")
    return sorted(urls)


async def follow(kube: Kube, redis: aioredis.Redis | None, prefix: str, namespace: str, name: str,
                 ref: ServiceRef, slices: Iterable[Mapping[str, Any]]) -> list[str]:
    """The model's replicas now, announced to its proxies (a Redis outage leaves them on their last list until the
    next change or reconcile announces again)."""
    urls = ready_urls(ref, await kube.service(ref.namespace, ref.name), slices)
    if redis is not None:
        with contextlib.suppress(RedisError, OSError):
            await policybus.publish_replicas(redis, prefix, f"{namespace}/{name}", urls)
    return urls


async def endpoints_changed(service: tuple[str, str], models: Iterable[tuple[str, str]],
                            slices: Iterable[Mapping[str, Any]], kube: Kube, redis: aioredis.Redis | None,
                            prefix: str) -> None:
    """Every model routed over ``service`` (namespace, name) follows its endpoints; status and an event on change."""
    for namespace, name in models:
        model = await kube.get_resource(MODELS, namespace, name)
        if model is None:
            continue
        ref = routed(namespace, model.get("spec") or {})
        if ref is None or (ref.namespace, ref.name) != service:
            continue
        urls = await follow(kube, redis, prefix, namespace, name, ref, slices)
        if ((model.get("status") or {}).get("replicas")) != urls:
            await kube.patch_resource_status(MODELS, namespace, name, {"replicas": urls})
            kopf.event(kopf.Body(model), type="Normal", reason="ReplicasChanged",  # type: ignore[arg-type]
                       message=f"{len(urls)} ready endpoints of Service {ref.namespace}/{ref.name}")
