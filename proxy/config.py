"""The proxy's configuration file (docs/design.md#the-request-path): models, auth and limits.

The operator renders this file into a ConfigMap and the proxy reloads it when it changes;
both go through :func:`parse_config`, so there is one schema, not two.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from promptcache.proxy.domain.blocks import APIS, ENDPOINTS, Api
from promptcache.proxy.domain.nesting import TooDeep, load_yaml
from promptcache.proxy.domain.policy import CachePolicy, PolicyError, parse_decimal
from promptcache.proxy.routing import MODES, Mode

AUTH_MODES = ("apiKeys", "header")
DEFAULT_PRINCIPAL_HEADER = "x-promptcache-principal"


CACHE_SALTS = ("principal",)
"""What ``upstream.cacheSalt`` may derive the forwarded ``cache_salt`` from: the cache scope of the principal."""

EX_CONFIG = 78
"""sysexits' EX_CONFIG: how a proxy that refuses its config exits. The operator reads it off the pod, with the last
``invalid config:`` line of the log as the reason, and stalls the model instead of waiting on its rollout."""


class ConfigError(ValueError):
    """The file cannot be used; the message names the key. A running proxy keeps its last good config."""


@dataclass(frozen=True)
class Upstream:
    url: str
    model: str
    apis: tuple[Api, ...]
    """The APIs the upstream serves, each exposed on the proxy's endpoint of the same shape, with one cache scope
    (docs/design.md#one-model-on-several-apis)."""
    api_key_env: str | None = None
    forward_cache_control: bool = False
    cache_salt: str | None = None
    """``principal``: forward a ``cache_salt`` keyed on the cache scope, so the engine's KV reuse is per tenant."""
    replicas: tuple[str, ...] = ()
    """The replicas behind ``url``, each a base URL like it (docs/design.md#replica-routing); none: ``url`` alone."""
    replicas_from: str | None = None
    """``namespace/name`` of the DeployedModel whose ready endpoints the operator announces on Redis: they replace
    ``replicas`` as they come."""

    @property
    def bases(self) -> tuple[str, ...]:
        """The base URLs requests may go to: the replicas, or ``url`` when there are none."""
        return self.replicas or (self.url,)

    def endpoint(self, api: Api, base: str | None = None) -> str:
        """``base`` (default ``url``) is the base URL as OpenAI's SDK takes it (with ``/v1``) or Anthropic's
        (without): OpenAI's paths are appended to it, Anthropic's ``/v1/messages`` to it without a trailing ``/v1``."""
        base = (base or self.url).rstrip("/")
        if api == "anthropic":
            return base.removesuffix("/v1") + ENDPOINTS[api]
        return base + ENDPOINTS[api].removeprefix("/v1")


@dataclass(frozen=True)
class Routing:
    """How requests are spread over the replicas (docs/design.md#replica-routing)."""

    mode: Mode = "affinity"
    max_imbalance: float = 1.25
    """No replica takes a request while it has more than this times the average in flight (>= 1)."""


MAX_IMBALANCE = 100


@dataclass(frozen=True)
class ModelConfig:
    alias: str
    upstream: Upstream
    tokenizer: Mapping[str, Any] | None
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    policy: CachePolicy
    image_tokens: int = 0
    cache_policy: str | None = None
    """``namespace/name`` of the CachePolicy the operator rendered ``cache`` from: the proxy applies
    that policy's updates as soon as the operator publishes them on Redis, before the file catches up."""
    routing: Routing = field(default_factory=Routing)


MAX_GATE = 1_000_000
"""Bound of the classification gate's settings: beyond it a number is a typo, not a capacity."""


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    classify_deadline_seconds: float = 0.25
    upstream_timeout_seconds: float = 300.0
    classify_start_delay_seconds: float = 0.002
    """How long after the forward hashing starts: the upload goes first, and an upstream on the same
    host reads the request without competing with it (measured in bench/proxy.py)."""
    header_timeout_seconds: float = 30.0
    """A connection without a complete request head this long after it opened (or after its last response) is
    closed: aiohttp's keep-alive timeout, which also bounds idle keep-alive connections. Read at start."""
    body_timeout_seconds: float = 60.0
    """A request body not received in full this long after its head is a 408."""
    classify_concurrency: int = 4
    """Classifications run at once (the gate); 0: no gate, every request classifies as soon as it arrives."""
    max_queued_classifications: int = 1024
    """Past this many waiting for a turn, new requests are shed with 429 + Retry-After."""


@dataclass(frozen=True)
class AuthConfig:
    mode: str = "apiKeys"
    header: str = DEFAULT_PRINCIPAL_HEADER


@dataclass(frozen=True)
class ProxyConfig:
    models: Mapping[str, ModelConfig]
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: Limits = field(default_factory=Limits)
    digest: str = ""
    """SHA-256 of the file's bytes: the operator's pod-template checksum and the reload trigger."""


def load_config(path: str | Path) -> ProxyConfig:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    return parse_config(raw)


def parse_config(raw: bytes | str) -> ProxyConfig:
    data = raw.encode() if isinstance(raw, str) else raw
    try:
        doc = load_yaml(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config is not valid YAML: {exc}") from None
    except TooDeep as exc:
        raise ConfigError(f"config is {exc}") from None
    if not isinstance(doc, Mapping):
        raise ConfigError("config must be a mapping with a `models` list")
    _known(doc, {"models", "auth", "limits"}, "config")
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models must be a non-empty list")
    models: dict[str, ModelConfig] = {}
    for i, item in enumerate(models_raw):
        model = _model(item, f"models[{i}]")
        if model.alias in models:
            raise ConfigError(f"models[{i}].alias {model.alias!r} is used twice")
        models[model.alias] = model
    return ProxyConfig(
        models=models,
        auth=_auth(_section(doc, "auth")),
        limits=_limits(_section(doc, "limits")),
        digest=hashlib.sha256(data).hexdigest(),
    )


def _section(obj: Mapping[str, Any], key: str) -> Any:
    """An optional section: absent or null is empty; ``[]``, ``""`` or ``false`` are errors, not defaults."""
    value = obj.get(key)
    return {} if value is None else value


def _known(obj: Mapping[str, Any], keys: set[str], where: str) -> None:
    unknown = set(obj) - keys
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(keys)}")


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key} must be a non-empty string")
    return value


def _apis(value: Any, where: str) -> tuple[Api, ...]:
    """One API, or a list of distinct ones."""
    listed = value if isinstance(value, list) else [value]
    if not listed or any(not isinstance(api, str) or api not in APIS for api in listed):
        raise ConfigError(f"{where} must be one of {list(APIS)} or a list of them, got {_brief(value)}")
    if len(set(listed)) != len(listed):
        raise ConfigError(f"{where} lists an API twice: {listed}")
    return tuple(listed)


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _model(item: Any, where: str) -> ModelConfig:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where} must be a mapping")
    _known(item, {"alias", "upstream", "tokenizer", "pricing", "cache", "imageTokens", "cachePolicy", "routing"},
           where)
    alias = _str(item, "alias", where)
    up = item.get("upstream")
    if not isinstance(up, Mapping):
        raise ConfigError(f"{where}.upstream must be a mapping with url, model and api")
    _known(up, {"url", "model", "api", "apiKeyEnv", "forwardCacheControl", "cacheSalt", "replicas", "replicasFrom"},
           f"{where}.upstream")
    url = _url(up.get("url"), f"{where}.upstream.url")
    replicas = up.get("replicas", [])
    if not isinstance(replicas, list) or len(replicas) > MAX_REPLICAS:
        raise ConfigError(f"{where}.upstream.replicas must be a list of at most {MAX_REPLICAS} base URLs")
    bases = tuple(_url(base, f"{where}.upstream.replicas[{i}]") for i, base in enumerate(replicas))
    if len(set(bases)) != len(bases):
        raise ConfigError(f"{where}.upstream.replicas lists a URL twice")
    replicas_from = up.get("replicasFrom")
    if replicas_from is not None and (not isinstance(replicas_from, str) or replicas_from.count("/") != 1):
        raise ConfigError(f"{where}.upstream.replicasFrom must be namespace/name")
    apis = _apis(up.get("api"), f"{where}.upstream.api")
    key_env = up.get("apiKeyEnv")
    if key_env is not None and not isinstance(key_env, str):
        raise ConfigError(f"{where}.upstream.apiKeyEnv must be a string")
    forward = up.get("forwardCacheControl", False)
    if not isinstance(forward, bool):
        raise ConfigError(f"{where}.upstream.forwardCacheControl must be true or false")
    salt = up.get("cacheSalt")
    if salt is not None and salt not in CACHE_SALTS:
        raise ConfigError(f"{where}.upstream.cacheSalt must be one of {list(CACHE_SALTS)} or absent, got {salt!r}")
    tokenizer = item.get("tokenizer")
    if tokenizer is not None:
        _tokenizer(tokenizer, f"{where}.tokenizer")
    pricing = item.get("pricing")
    if not isinstance(pricing, Mapping):
        raise ConfigError(f"{where}.pricing must be a mapping with inputPerMTok and outputPerMTok")
    _known(pricing, {"inputPerMTok", "outputPerMTok"}, f"{where}.pricing")
    prices = []
    for key in ("inputPerMTok", "outputPerMTok"):
        try:
            price = parse_decimal(pricing.get(key), f"{where}.pricing.{key}")
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None
        if price < 0:
            raise ConfigError(f"{where}.pricing.{key} must not be negative, got {pricing.get(key)!r}")
        prices.append(price)
    try:
        policy = CachePolicy.from_spec(_section(item, "cache"))
    except PolicyError as exc:
        raise ConfigError(f"{where}.cache: {exc}") from None
    image_tokens = item.get("imageTokens", 0)
    if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens < 0:
        raise ConfigError(f"{where}.imageTokens must be a non-negative integer")
    cache_policy = item.get("cachePolicy")
    if cache_policy is not None and (not isinstance(cache_policy, str) or cache_policy.count("/") != 1):
        raise ConfigError(f"{where}.cachePolicy must be namespace/name")
    return ModelConfig(
        alias=alias,
        upstream=Upstream(url, _str(up, "model", f"{where}.upstream"), apis, key_env, forward, salt, bases,
                          replicas_from),
        tokenizer=tokenizer,
        input_per_mtok=prices[0],
        output_per_mtok=prices[1],
        policy=policy,
        image_tokens=image_tokens,
        cache_policy=cache_policy,
        routing=_routing(_section(item, "routing"), f"{where}.routing"),
    )


MAX_REPLICAS = 1024
"""More replicas than this behind one model is a typo (or a Service to route through as a whole)."""


def _url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ConfigError(f"{where} must be an http(s) URL, got {_brief(value)}")
    return value


def _routing(raw: Any, where: str) -> Routing:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping with mode and maxImbalance")
    _known(raw, {"mode", "maxImbalance"}, where)
    mode = raw.get("mode", "affinity")
    if mode not in MODES:
        raise ConfigError(f"{where}.mode must be one of {list(MODES)}, got {_brief(mode)}")
    try:
        imbalance = parse_decimal(raw.get("maxImbalance", str(Routing.max_imbalance)), f"{where}.maxImbalance")
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    if not 1 <= imbalance <= MAX_IMBALANCE:
        raise ConfigError(f"{where}.maxImbalance must be from 1 to {MAX_IMBALANCE}, got {_brief(raw['maxImbalance'])}")
    return Routing(mode, float(imbalance))


def _tokenizer(raw: Any, where: str) -> None:
    """The shape only; loading the vocabulary is the runtime's (``Runtimes.load``), which refuses the config if it
    cannot."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping (type: tiktoken|huggingface|gguf)")
    kind = raw.get("type")
    if kind == "tiktoken":
        _known(raw, {"type", "encoding", "path"}, where)
        _str(raw, "encoding", where)
        if "path" in raw:
            _str(raw, "path", where)
    elif kind in ("huggingface", "gguf"):
        _known(raw, {"type", "path"}, where)
        _str(raw, "path", where)
    else:
        raise ConfigError(f"{where}.type must be tiktoken, huggingface or gguf, got {kind!r}")


def _auth(raw: Any) -> AuthConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError("auth must be a mapping")
    _known(raw, {"mode", "header"}, "auth")
    mode = raw.get("mode", "apiKeys")
    if mode not in AUTH_MODES:
        raise ConfigError(f"auth.mode must be one of {list(AUTH_MODES)}, got {mode!r}")
    header = raw.get("header", DEFAULT_PRINCIPAL_HEADER)
    if not isinstance(header, str) or not header:
        raise ConfigError("auth.header must be a header name")
    return AuthConfig(mode, header.lower())


def _limits(raw: Any) -> Limits:
    if not isinstance(raw, Mapping):
        raise ConfigError("limits must be a mapping")
    _known(raw, {"maxBodyBytes", "classifyDeadlineSeconds", "upstreamTimeoutSeconds", "classifyStartDelaySeconds",
                 "headerTimeoutSeconds", "bodyTimeoutSeconds", "classifyConcurrency", "maxQueuedClassifications"},
           "limits")
    defaults = Limits()
    body = raw.get("maxBodyBytes", defaults.max_body_bytes)
    if isinstance(body, bool) or not isinstance(body, int) or body < 1024:
        raise ConfigError("limits.maxBodyBytes must be an integer >= 1024")
    values = []
    for key, default in (("classifyDeadlineSeconds", defaults.classify_deadline_seconds),
                         ("upstreamTimeoutSeconds", defaults.upstream_timeout_seconds),
                         ("headerTimeoutSeconds", defaults.header_timeout_seconds),
                         ("bodyTimeoutSeconds", defaults.body_timeout_seconds)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"limits.{key} must be a positive number of seconds")
        values.append(float(value))
    delay = raw.get("classifyStartDelaySeconds", defaults.classify_start_delay_seconds)
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 < delay < values[0]:
        raise ConfigError("limits.classifyStartDelaySeconds must be a positive number of seconds, less than "
                          "classifyDeadlineSeconds")
    counts = []
    for key, default, low in (("classifyConcurrency", defaults.classify_concurrency, 0),
                              ("maxQueuedClassifications", defaults.max_queued_classifications, 1)):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_GATE:
            raise ConfigError(f"limits.{key} must be an integer from {low} to {MAX_GATE}")
        counts.append(value)
    return Limits(body, values[0], values[1], float(delay), values[2], values[3], counts[0], counts[1])
