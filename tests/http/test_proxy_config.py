"""The proxy config loader (docs/design.md#the-request-path): every malformed file is refused with the key named; good
files parse whole."""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from promptcache.proxy.config import (
    AuthConfig,
    ConfigError,
    Limits,
    ProxyConfig,
    Routing,
    load_config,
    parse_config,
)
from promptcache.proxy.domain.policy import CachePolicy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "proxy-config.yaml"
DELETE = object()


def minimal() -> dict[str, Any]:
    return {"models": [{
        "alias": "chat",
        "upstream": {"url": "http://upstream:8000/v1", "model": "m", "api": "openai"},
        "pricing": {"inputPerMTok": "3.00", "outputPerMTok": "15.00"},
    }]}


def edited(path: str, value: Any) -> dict[str, Any]:
    """The minimal config with the value at a dotted path (list indexes as numbers) set or deleted."""
    config = minimal()
    *parents, last = path.split(".")
    node: Any = config
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return config


def fails(config: Any, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_config(config if isinstance(config, str) else yaml.safe_dump(config))


# (path, value, what the message must say); each message names the offending key.
MALFORMED: list[tuple[str, Any, str]] = [
    # models
    ("models", DELETE, "models must be a non-empty list"),
    ("models", [], "models must be a non-empty list"),
    ("models", {"chat": {}}, "models must be a non-empty list"),
    ("models.0", "chat", "models[0] must be a mapping"),
    ("models.0.alias", DELETE, "models[0].alias must be a non-empty string"),
    ("models.0.alias", 7, "models[0].alias must be a non-empty string"),
    # upstream
    ("models.0.upstream", DELETE, "models[0].upstream must be a mapping"),
    ("models.0.upstream", "http://upstream", "models[0].upstream must be a mapping"),
    ("models.0.upstream.url", DELETE, "models[0].upstream.url must be an http(s) URL, got None"),
    ("models.0.upstream.replicas", "http://a/v1", "models[0].upstream.replicas must be a list of at most 1024"),
    ("models.0.upstream.replicas", ["http://a/v1"] * 1025, "models[0].upstream.replicas must be a list of at most"),
    ("models.0.upstream.replicas", ["http://a/v1", 7], "models[0].upstream.replicas[1] must be an http(s) URL, got 7"),
    ("models.0.upstream.replicas", ["http://a/v1", "http://a/v1"], "models[0].upstream.replicas lists a URL twice"),
    ("models.0.routing", "affinity", "models[0].routing must be a mapping with mode and maxImbalance"),
    ("models.0.routing", {"mode": "sticky"},
     "models[0].routing.mode must be one of ['affinity', 'roundRobin', 'random'], got 'sticky'"),
    ("models.0.routing", {"weights": 1}, "models[0].routing: unknown keys ['weights']"),
    ("models.0.routing", {"maxImbalance": "0.9"}, "models[0].routing.maxImbalance must be from 1 to 100, got '0.9'"),
    ("models.0.routing", {"maxImbalance": "1e999"}, "models[0].routing.maxImbalance must be from 1 to 100"),
    ("models.0.routing", {"maxImbalance": True}, "models[0].routing.maxImbalance must be a decimal string"),
    ("models.0.routing", {"maxImbalance": "NaN"}, "models[0].routing.maxImbalance must be finite"),
    ("models.0.upstream.url", "ftp://upstream/v1", "models[0].upstream.url must be an http(s) URL"),
    ("models.0.upstream.url", "upstream:8000/v1", "models[0].upstream.url must be an http(s) URL"),
    ("models.0.upstream.api", "grpc",
     "models[0].upstream.api must be one of ['openai', 'anthropic', 'openai-responses'] or a list of them, got 'grpc'"),
    ("models.0.upstream.api", [], "models[0].upstream.api must be one of"),
    ("models.0.upstream.api", ["openai", "grpc"], "models[0].upstream.api must be one of"),
    ("models.0.upstream.api", ["openai", {"x": 1}], "models[0].upstream.api must be one of"),
    ("models.0.upstream.api", ["openai", "openai"], "models[0].upstream.api lists an API twice: ['openai', 'openai']"),
    ("models.0.upstream.api", DELETE, "models[0].upstream.api must be one of"),
    ("models.0.upstream.api", "OpenAI", "models[0].upstream.api must be one of"),
    ("models.0.upstream.model", DELETE, "models[0].upstream.model must be a non-empty string"),
    ("models.0.upstream.model", "", "models[0].upstream.model must be a non-empty string"),
    ("models.0.upstream.apiKeyEnv", 5, "models[0].upstream.apiKeyEnv must be a string"),
    ("models.0.upstream.forwardCacheControl", "yes", "models[0].upstream.forwardCacheControl must be true or false"),
    ("models.0.upstream.cacheSalt", "tenant", "models[0].upstream.cacheSalt must be one of ['principal'] or absent"),
    # tokenizer (its shape; whether it loads is decided at run time)
    ("models.0.tokenizer", "tiktoken", "models[0].tokenizer must be a mapping"),
    ("models.0.tokenizer", {"type": "sentencepiece", "path": "/t"}, "models[0].tokenizer.type must be tiktoken, "
                                                                     "huggingface or gguf, got 'sentencepiece'"),
    ("models.0.tokenizer", {"path": "/t"}, "models[0].tokenizer.type"),
    ("models.0.tokenizer", {"type": "tiktoken"}, "models[0].tokenizer.encoding must be a non-empty string"),
    ("models.0.tokenizer", {"type": "tiktoken", "encoding": "cl100k_base", "path": 3},
     "models[0].tokenizer.path must be a non-empty string"),
    ("models.0.tokenizer", {"type": "huggingface"}, "models[0].tokenizer.path must be a non-empty string"),
    ("models.0.tokenizer", {"type": "huggingface", "path": "/t", "encoding": "x"}, "models[0].tokenizer: unknown keys "
                                                                                   "['encoding']"),
    # pricing
    ("models.0.pricing", DELETE, "models[0].pricing must be a mapping"),
    ("models.0.pricing", ["3", "15"], "models[0].pricing must be a mapping"),
    ("models.0.pricing.inputPerMTok", DELETE, "models[0].pricing.inputPerMTok must be a decimal string"),
    ("models.0.pricing.outputPerMTok", "cheap", "models[0].pricing.outputPerMTok must be a decimal string"),
    ("models.0.pricing.inputPerMTok", True, "models[0].pricing.inputPerMTok must be a decimal string"),
    ("models.0.pricing.inputPerMTok", [3], "models[0].pricing.inputPerMTok must be a decimal string"),
    ("models.0.pricing.inputPerMTok", "NaN", "models[0].pricing.inputPerMTok must be finite"),
    ("models.0.pricing.outputPerMTok", "Infinity", "models[0].pricing.outputPerMTok must be finite"),
    ("models.0.pricing.inputPerMTok", "-0.01", "models[0].pricing.inputPerMTok must not be negative"),
    ("models.0.pricing.outputPerMTok", -1, "models[0].pricing.outputPerMTok must not be negative"),
    # cache policy
    ("models.0.cache", ["5m"], "models[0].cache: cache policy must be a mapping"),
    ("models.0.cache", False, "models[0].cache: cache policy must be a mapping"),
    ("models.0.cache.enabledTtls", [], "models[0].cache: enabledTtls must name at least one tier"),
    ("models.0.cache.enabledTtls", ["5m", "2h"], "models[0].cache: enabledTtls has unknown tiers ['2h']"),
    ("models.0.cache.enabledTtls", "5m", "models[0].cache: enabledTtls must be a list"),
    ("models.0.cache", {"enabledTtls": ["5m"], "defaultTtl": "1h"}, "models[0].cache: defaultTtl '1h' is not one of "
                                                                    "enabledTtls"),
    ("models.0.cache.writeMultipliers", {"2h": "1.5"}, "models[0].cache: writeMultipliers has unknown tiers"),
    ("models.0.cache.writeMultipliers", {"5m": "100"}, "models[0].cache: writeMultipliers.5m must be in [0, 100)"),
    ("models.0.cache.writeMultipliers", "1.25", "models[0].cache: writeMultipliers must be a mapping"),
    ("models.0.cache.readMultiplier", "-0.1", "models[0].cache: readMultiplier must be in [0, 100)"),
    ("models.0.cache.readMultiplier", "a tenth", "models[0].cache: readMultiplier must be a decimal string"),
    ("models.0.cache.minPrefixTokens", -1, "models[0].cache: minPrefixTokens must be an integer >= 0"),
    ("models.0.cache.minPrefixTokens", 10.5, "models[0].cache: minPrefixTokens must be an integer"),
    ("models.0.cache.maxBreakpoints", 0, "models[0].cache: maxBreakpoints must be an integer >= 1"),
    ("models.0.cache.lookbackBlocks", True, "models[0].cache: lookbackBlocks must be an integer >= 1"),
    ("models.0.cache.automatic", {"mode": "always"}, "models[0].cache: automatic.mode 'always' is not one of"),
    ("models.0.cache.automatic", "lastBlock", "models[0].cache: automatic must be a mapping"),
    ("models.0.cache.automatic", [], "models[0].cache: automatic must be a mapping"),
    ("models.0.cache.automatic", {"mode": False}, "models[0].cache: automatic.mode False is not one of"),
    ("models.0.cache.automatic", {"mode": "lastBlock", "tier": "5m"}, "models[0].cache: automatic: unknown keys "
                                                                      "['tier']"),
    ("models.0.cache", {"enabledTtls": ["5m"], "automatic": {"mode": "lastBlock", "ttl": "1h"}},
     "models[0].cache: automatic.ttl '1h' is not one of enabledTtls"),
    ("models.0.cache.ignorePrefixes", "nonce:", "models[0].cache: ignorePrefixes must be a list of non-empty strings"),
    ("models.0.cache.ignorePrefixes", [""], "models[0].cache: ignorePrefixes must be a list of non-empty strings"),
    # imageTokens
    ("models.0.imageTokens", -1, "models[0].imageTokens must be a non-negative integer"),
    ("models.0.imageTokens", "85", "models[0].imageTokens must be a non-negative integer"),
    ("models.0.imageTokens", True, "models[0].imageTokens must be a non-negative integer"),
    # unknown keys, at every level
    ("modles", [], "config: unknown keys ['modles']"),
    ("models.0.aliases", ["c"], "models[0]: unknown keys ['aliases']"),
    ("models.0.upstream.timeout", 5, "models[0].upstream: unknown keys ['timeout']"),
    ("models.0.pricing.cachedPerMTok", "0.3", "models[0].pricing: unknown keys ['cachedPerMTok']"),
    ("models.0.cache.ttl", "5m", "models[0].cache: unknown cache policy keys ['ttl']"),
    ("auth.token", "x", "auth: unknown keys ['token']"),
    ("limits.maxTokens", 5, "limits: unknown keys ['maxTokens']"),
    # limits
    ("limits", [], "limits must be a mapping"),
    ("limits", "10MB", "limits must be a mapping"),
    ("limits.maxBodyBytes", 1023, "limits.maxBodyBytes must be an integer >= 1024"),
    ("limits.maxBodyBytes", "10MB", "limits.maxBodyBytes must be an integer >= 1024"),
    ("limits.maxBodyBytes", True, "limits.maxBodyBytes must be an integer >= 1024"),
    ("limits.classifyDeadlineSeconds", 0, "limits.classifyDeadlineSeconds must be a positive number of seconds"),
    ("limits.classifyDeadlineSeconds", "fast", "limits.classifyDeadlineSeconds must be a positive number"),
    ("limits.upstreamTimeoutSeconds", -5, "limits.upstreamTimeoutSeconds must be a positive number of seconds"),
    ("limits.upstreamTimeoutSeconds", False, "limits.upstreamTimeoutSeconds must be a positive number"),
    ("limits.classifyStartDelaySeconds", 0, "limits.classifyStartDelaySeconds must be a positive number of seconds"),
    ("limits.headerTimeoutSeconds", 0, "limits.headerTimeoutSeconds must be a positive number of seconds"),
    ("limits.bodyTimeoutSeconds", "1m", "limits.bodyTimeoutSeconds must be a positive number of seconds"),
    ("limits.classifyStartDelaySeconds", "2ms", "limits.classifyStartDelaySeconds must be a positive number"),
    ("limits.classifyStartDelaySeconds", True, "limits.classifyStartDelaySeconds must be a positive number"),
    ("limits.classifyConcurrency", -1, "limits.classifyConcurrency must be an integer from 0 to 1000000"),
    ("limits.classifyConcurrency", 2.5, "limits.classifyConcurrency must be an integer from 0 to 1000000"),
    ("limits.classifyConcurrency", True, "limits.classifyConcurrency must be an integer from 0 to 1000000"),
    ("limits.classifyConcurrency", 10**400, "limits.classifyConcurrency must be an integer from 0 to 1000000"),
    ("limits.maxQueuedClassifications", 0, "limits.maxQueuedClassifications must be an integer from 1 to 1000000"),
    ("limits.maxQueuedClassifications", "many",
     "limits.maxQueuedClassifications must be an integer from 1 to 1000000"),
    ("limits.classifyStartDelaySeconds", 0.25, "less than classifyDeadlineSeconds"),
    # auth
    ("auth", "header", "auth must be a mapping"),
    ("auth", False, "auth must be a mapping"),
    ("auth.mode", "oauth", "auth.mode must be one of ['apiKeys', 'header'], got 'oauth'"),
    ("auth.mode", "apikeys", "auth.mode must be one of ['apiKeys', 'header']"),
    ("auth", {"mode": "header", "header": ""}, "auth.header must be a header name"),
    ("auth", {"mode": "header", "header": 5}, "auth.header must be a header name"),
]


@pytest.mark.parametrize(("path", "value", "fragment"), MALFORMED,
                         ids=[f"{p}={v!r}"[:60] for p, v, _ in MALFORMED])
def test_malformed_config_names_the_key(path: str, value: Any, fragment: str) -> None:
    fails(edited(path, value), fragment)


def test_malformed_documents() -> None:
    fails("models: [ {alias: chat", "config is not valid YAML")
    fails("- alias: chat\n", "config must be a mapping with a `models` list")
    fails("", "config must be a mapping")
    fails("just text", "config must be a mapping")
    fails(b"\xff\xfe\x00models".decode("latin-1"), "config")


def test_duplicate_alias_names_the_second_model() -> None:
    config = minimal()
    config["models"].append(copy.deepcopy(config["models"][0]))
    config["models"][1]["upstream"]["api"] = "anthropic"
    fails(config, "models[1].alias 'chat' is used twice")


def test_errors_in_a_later_model_name_its_index() -> None:
    config = minimal()
    second = copy.deepcopy(config["models"][0])
    second["alias"] = "other"
    second["pricing"]["outputPerMTok"] = "-2"
    config["models"].append(second)
    fails(config, "models[1].pricing.outputPerMTok must not be negative")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_minimal_config_takes_the_defaults() -> None:
    raw = yaml.safe_dump(minimal()) + "auth:\nlimits:\n"
    config = parse_config(raw)
    assert isinstance(config, ProxyConfig)
    assert config.auth == AuthConfig("apiKeys", "x-promptcache-principal")
    assert config.limits == Limits(10 * 1024 * 1024, 0.25, 300.0, 0.002, 30.0, 60.0, 4, 1024)
    assert config.digest == hashlib.sha256(raw.encode()).hexdigest()
    model = config.models["chat"]
    assert model.tokenizer is None and model.image_tokens == 0
    assert model.upstream.api_key_env is None and model.upstream.forward_cache_control is False
    assert model.policy == CachePolicy()
    assert model.upstream.apis == ("openai",)
    assert model.upstream.endpoint("openai") == "http://upstream:8000/v1/chat/completions"


FULL = """
auth: {mode: header, header: X-Tenant-ID}
limits: {maxBodyBytes: 2048, classifyDeadlineSeconds: 0.5, upstreamTimeoutSeconds: 30, classifyStartDelaySeconds: 0.001,
         headerTimeoutSeconds: 5, bodyTimeoutSeconds: 7.5, classifyConcurrency: 0, maxQueuedClassifications: 9}
models:
  - alias: chat
    upstream: {url: "http://vllm:8000/v1/", model: llama, api: [openai, openai-responses, anthropic],
               apiKeyEnv: VLLM_KEY, forwardCacheControl: true}
    tokenizer: {type: huggingface, path: /tok/tokenizer.json}
    pricing: {inputPerMTok: "0.60", outputPerMTok: 2.4}
    cache:
      enabledTtls: [1h, 5m]
      defaultTtl: 1h
      writeMultipliers: {5m: "1.5", 1h: 3}
      readMultiplier: "0.05"
      minPrefixTokens: 0
      maxBreakpoints: 2
      lookbackBlocks: 5
      automatic: {mode: lastUserMessage}
      ignorePrefixes: ["nonce:", "trace:"]
    imageTokens: 85
  - alias: claude
    upstream: {url: "https://anthropic.internal", model: mini, api: anthropic}
    tokenizer: {type: tiktoken, encoding: cl100k_base, path: /tok/cl100k_base.tiktoken}
    pricing: {inputPerMTok: 1, outputPerMTok: "5"}
    cache: {enabledTtls: [24h], automatic: {mode: lastBlock, ttl: 24h}}
"""


def test_full_config_parses_to_the_expected_values() -> None:
    config = parse_config(FULL)
    assert config.auth == AuthConfig("header", "x-tenant-id")
    assert config.limits == Limits(2048, 0.5, 30.0, 0.001, 5.0, 7.5, 0, 9)
    assert list(config.models) == ["chat", "claude"]

    chat = config.models["chat"]
    assert (chat.upstream.url, chat.upstream.model) == ("http://vllm:8000/v1/", "llama")
    assert chat.upstream.apis == ("openai", "openai-responses", "anthropic")
    assert (chat.upstream.api_key_env, chat.upstream.forward_cache_control) == ("VLLM_KEY", True)
    assert [chat.upstream.endpoint(api) for api in chat.upstream.apis] == [
        "http://vllm:8000/v1/chat/completions", "http://vllm:8000/v1/responses", "http://vllm:8000/v1/messages"]
    assert chat.tokenizer == {"type": "huggingface", "path": "/tok/tokenizer.json"}
    assert (chat.input_per_mtok, chat.output_per_mtok) == (Decimal("0.60"), Decimal("2.4"))
    assert chat.image_tokens == 85
    p = chat.policy
    assert (p.enabled_ttls, p.default_ttl) == (("5m", "1h"), "1h")
    assert dict(p.write_multipliers) == {"5m": Decimal("1.5"), "1h": Decimal("3"), "24h": Decimal("2.5")}
    assert p.read_multiplier == Decimal("0.05")
    assert (p.min_prefix_tokens, p.max_breakpoints, p.lookback_blocks) == (0, 2, 5)
    assert (p.automatic_mode, p.automatic_ttl) == ("lastUserMessage", "1h")
    assert p.ignore_prefixes == ("nonce:", "trace:")

    claude = config.models["claude"]
    assert claude.upstream.apis == ("anthropic",)
    assert claude.upstream.endpoint("anthropic") == "https://anthropic.internal/v1/messages"
    assert (claude.upstream.api_key_env, claude.upstream.forward_cache_control) == (None, False)
    assert claude.tokenizer == {"type": "tiktoken", "encoding": "cl100k_base", "path": "/tok/cl100k_base.tiktoken"}
    assert (claude.input_per_mtok, claude.output_per_mtok) == (Decimal(1), Decimal(5))
    q = claude.policy
    assert (q.enabled_ttls, q.default_ttl, q.automatic_mode, q.automatic_ttl) == (("24h",), "24h", "lastBlock", "24h")
    assert (q.min_prefix_tokens, q.max_breakpoints, q.lookback_blocks) == (1024, 4, 20)


# Every key docs/design.md#the-request-path names, and our one addition, as dotted paths ("models.*" for each model).
CONFIG_KEYS = {
    "auth", "auth.mode", "auth.header",
    "limits", "limits.maxBodyBytes", "limits.classifyDeadlineSeconds", "limits.upstreamTimeoutSeconds",
    "limits.classifyStartDelaySeconds",  # ours: not in docs/design.md#the-request-path's minimum
    "limits.headerTimeoutSeconds", "limits.bodyTimeoutSeconds", "limits.classifyConcurrency",
    "limits.maxQueuedClassifications",
    "models", "models.*.alias", "models.*.imageTokens",
    "models.*.upstream", "models.*.upstream.url", "models.*.upstream.model", "models.*.upstream.api",
    "models.*.upstream.apiKeyEnv", "models.*.upstream.forwardCacheControl", "models.*.upstream.cacheSalt",
    "models.*.upstream.replicas", "models.*.routing", "models.*.routing.mode", "models.*.routing.maxImbalance",
    "models.*.tokenizer", "models.*.tokenizer.type", "models.*.tokenizer.encoding", "models.*.tokenizer.path",
    "models.*.pricing", "models.*.pricing.inputPerMTok", "models.*.pricing.outputPerMTok",
    "models.*.cache", "models.*.cache.enabledTtls", "models.*.cache.defaultTtl", "models.*.cache.writeMultipliers",
    "models.*.cache.writeMultipliers.5m", "models.*.cache.writeMultipliers.1h", "models.*.cache.writeMultipliers.24h",
    "models.*.cache.readMultiplier", "models.*.cache.minPrefixTokens", "models.*.cache.maxBreakpoints",
    "models.*.cache.lookbackBlocks", "models.*.cache.automatic", "models.*.cache.automatic.mode",
    "models.*.cache.automatic.ttl", "models.*.cache.ignorePrefixes",
}


def key_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path
            yield from key_paths(value, path)
    elif isinstance(node, list) and prefix == "models":
        for item in node:
            yield from key_paths(item, "models.*")


def test_example_config_uses_every_key_and_parses() -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert set(key_paths(doc)) == CONFIG_KEYS
    config = load_config(EXAMPLE)
    assert config.auth == AuthConfig("apiKeys", "x-promptcache-principal")
    assert config.limits == Limits(10485760, 0.25, 300.0, 0.002, 30.0, 60.0, 4, 1024)
    assert list(config.models) == ["llama-70b", "assistant-mini"]
    llama, mini = config.models["llama-70b"], config.models["assistant-mini"]
    assert llama.upstream.endpoint("openai") == "http://vllm-llama.llm.svc.cluster.local:8000/v1/chat/completions"
    assert mini.upstream.endpoint("anthropic") == "http://assistant-mini.llm.svc.cluster.local:8080/v1/messages"
    assert llama.upstream.bases == ("http://10.0.1.7:8000/v1", "http://10.0.2.9:8000/v1")
    assert llama.upstream.endpoint("openai", llama.upstream.bases[1]) == "http://10.0.2.9:8000/v1/chat/completions"
    assert mini.upstream.bases == ("http://assistant-mini.llm.svc.cluster.local:8080",)
    assert (llama.routing, mini.routing) == (Routing("affinity", 1.25), Routing())
    assert (llama.input_per_mtok, llama.output_per_mtok) == (Decimal("0.60"), Decimal("2.40"))
    assert (mini.input_per_mtok, mini.output_per_mtok) == (Decimal("0.25"), Decimal("1.25"))
    assert llama.policy.enabled_ttls == ("5m", "1h") and mini.policy.enabled_ttls == ("5m", "1h", "24h")
    assert (llama.policy.automatic_mode, llama.policy.automatic_ttl) == ("lastUserMessage", "5m")
    assert (mini.policy.automatic_mode, mini.policy.automatic_ttl) == ("off", None)
    assert llama.policy.ignore_prefixes == ("x-billing-nonce:",)
    assert (llama.image_tokens, mini.image_tokens) == (1601, 0)
    assert llama.tokenizer is not None and llama.tokenizer["type"] == "huggingface"
    assert mini.tokenizer is not None and mini.tokenizer["encoding"] == "cl100k_base"


def test_every_spec_key_is_accepted_and_nothing_else() -> None:
    """The loader's unknown-key check and CONFIG_KEYS agree: adding any other key at any level fails."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    parents = [doc, doc["auth"], doc["limits"], *(m for model in doc["models"] for m in (
        model, model["upstream"], model["tokenizer"], model["pricing"], model["cache"], model["cache"]["automatic"]))]
    for parent in parents:
        parent["surplus"] = 1
        with pytest.raises(ConfigError, match="unknown"):
            parse_config(yaml.safe_dump(doc))
        del parent["surplus"]
    parse_config(yaml.safe_dump(doc))
