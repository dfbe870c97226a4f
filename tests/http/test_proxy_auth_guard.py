"""Invalid API keys stay cheap (issue 13 item 11, docs/design.md#authentication): an unknown key's hash is
remembered for a moment, and an address that sends too many unknown keys gets 429 with Retry-After, in the API's
shape, without a lookup — while the keys it has used successfully keep working."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from promptcache.proxy.testing.simulator import Simulator

from support.apierrors import assert_error, post_raw
from support.proxy import RunningProxy, model_config, new_key, running_proxy, settle, unique

ENDPOINT = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


@pytest.fixture
async def proxy(tmp_path: Path, pg_dsn: str, simulator: tuple[str, Simulator],
                word_tokenizer: Path) -> AsyncIterator[RunningProxy]:
    url = simulator[0]
    config = {"models": [model_config("chat", url + "/v1", "openai", word_tokenizer),
                         model_config("claude", url, "anthropic", word_tokenizer)]}
    async with running_proxy(config, tmp_path, pg_dsn) as running:
        yield running
        await settle(running)


def body(api: str) -> str:
    return json.dumps({"model": "chat" if api == "openai" else "claude", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hi"}]})


async def store_key(pg_dsn: str, key: str, principal: str) -> None:
    """What ``keys create`` stores, for a key string of the test's choosing."""
    digest = hashlib.sha256(key.encode()).digest()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO api_keys (key_id, key_hash, principal_id) VALUES ($1, $2, $3)",
                           digest.hex()[:12], digest, principal)
    finally:
        await conn.close()


async def test_an_unknown_key_is_remembered_for_a_moment(proxy: RunningProxy, pg_dsn: str) -> None:
    proxy.server.proxy.auth_guard.unknown_seconds = 0.5
    key = "pc-" + secrets.token_hex(16)
    async with aiohttp.ClientSession() as http:
        status, error, _ = await post_raw(http, proxy.url + ENDPOINT["openai"], body("openai"), {"x-api-key": key})
        assert (status, assert_error("openai", 401, error)) == (401, "invalid API key")
        await store_key(pg_dsn, key, unique("late"))
        # Known to be unknown: no lookup, so the key stored a moment ago is not seen yet.
        status, _, _ = await post_raw(http, proxy.url + ENDPOINT["openai"], body("openai"), {"x-api-key": key})
        assert status == 401
        await asyncio.sleep(0.6)
        status, answer, _ = await post_raw(http, proxy.url + ENDPOINT["openai"], body("openai"), {"x-api-key": key})
        assert status == 200, answer


@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_an_address_spraying_keys_is_throttled_but_its_good_key_works(proxy: RunningProxy, pg_dsn: str,
                                                                            api: str) -> None:
    guard = proxy.server.proxy.auth_guard
    guard.failures_per_window, guard.window_seconds = 5, 1.0
    good = await new_key(pg_dsn, unique("good"))
    url = proxy.url + ENDPOINT[api]
    registry = proxy.server.proxy.metrics.registry
    async with aiohttp.ClientSession() as http:
        assert (await post_raw(http, url, body(api), {"x-api-key": good}))[0] == 200  # known from here on
        for _ in range(5):
            status, _, _ = await post_raw(http, url, body(api), {"x-api-key": "pc-" + secrets.token_hex(16)})
            assert status == 401
        async with http.post(url, data=body(api), headers={"x-api-key": "pc-" + secrets.token_hex(16)}) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "1"
            assert assert_error(api, 429, await response.json()) == \
                "too many invalid API keys from this address; retry in 1 s"
        assert registry.get_sample_value("promptcache_auth_throttled_total") == 1
        assert (await post_raw(http, url, body(api), {"x-api-key": good}))[0] == 200
        await asyncio.sleep(1.1)
        status, _, _ = await post_raw(http, url, body(api), {"x-api-key": "pc-" + secrets.token_hex(16)})
        assert status == 401  # the window moved on: looked up again
