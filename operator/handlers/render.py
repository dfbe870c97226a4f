"""DeployedModel + CachePolicy → the proxy's config file (docs/design.md#the-request-path, #reconciliation).

The rendered YAML is checked with the proxy's own loader before anything is applied, so the
operator and the proxy share one schema and an invalid combination becomes a ``Stalled``
condition instead of a crash-looping pod.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from promptcache.operator.constants import VOLUME_SOURCES
from promptcache.operator.errors import SpecError
from promptcache.proxy.config import ConfigError, ProxyConfig, parse_config

CONFIG_DIR = "/etc/promptcache"
CONFIG_FILE = "proxy.yaml"
TOKENIZER_DIR = "/etc/promptcache/tokenizer"
UPSTREAM_KEY_ENV = "PROMPTCACHE_UPSTREAM_API_KEY"
DEFAULT_TOKENIZER_KEYS = {"huggingface": "tokenizer.json", "tiktoken": "encoding.tiktoken"}


@dataclass(frozen=True)
class Rendered:
    yaml: str
    config: ProxyConfig
    checksum: str
    sidecar: bool
    upstream_url: str


def policy_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def sidecar_url(spec: Mapping[str, Any]) -> str:
    """In sidecar mode the proxy talks to the server container over the pod's loopback."""
    server = spec.get("server") or {}
    ports = server.get("ports") or []
    port = ports[0].get("containerPort") if ports and isinstance(ports[0], Mapping) else None
    if not isinstance(port, int):
        raise SpecError("InvalidSpec", "spec.server.ports[0].containerPort is needed to reach the sidecar server")
    return f"http://127.0.0.1:{port}/v1"  # the proxy drops the /v1 again for Anthropic's paths


def tokenizer_volume(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pod volume source of ``spec.tokenizer`` (its ConfigMap or ``volume``), checked as the CRD does, for an
    API server that did not."""
    tokenizer = spec.get("tokenizer") or {}
    ref, volume = tokenizer.get("configMapRef"), tokenizer.get("volume")
    if ref is not None:
        return {"configMap": {"name": ref["name"]}}
    if volume is None:
        return None
    if not isinstance(volume, Mapping) or len(volume) != 1 or next(iter(volume)) not in VOLUME_SOURCES \
            or not isinstance(next(iter(volume.values())), Mapping):
        raise SpecError("InvalidSpec", "spec.tokenizer.volume must be exactly one volume source "
                                       f"({', '.join(VOLUME_SOURCES)}), as in a Pod's volumes[] without the name")
    return dict(volume)


def _tokenizer(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec.tokenizer`` as the proxy's config takes it: a file source becomes the path it is mounted at."""
    raw = spec.get("tokenizer") or {}
    tokenizer = {k: v for k, v in raw.items() if k not in ("configMapRef", "volume", "path")}
    ref, inner = raw.get("configMapRef"), raw.get("path")
    if tokenizer_volume(spec) is None:
        return tokenizer
    if ref is not None:
        kind = tokenizer.get("type", "huggingface")
        tokenizer["path"] = f"{TOKENIZER_DIR}/{ref.get('key') or DEFAULT_TOKENIZER_KEYS.get(kind, 'tokenizer.json')}"
    else:
        if not isinstance(inner, str) or not inner or inner.startswith("/") or \
                any(part in ("", ".", "..") for part in inner.split("/")):
            raise SpecError("InvalidSpec", "spec.tokenizer.path must be a relative path inside the volume "
                                           "(no leading /, no empty, . or .. segments)")
        tokenizer["path"] = f"{TOKENIZER_DIR}/{inner}"
    return tokenizer


def upstream_apis(upstream: Mapping[str, Any]) -> Any:
    """``upstream.api`` (one API) or ``upstream.apis`` (several), exactly one of them, as the proxy's ``api`` takes
    it; checked here too for an API server that did not enforce the CRD's rule."""
    one, several = upstream.get("api"), upstream.get("apis")
    if (one is None) == (several is None):
        raise SpecError("InvalidSpec",
                        "set exactly one of spec.upstream.api (one API) and spec.upstream.apis (several)")
    return one if several is None else several  # the proxy's loader judges the values


def render(namespace: str, name: str, spec: Mapping[str, Any], policy_name: str,
           policy: Mapping[str, Any]) -> Rendered:
    """The proxy config for DeployedModel ``namespace/name`` under its CachePolicy, validated by the proxy's
    loader."""
    upstream = dict(spec.get("upstream") or {})
    sidecar = bool(spec.get("server"))
    url = sidecar_url(spec) if sidecar else upstream.get("url")
    tokenizer = _tokenizer(spec)
    model: dict[str, Any] = {
        "alias": spec.get("alias"),
        "upstream": {
            "url": url,
            "model": upstream.get("model"),
            "api": upstream_apis(upstream),
            "forwardCacheControl": bool(upstream.get("forwardCacheControl", False)),
        },
        "tokenizer": tokenizer,
        "pricing": dict(spec.get("pricing") or {}),
        "cache": {k: v for k, v in policy.items() if k != "redis"},
        "cachePolicy": policy_key(namespace, policy_name),
        "imageTokens": spec.get("imageTokens", 0),
    }
    if upstream.get("apiKeySecretRef"):
        model["upstream"]["apiKeyEnv"] = UPSTREAM_KEY_ENV
    if upstream.get("cacheSalt") is not None:
        model["upstream"]["cacheSalt"] = upstream["cacheSalt"]
    routing = spec.get("routing")
    if routing is not None:  # the replicas come from Redis (docs/design.md#replica-routing), not the file
        model["routing"] = dict(routing) if isinstance(routing, Mapping) else routing
        model["upstream"]["replicasFrom"] = policy_key(namespace, name)
    document: dict[str, Any] = {"models": [model]}
    auth = (spec.get("proxy") or {}).get("auth")
    if auth is not None:  # the proxy's loader judges it; absent, the config stays as it was (no rollout)
        document["auth"] = dict(auth) if isinstance(auth, Mapping) else auth
    text = yaml.safe_dump(document, sort_keys=True)
    try:
        config = parse_config(text)
    except ConfigError as exc:
        raise SpecError("InvalidSpec", str(exc)) from None
    return Rendered(text, config, hashlib.sha256(text.encode()).hexdigest(), sidecar, str(url))
