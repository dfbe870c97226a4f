"""``upstream.cacheSalt: principal`` (docs/design.md#engine-cache-salt): the forwarded body carries a ``cache_salt``
keyed on the cache scope — the same for one principal from every replica of a database, different between
principals, never their name — replacing any the client sent; without the setting the body is forwarded as sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import asyncpg
import openai
import pytest
import yaml

from promptcache.proxy.config import ConfigError, parse_config
from promptcache.proxy.domain.entries import Scope
from promptcache.proxy.domain.salt import cache_salt
from promptcache.proxy.testing.simulator import Simulator

from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique, words


def config(url: str, tokenizer: Path) -> dict[str, Any]:
    salted = model_config("chat-salted", url + "/v1", "openai", tokenizer)
    salted["upstream"]["cacheSalt"] = "principal"
    plain = model_config("chat-plain", url + "/v1", "openai", tokenizer)
    anthropic = model_config("claude-salted", url, "anthropic", tokenizer)
    anthropic["upstream"]["cacheSalt"] = "principal"
    return {"models": [salted, plain, anthropic]}


async def forwarded(proxy: RunningProxy, sim: Simulator, key: str, model: str, **extra: Any) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": words("s", 12)}],
                                         extra_body=extra or None)
    await settle(proxy)
    return sim.requests[-1]


async def stored_key(pg_dsn: str) -> bytes:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return bytes(await conn.fetchval("SELECT value FROM proxy_secrets WHERE name = 'cache_salt'"))
    finally:
        await conn.close()


async def test_the_salt_is_the_scope_keyed_by_the_databases_key(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    url, sim = simulator
    alice, bob = unique("alice"), unique("bob")
    async with running_proxy(config(url, word_tokenizer), tmp_path, pg_dsn) as first, \
            running_proxy(config(url, word_tokenizer), tmp_path, pg_dsn) as second:
        keys = {name: await new_key(pg_dsn, name) for name in (alice, bob)}
        key = await stored_key(pg_dsn)
        version = first.server.proxy.runtimes.models["chat-salted"].tokenizer_version
        want = {name: cache_salt(key, Scope(name, "chat-salted", version)) for name in (alice, bob)}
        for proxy in (first, second):
            assert proxy.server.proxy.salt_key_shared and proxy.server.proxy.salt_key == key
            for name in (alice, bob):
                body = await forwarded(proxy, sim, keys[name], "chat-salted")
                assert body["cache_salt"] == want[name]
                assert name not in body["cache_salt"] and body["cache_salt"].startswith("pc1-")
                assert len(body["cache_salt"]) == len("pc1-") + 32
        assert want[alice] != want[bob]
        # The client's own salt is replaced where we salt, and passed through as sent where we do not.
        assert (await forwarded(first, sim, keys[alice], "chat-salted", cache_salt="shared"))["cache_salt"] == \
            want[alice]
        assert (await forwarded(first, sim, keys[alice], "chat-plain", cache_salt="mine"))["cache_salt"] == "mine"
        assert "cache_salt" not in await forwarded(first, sim, keys[alice], "chat-plain")


async def test_anthropic_bodies_are_salted_too(
        tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    url, sim = simulator
    principal = unique("carol")
    async with running_proxy(config(url, word_tokenizer), tmp_path, pg_dsn) as proxy:
        client = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=await new_key(pg_dsn, principal),
                                          max_retries=0)
        await client.messages.create(model="claude-salted", max_tokens=8,
                                     messages=[{"role": "user", "content": words("a", 12)}])
        await settle(proxy)
        version = proxy.server.proxy.runtimes.models["claude-salted"].tokenizer_version
        assert sim.requests[-1]["cache_salt"] == cache_salt(await stored_key(pg_dsn),
                                                             Scope(principal, "claude-salted", version))


async def test_without_a_database_the_salt_is_the_processs_own(
        tmp_path: Path, simulator: tuple[str, Simulator], word_tokenizer: Path) -> None:
    url, sim = simulator
    cfg = config(url, word_tokenizer)
    cfg["auth"] = {"mode": "header"}
    async with running_proxy(cfg, tmp_path, None) as proxy:
        assert not proxy.server.proxy.salt_key_shared
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0,
                                    default_headers={"x-promptcache-principal": "dave"})
        await client.chat.completions.create(model="chat-salted", messages=[{"role": "user", "content": "hi"}])
        version = proxy.server.proxy.runtimes.models["chat-salted"].tokenizer_version
        assert sim.requests[-1]["cache_salt"] == cache_salt(proxy.server.proxy.salt_key,
                                                            Scope("dave", "chat-salted", version))


@pytest.mark.parametrize("value", ["request", "", True, {"from": "principal"}])
def test_an_unknown_salt_source_is_a_config_error(value: object) -> None:
    model = model_config("m", "http://127.0.0.1:9/v1", "openai", Path("/t.json"))
    model["upstream"]["cacheSalt"] = value
    with pytest.raises(ConfigError, match=r"^models\[0\]\.upstream\.cacheSalt must be one of \['principal'\] or "
                                          r"absent, got "):
        parse_config(yaml.safe_dump({"models": [model]}))
